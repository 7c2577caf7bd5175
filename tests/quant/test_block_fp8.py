"""DeepSeek's block-scaled fp8 checkpoints: the block math, the reader (scales hidden, weights
dequantized as read), one-line refusals, the fp8 plugin keeping the stored values, and
transformers reading a checkpoint written by :func:`dsr1.models.fp8_blocks.write_block_fp8`."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsr1.errors import Dsr1Error
from dsr1.models import fp8_blocks
from dsr1.models.checkpoint import CheckpointReader, block_fp8_config
from dsr1_sdk.reference.quant import sqnr

IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
#: a block smaller than the tiny model's dims, ragged on both sides (64, 96 and 32 are not multiples of it)
RAGGED = (24, 40)
#: several blocks per weight, every dim a multiple of them (what transformers' CPU dequantization takes)
EVEN = (16, 32)


def tiny_llama(out: Path) -> Path:
    """A random-weight transformers Llama (q 64 rows, k/v 32, mlp 96), saved in fp32 safetensors."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(out, safe_serialization=True)
    return out


def dequantized_copy(src: Path, out: Path) -> Path:
    """The plain fp32 checkpoint holding exactly the weights a block-fp8 dir ``src`` stands for."""
    config = json.loads((src / "config.json").read_text())
    block = config.pop("quantization_config")["weight_block_size"]
    state = load_file(str(src / "model.safetensors"))
    plain = {n: fp8_blocks.dequantize(t, state[n + "_scale_inv"], block) if t.dtype == torch.float8_e4m3fn else t
             for n, t in state.items() if not n.endswith("_scale_inv")}
    out.mkdir()
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def load(path: Path, dtype: str = "float32", **overrides: Any) -> Any:
    """``AutoModel.from_pretrained``'s steps without its ``dsr1 quantize``-dir branch, which today takes
    every dir with a ``quantization_config`` (auto.py is not this change's; see the note in docs/loading)."""
    from dsr1.auto import native_attention
    from dsr1.config import load_config
    from dsr1.models.loading import read_hf_config
    from dsr1.registry import PluginRegistry

    hf = read_hf_config(path)
    cfg = native_attention(load_config(None, **overrides), hf, path)
    pipeline = PluginRegistry.from_env().resolve(cfg)
    pipeline.require_device()
    pipeline.model_dir = path
    builder = pipeline.model_builder(str(hf["model_type"]))
    builder.options = type(builder.options).model_validate({**builder.options.model_dump(), "dtype": dtype})
    return builder.build(path, hf, pipeline)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("blockfp8")
    plain = tiny_llama(root / "plain")
    fp8 = fp8_blocks.write_block_fp8(plain, root / "fp8")  # DeepSeek's [128, 128]: one block per tiny weight
    ragged = fp8_blocks.write_block_fp8(plain, root / "ragged", block=RAGGED)
    even = fp8_blocks.write_block_fp8(plain, root / "even", block=EVEN)
    return {"plain": plain, "fp8": fp8, "ragged": ragged, "even": even,
            **{f"{k}-deq": dequantized_copy(d, root / f"{k}-deq") for k, d in (("fp8", fp8), ("ragged", ragged),
                                                                           ("even", even))}}


