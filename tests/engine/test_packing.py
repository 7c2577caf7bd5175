"""The CPU ``auto`` layout: the cpu device's panel kernel where it runs, else oneDNN-packed linear
weights while generating 2+ rows and ``kn`` for one row."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dsr1.auto import AutoModel
from dsr1.errors import Dsr1Error
from dsr1.models import packing
from dsr1.models.packing import OnednnLinear, PackedLinear
from dsr1_device_cpu import panels
from dsr1_device_cpu.panels import PanelLinear

from .conftest import hf_model, padded_batch

needs_panels = pytest.mark.skipif(panels.unavailable() is not None, reason=f"panel kernel: {panels.unavailable()}")


def _linears(model: nn.Module) -> list[nn.Module]:
    """The decoder layers' linear layers and the output head, packed or not."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, PackedLinear))]


#: the cpu device without its panel kernel: the model's own layouts (oneDNN / kn).
NO_PANELS = {"device": {"name": "cpu", "options": {"linear_kernel": "none"}}}


def test_packing_follows_the_batch_and_keeps_the_numerics(ckpts: dict[str, Path]) -> None:
    enc = padded_batch(ckpts["qwen2"])  # qkv bias: the packed call takes a bias too
    model = AutoModel.from_pretrained(ckpts["qwen2"], NO_PANELS)
    ref = hf_model(ckpts["qwen2"])
    before = dict(model.hf_state_dict())
    assert all(type(m) is nn.Linear for m in _linears(model))
    n_linears = len(_linears(model))

    got = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=16)  # batch 4: packs
    assert len(_linears(model)) == n_linears
    assert all(type(m) is OnednnLinear and all(b.is_mkldnn for b in m.blocks()) for m in _linears(model))
    with torch.inference_mode():
        want = ref.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
        real = enc["attention_mask"].bool()
        torch.testing.assert_close(model(**enc).logits[real], ref(**enc).logits[real], atol=1e-4, rtol=0)
    assert torch.equal(got, want)
    packed = dict(model.hf_state_dict())  # plain (out, in) tensors, bit for bit
    assert packed.keys() == before.keys()
    assert all(not t.is_mkldnn and torch.equal(t, before[n]) for n, t in packed.items())

    model.generate(enc["input_ids"][:1], max_new_tokens=2)  # batch 1: back to kn
    for m in _linears(model):
        assert type(m) is nn.Linear and not m.weight.is_mkldnn and m.weight.t().is_contiguous()  # (in, out) storage
    assert all(torch.equal(t, before[n]) for n, t in model.hf_state_dict())


@needs_panels
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_panel_kernel_serves_every_batch_size_with_the_numerics(ckpts: dict[str, Path], arch: str) -> None:
    enc = padded_batch(ckpts[arch])
    model = AutoModel.from_pretrained(ckpts[arch])  # the default cpu device: linear_kernel auto
    ref = hf_model(ckpts[arch])
    before = dict(model.hf_state_dict())
    got = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=16)  # batch 4
    assert all(type(m) is PanelLinear for m in _linears(model)) and model.device_layout is True
    with torch.inference_mode():
        want = ref.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
        real = enc["attention_mask"].bool()
        torch.testing.assert_close(model(**enc).logits[real], ref(**enc).logits[real], atol=1e-4, rtol=0)
    assert torch.equal(got, want)
    longest = enc["input_ids"][2:3]  # the row without padding
    assert bool(enc["attention_mask"][2].all())
    single = model.generate(longest, max_new_tokens=8)  # batch 1: the same panels, no switch
    assert all(type(m) is PanelLinear for m in _linears(model))
    with torch.inference_mode():
        assert torch.equal(single, ref.generate(longest, max_new_tokens=8, do_sample=False, eos_token_id=2,
                                                pad_token_id=0))
    saved = dict(model.hf_state_dict())  # what save_pretrained writes: plain (out, in) tensors, bit for bit
    assert saved.keys() == before.keys() and all(torch.equal(saved[n], before[n]) for n in before)


@needs_panels
def test_a_compiled_decode_step_runs_the_panel_op(ckpts: dict[str, Path]) -> None:
    """graph compile: the first generate takes the device's layout before the step is traced, and the traced step
    calls the panel op (one opaque call; once a plain nn.Linear, which compiled to MKL's product at half the
    speed). The oneDNN/kn switching stays off: a compiled step keeps the layout it was traced on."""
    enc = padded_batch(ckpts["llama"])
    eager = AutoModel.from_pretrained(ckpts["llama"])
    model = AutoModel.from_pretrained(ckpts["llama"], {"graph": "compile"})
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=6)  # batch 4
    calls = [e.count for e in prof.key_averages() if e.key == "dsr1_device_cpu::panel_mm"]
    assert all(type(m) is PanelLinear for m in _linears(model)) and model.device_layout is True
    assert calls and calls[0] >= 5 * len(_linears(model))  # every decode step's every linear layer
    assert torch.equal(got, eager.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=6))
    single = model.generate(enc["input_ids"][2:3], max_new_tokens=4)  # batch 1: the same panels
    assert all(type(m) is PanelLinear for m in _linears(model))
    assert torch.equal(single, eager.generate(enc["input_ids"][2:3], max_new_tokens=4))

    no_panels = AutoModel.from_pretrained(ckpts["llama"], {"graph": "compile", **NO_PANELS})
    no_panels.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=2)  # batch 4: no switch
    assert all(type(m) is nn.Linear for m in _linears(no_panels)) and no_panels.device_layout is False


def test_explicit_layouts_never_pack(ckpts: dict[str, Path]) -> None:
    enc = padded_batch(ckpts["llama"])
    for layout in ("kn", "nk"):
        model = AutoModel.from_pretrained(ckpts["llama"], {"model": {"name": "llama", "options": {"weight_layout": layout}}})
        model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=2)
        assert not any(isinstance(m, PackedLinear) for m in model.modules())
        model = AutoModel.from_pretrained(ckpts["llama"], {"model": {"name": "llama", "options": {"weight_layout": layout}}, **NO_PANELS})
        model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=2)
        assert not any(type(m) is OnednnLinear for m in model.modules())


def test_wide_layers_pack_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 16 KiB blocks: a 200 x 40 fp32 weight (32 000 bytes) packs as 64-row blocks 64, 64, 64, 8
    monkeypatch.setattr(packing, "BLOCK_BYTES", 16 * 2**10)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 200), nn.Linear(200, 8, bias=False))
    x = torch.randn(3, 5, 40)
    want = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert packing.pack_linears_(model) == 2
    wide, narrow = model[0], model[1]
    assert [b.shape[0] for b in wide.blocks()] == [64, 64, 64, 8] and narrow.n_blocks == 1
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
    saved = model.state_dict()  # what save_pretrained reads: the plain (out, in) weights, bit for bit
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    assert packing.unpack_linears_(model) == 2
    assert all(type(m) is nn.Linear and m.weight.t().is_contiguous() for m in model)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("out", "inp", "rows"), [(100, 10, 100), (32000, 768, 5440), (70000, 1, 70000), (5, 10**7, 5)])
def test_block_rows(out: int, inp: int, rows: int) -> None:
    assert packing.block_rows(out, inp, 4) == rows


@pytest.mark.parametrize("config", [None, NO_PANELS])
def test_quantizing_or_pruning_a_packed_model_is_refused(ckpts: dict[str, Path], config: dict | None) -> None:
    from dsr1.pruning.metrics import prunable_linears
    from dsr1.quantization.modules import linear_layers

    model = AutoModel.from_pretrained(ckpts["llama"], config)
    assert linear_layers(model) and prunable_linears(model)  # freshly loaded: plain nn.Linear layers
    enc = padded_batch(ckpts["llama"])
    model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=2)  # batch 4: packed
    if not any(isinstance(m, PackedLinear) for m in model.modules()):
        pytest.skip("nothing packed on this CPU")
    with pytest.raises(Dsr1Error, match=r"quantize: \d+ linear layers .* packed for CPU decode.*load the model again"):
        linear_layers(model)
    with pytest.raises(Dsr1Error, match=r"prune: \d+ linear layers .* packed for CPU decode"):
        prunable_linears(model)