# --- the block math -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 96), (130, 257), (1, 5)])
@pytest.mark.parametrize("block", [(128, 128), RAGGED, (1, 16)])
def test_dequantize_is_each_value_times_its_blocks_scale(shape: tuple[int, int], block: tuple[int, int]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    q, s = fp8_blocks.quantize(w, block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert tuple(s.shape) == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    rows = torch.arange(shape[0])[:, None] // block[0]
    cols = torch.arange(shape[1])[None, :] // block[1]
    assert torch.equal(fp8_blocks.dequantize(q, s, block), q.float() * s[rows, cols])
    err = (fp8_blocks.dequantize(q, s, block) - w).pow(2).mean()
    assert 10 * torch.log10(w.pow(2).mean() / err) > 25  # e4m3 keeps 3 mantissa bits: ~30 dB


def test_a_blocks_largest_value_maps_to_e4m3_max_and_zero_blocks_stay_zero() -> None:
    w = torch.zeros(4, 8)
    w[0, 0], w[1, 5] = -2.0, 1.0  # block (0, 0) amax 2; block (0, 1) amax 1; blocks of row 2-3 all zero
    q, s = fp8_blocks.quantize(w, (2, 4))
    assert torch.equal(s, torch.tensor([[2 / 448, 1 / 448], [1.0, 1.0]]))
    assert q[0, 0].float() == -448 and torch.equal(fp8_blocks.dequantize(q, s, (2, 4)), w)


def test_row_scales_are_the_same_weight_in_one_row_blocks() -> None:
    w = torch.randn(50, 70, generator=torch.Generator().manual_seed(2))
    q, s = fp8_blocks.quantize(w, RAGGED)
    rows = fp8_blocks.row_scales(s, RAGGED, 50)  # (50, 2)
    assert torch.equal(fp8_blocks.dequantize(q, rows, (1, RAGGED[1])), fp8_blocks.dequantize(q, s, RAGGED))


# --- the reader -------------------------------------------------------------------------------------


def test_written_checkpoint_has_deepseeks_layout(dirs: dict[str, Path]) -> None:
    config = json.loads((dirs["fp8"] / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [128, 128]}
    state = load_file(str(dirs["ragged"] / "model.safetensors"))
    assert state["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert state["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (3, 3)  # (64, 96) in (24, 40) blocks
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert state[kept].dtype == torch.float32 and kept + "_scale_inv" not in state


def test_reader_hides_scales_and_dequantizes(dirs: dict[str, Path]) -> None:
    reader = CheckpointReader(dirs["ragged"])
    try:
        assert reader.block == RAGGED
        assert not [n for n in reader.names() if n.endswith("_scale_inv")]
        assert reader.names() == CheckpointReader(dirs["plain"]).names()
        assert reader.float_dtype() == torch.float32  # the tensors kept in floating point, not float8
        name = "model.layers.1.self_attn.k_proj.weight"
        q, s = reader.read_block_fp8(name, torch.device("cpu"))  # type: ignore[misc]
        assert q.dtype == torch.float8_e4m3fn and tuple(s.shape) == (2, 2)
        want = fp8_blocks.dequantize(q, s, RAGGED)
        assert torch.equal(reader.read(name, None, torch.device("cpu")), want)
        assert torch.equal(reader.read(name, torch.bfloat16, torch.device("cpu")), want.to(torch.bfloat16))
        assert reader.read_block_fp8("model.norm.weight", torch.device("cpu")) is None
    finally:
        reader.close()


@pytest.mark.parametrize("kind", ["fp8", "ragged", "even"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_equal_the_model_built_from_the_dequantized_weights(
        dirs: dict[str, Path], kind: str, dtype: str) -> None:
    """Loads through the llama builder's name check (the scales are not unexpected tensors)."""
    got, want = load(dirs[kind], dtype)(IDS).logits, load(dirs[f"{kind}-deq"], dtype)(IDS).logits
    assert got.dtype == getattr(torch, dtype)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # and the fp8 model is the plain one up to e4m3's rounding: on these random weights that rounding alone sits
    # near 20 dB at the logits in either dtype (bf16's own rounding and the CPU's kernels move it by a fraction of
    # a dB), while a misplaced scale or block falls far below 0 dB
    plain = load(dirs["plain"], "float32")(IDS).logits
    assert sqnr(plain, got.float()) > 18, sqnr(plain, got.float())


# --- refusals -------------------------------------------------------------------------------------


def _with_config(src: Path, out: Path, **qc: Any) -> Path:
    out.mkdir()
    (out / "model.safetensors").symlink_to(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {**config["quantization_config"], **qc}
    (out / "config.json").write_text(json.dumps(config))
    return out


BAD_CONFIGS = {
    "method": (dict(quant_method="awq"), r"quantization_config\.quant_method 'awq' is not supported; use 'fp8'"),
    "fmt": (dict(fmt="e5m2"), r"quantization_config\.fmt 'e5m2' is not supported; block fp8 supports 'e4m3'"),
    "scheme": (dict(activation_scheme="static"), r"activation_scheme 'static' is not supported.*'dynamic'"),
    "one int": (dict(weight_block_size=[128]), r"weight_block_size must be two positive ints.*got \[128\]"),
    "zero": (dict(weight_block_size=[0, 128]), r"weight_block_size must be two positive ints.*got \[0, 128\]"),
    "string": (dict(weight_block_size="128"), r"weight_block_size must be two positive ints.*got '128'"),
    "float": (dict(weight_block_size=[128.0, 128]), r"weight_block_size must be two positive ints"),
    "missing": (dict(weight_block_size=None), r"weight_block_size must be two positive ints.*got None"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_quantization_config_is_a_one_line_error(dirs: dict[str, Path], tmp_path: Path, case: str) -> None:
    qc, message = BAD_CONFIGS[case]
    path = _with_config(dirs["fp8"], tmp_path / "m", **qc)
    with pytest.raises(Dsr1Error, match=message) as err:
        CheckpointReader(path)
    assert "\n" not in str(err.value)
    with pytest.raises(Dsr1Error, match=message):
        block_fp8_config(json.loads((path / "config.json").read_text()))


def _with_state(src: Path, out: Path, edit: Any) -> Path:
    out.mkdir()
    state = load_file(str(src / "model.safetensors"))
    edit(state)
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text((src / "config.json").read_text())
    return out


SCALE = "model.layers.1.mlp.up_proj.weight_scale_inv"
BAD_STATES = {
    "no scale": (lambda st: st.pop(SCALE),
                 r"float8 tensor 'model\.layers\.1\.mlp\.up_proj\.weight' has no '.*weight_scale_inv' \(its block"),
    "wrong shape": (lambda st: st.update({SCALE: torch.ones(2, 2)}),
                    r"'model\.layers\.1\.mlp\.up_proj\.weight_scale_inv' has shape \(2, 2\), but weight .* \(96, 64\) "
                    r"in blocks of \[24, 40\] needs \(4, 2\)"),
    "scale of a float weight": (lambda st: st.update({"model.norm.weight_scale_inv": torch.ones(1, 1)}),
                                r"has scales 'model\.norm\.weight_scale_inv', but 'model\.norm\.weight' is stored in "
                                r"float32, not float8_e4m3fn"),
    "nan scale": (lambda st: st[SCALE].__setitem__((0, 0), float("nan")),
                  r"holds NaN/Inf: tensor 'model\.layers\.1\.mlp\.up_proj\.weight_scale_inv'"),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_bad_scales_are_a_one_line_error_naming_the_tensor(dirs: dict[str, Path], tmp_path: Path, case: str) -> None:
    edit, message = BAD_STATES[case]
    path = _with_state(dirs["ragged"], tmp_path / "m", edit)
    with pytest.raises(Dsr1Error, match=message) as err:
        load(path)
    assert "\n" not in str(err.value)


# --- quant: fp8 keeps the stored values -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fp8", "ragged"])
def test_quant_fp8_keeps_the_checkpoints_fp8_values_and_scales(dirs: dict[str, Path], kind: str) -> None:
    from dsr1_quant_fp8 import BlockFp8Linear

    model = load(dirs[kind], quant={"name": "fp8", "options": {"compute_dtype": "fp32"}})
    state = load_file(str(dirs[kind] / "model.safetensors"))
    block = json.loads((dirs[kind] / "config.json").read_text())["quantization_config"]["weight_block_size"]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, BlockFp8Linear)}
    plain = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert plain == ["lm_head"] and len(layers) >= 8  # lm_head is stored in floating point: kept so
    down = layers["model.layers.0.mlp.down_proj"]
    stored = state["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(down.qweight.view(torch.uint8), stored.view(torch.uint8))
    assert torch.equal(down.dequantize(), fp8_blocks.dequantize(stored, state[
        "model.layers.0.mlp.down_proj.weight_scale_inv"], block))
    assert model.quantization_config["weight_block_size"] == block
    torch.testing.assert_close(model(IDS).logits, load(dirs[kind])(IDS).logits, atol=1e-5, rtol=1e-5)


def test_quant_fp8_on_a_plain_checkpoint_still_refuses_the_cpu(dirs: dict[str, Path]) -> None:
    with pytest.raises(Dsr1Error, match=r"fp8 e4m3 needs an NVIDIA GPU"):
        load(dirs["plain"], quant="fp8")


# --- transformers reads what write_block_fp8 writes -------------------------------------------------------


@pytest.mark.parametrize("kind", ["fp8", "even"])
def test_transformers_reads_the_written_checkpoint(dirs: dict[str, Path], kind: str) -> None:
    """transformers' FineGrainedFP8 dequantizes on a machine without a GPU (it needs accelerate). It derives the
    block from the scale grid, so it takes weights whose dims are multiples of the block (or one block)."""
    pytest.importorskip("accelerate", reason="transformers loads fp8 checkpoints only with accelerate installed")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(dirs[kind], dtype=torch.float32).eval()
    state = load_file(str(dirs[kind] / "model.safetensors"))
    block = json.loads((dirs[kind] / "config.json").read_text())["quantization_config"]["weight_block_size"]
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(hf.get_parameter(name).float(), fp8_blocks.dequantize(state[name], state[name + "_scale_inv"],
                                                                              block))
    with torch.no_grad():
        want = hf(IDS).logits
    torch.testing.assert_close(load(dirs[kind])(IDS).logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("parts", "grid"), [([384], (3, 2)), ([256, 128, 128], (4, 2)), ([64, 32, 32], None),
                                             ([128, 64, 64], None)])
def test_block_layer_finds_the_128_grid_behind_fused_row_scales(parts: list[int], grid: Any) -> None:
    """The GPU kernel takes DeepSeek's 128×128 scale grid: found only where every fused part fills whole blocks."""
    from dsr1_quant_fp8 import BlockFp8Linear

    gen = torch.Generator().manual_seed(3)
    pairs = [fp8_blocks.quantize(torch.randn(p, 256, generator=gen), (128, 128)) for p in parts]
    q = torch.cat([a for a, _ in pairs])  # (sum of parts, 256)
    rows = torch.cat([fp8_blocks.row_scales(s, (128, 128), a.shape[0]) for a, s in pairs])  # (sum of parts, 2)
    layer = BlockFp8Linear(torch.nn.Linear(256, sum(parts)), q, rows, 128, torch.float32)
    assert layer.grid is None  # on the CPU: the reference path
    found = layer._kernel_grid()
    assert (None if found is None else (found.shape[0], 2)) == grid
    if found is not None:
        assert torch.equal(found[:, :2], torch.cat([s for _, s in pairs])) and found.shape[1] == 4  # padded rows
    x = torch.randn(3, 256, generator=gen)
    torch.testing.assert_close(layer(x), layer.reference(x), atol=1e-5, rtol=1e-5)
    assert layer.state_dict()["qweight"].dtype == torch.float8_e4m3fn


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the blockwise torch._scaled_mm kernel needs a CUDA GPU")
@pytest.mark.parametrize(("out", "inp"), [(384, 512), (256, 1792), (128, 256), (640, 640), (384, 128)])
def test_block_kernel_matches_the_reference_on_cuda(out: int, inp: int) -> None:
    """On a GPU where the kernel is taken, it agrees with the dequantized product up to activation rounding
    (``in/128`` of 14 and 5 need the padded scale rows of ``kernel_grid``), for rows padded to 16 or not."""
    from dsr1_quant_fp8 import BlockFp8Linear, blockwise_kernel_works

    device = torch.device("cuda")
    if not blockwise_kernel_works(device):
        pytest.skip("this torch/GPU has no blockwise _scaled_mm that agrees with the reference: reference path")
    gen = torch.Generator().manual_seed(4)
    q, s = fp8_blocks.quantize(torch.randn(out, inp, generator=gen) * 0.05, (128, 128))
    layer = BlockFp8Linear(torch.nn.Linear(inp, out, device=device), q, fp8_blocks.row_scales(s, (128, 128), out),
                           128, torch.bfloat16)
    assert layer.grid is not None
    for m in (1, 7, 33, 300):
        x = torch.randn(2, m, inp, generator=gen).to(device, torch.bfloat16)
        got, want = layer(x).float(), layer.reference(x.float()).float()
        assert ((got - want).norm() / want.norm()).item() < 0.05, (out, inp, m)


def test_quant_fp8_on_deepseek_v3_keeps_what_the_builder_used_as_read(tmp_path: Path) -> None:
    """DeepSeek's own layout: MLA, MoE experts per tensor, the router in floating point. Layers the builder
    rearranges after reading (its rope rows) keep the dequantized weights, said in a warning; logits stay exact."""
    from tests.engine.conftest import make_checkpoint

    plain = make_checkpoint(tmp_path / "plain", "deepseek_v3", tokenizer=False)
    fp8 = fp8_blocks.write_block_fp8(plain, tmp_path / "fp8", block=(16, 16))
    want = load(dequantized_copy(fp8, tmp_path / "deq"))(IDS).logits
    assert torch.equal(load(fp8)(IDS).logits, want)
    with pytest.warns(UserWarning) as caught:
        model = load(fp8, quant={"name": "fp8", "options": {"compute_dtype": "fp32"}})
    said = " | ".join(str(w.message) for w in caught)
    assert re.search(r"layer\(s\) differ from their block-fp8 checkpoint tensors .*q_b_proj", said), said
    assert "routed experts of 1 MoE layer(s) keep the block-fp8 checkpoint's weights dequantized" in said
    precision = model.runtime.pipeline.quant.precision_map(model)
    assert precision["model.layers.1.self_attn.o_proj"] == "fp8"
    assert precision["model.layers.1.self_attn.q_b_proj"] == "fp32"
    torch.testing.assert_close(model(IDS).logits, want, atol=1e-5, rtol=1e-5)
