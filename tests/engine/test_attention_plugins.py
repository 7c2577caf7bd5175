"""The ``linear`` and ``sliding`` attention plugins inside a model: recurrent decode, padding,
fidelity warnings, parity with transformers' Mistral window, selection from the CLI, bad input."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from dsr1.auto import AutoModel, AutoTokenizer
from dsr1.cli import main
from dsr1.errors import Dsr1Error

from .conftest import PROMPTS, hf_model, padded_batch

pytest.importorskip("dsr1_attention_linear")
pytest.importorskip("dsr1_attention_sliding")


def _linear(path: Path) -> AutoModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fidelity warning (tested on its own below)
        return AutoModel.from_pretrained(path, attention="linear")


@pytest.fixture(scope="module")
def linear_ckpt(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random llama checkpoint, declared as trained with linear attention."""
    out = tmp_path_factory.mktemp("linear") / "llama-linear"
    shutil.copytree(ckpts["llama"], out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "dsr1_attention": "linear"}))
    return out


@pytest.fixture(scope="module")
def llama_of_mistral(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mistral checkpoint's weights as a plain Llama (no sliding_window in its config)."""
    out = tmp_path_factory.mktemp("nowindow") / "llama"
    shutil.copytree(ckpts["mistral"], out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("sliding_window")
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (out / "config.json").write_text(json.dumps(cfg))
    return out


# --- linear ---------------------------------------------------------------------------------------


def test_linear_greedy_generate_equals_stepwise_full_forwards(linear_ckpt: Path) -> None:
    """generate decodes from the recurrent state; the cache-free forward recomputes everything."""
    model = AutoModel.from_pretrained(linear_ckpt)
    assert type(model.pipeline.attention).__name__ == "LinearAttention" and model.recurrent
    ids = AutoTokenizer.from_pretrained(linear_ckpt)(PROMPTS[0], return_tensors="pt")["input_ids"]  # (1, T0)
    t0, n = ids.shape[1], 12
    out = model.generate(ids, max_new_tokens=n, ignore_eos=True)  # (1, T0 + n)
    assert out.shape == (1, t0 + n)
    with torch.inference_mode():
        for i in range(n):
            logits = model(out[:, : t0 + i]).logits[:, -1]  # (1, V) without a cache
            assert int(logits.argmax(-1)) == int(out[0, t0 + i]), f"token {i}"
    assert model.pipeline.kvcache.nbytes() == 0 and model.pipeline.kvcache.state_nbytes() > 0  # states, no K/V


def test_linear_recurrent_logits_equal_full_forward(linear_ckpt: Path) -> None:
    """Prefill then single tokens through the cache's fixed-size state == one cache-free forward."""
    model = AutoModel.from_pretrained(linear_ckpt)
    ids = AutoTokenizer.from_pretrained(linear_ckpt)(PROMPTS[2], return_tensors="pt")["input_ids"]  # (1, T)
    b, t = ids.shape
    kv = model.pipeline.kvcache
    kv.allocate(model.cache_shape(b, t), model.dtype, ids.device)
    kv.clear_state()
    model.rope.ensure(t, model.dtype)
    positions = torch.arange(t).expand(b, t)
    p = t - 5
    with torch.inference_mode():
        want = model(ids).logits  # (1, T, V)
        pieces = [model.forward_step(ids[:, :p], positions[:, :p], 0, kv, None, None, False)]
        for i in range(p, t):
            pieces.append(model.forward_step(ids[:, i : i + 1], positions[:, i : i + 1], i, kv, None, None, False))
    torch.testing.assert_close(torch.cat(pieces, dim=1), want, atol=1e-4, rtol=0)


def test_linear_padded_batch_equals_rows_alone(linear_ckpt: Path) -> None:
    model = AutoModel.from_pretrained(linear_ckpt)
    enc = padded_batch(linear_ckpt)
    got = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=8, ignore_eos=True)
    with torch.inference_mode():
        batch_logits = model(**enc).logits  # (B, T, V)
    t0 = enc["input_ids"].shape[1]
    for row, real in enumerate(enc["attention_mask"].bool()):
        alone_ids = enc["input_ids"][row, real][None]  # (1, T_row)
        alone = model.generate(alone_ids, max_new_tokens=8, ignore_eos=True)
        assert torch.equal(got[row, t0:], alone[0, alone_ids.shape[1] :]), f"row {row}"
        with torch.inference_mode():
            torch.testing.assert_close(batch_logits[row, real], model(alone_ids).logits[0], atol=1e-4, rtol=0)


def test_linear_on_a_windowed_checkpoint_ignores_the_window_everywhere(ckpts: dict[str, Path]) -> None:
    """Running sums take no window: the cache-free forward must not get a windowed mask either
    (linear reads key validity from the mask's last row), or it would disagree with decode."""
    model = _linear(ckpts["mistral"])
    assert model.min_window is None
    enc = padded_batch(ckpts["mistral"])
    out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=6, ignore_eos=True)
    t0 = enc["input_ids"].shape[1]
    mask = torch.cat([enc["attention_mask"], torch.ones(len(PROMPTS), 6, dtype=torch.long)], dim=1)
    with torch.inference_mode():
        for i in range(6):
            logits = model(out[:, : t0 + i], attention_mask=mask[:, : t0 + i]).logits[:, -1]  # (B, V)
            assert torch.equal(logits.argmax(-1), out[:, t0 + i]), f"token {i}"


def test_linear_on_a_softmax_checkpoint_warns_about_fidelity(ckpts: dict[str, Path], linear_ckpt: Path) -> None:
    with pytest.warns(UserWarning, match="trained with softmax attention: its outputs will change"):
        AutoModel.from_pretrained(ckpts["llama"], attention="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = AutoModel.from_pretrained(linear_ckpt)  # declared linear: selected by itself, no warning
    assert type(model.pipeline.attention).__name__ == "LinearAttention"
    assert type(AutoModel.from_pretrained(linear_ckpt, attention="sdpa").pipeline.attention).__name__ == "SdpaAttention"


# --- sliding --------------------------------------------------------------------------------------


def test_sliding_on_llama_equals_transformers_mistral(ckpts: dict[str, Path], llama_of_mistral: Path) -> None:
    """A Llama with ``attention=sliding, window=6`` is transformers' Mistral with sliding_window=6."""
    enc = padded_batch(ckpts["mistral"])
    assert enc["input_ids"].shape[1] > 6  # the window bites
    ours = AutoModel.from_pretrained(llama_of_mistral, attention={"name": "sliding", "options": {"window": 6}})
    assert ours.min_window is None  # the window lives in the plugin only
    ref = hf_model(ckpts["mistral"])
    assert ref.config.sliding_window == 6
    with torch.inference_mode():
        got, want = ours(**enc).logits, ref(**enc).logits
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)
    tokens = ours.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=16)
    with torch.inference_mode():
        want_tokens = ref.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert torch.equal(tokens, want_tokens)


def test_sliding_takes_the_checkpoint_window(ckpts: dict[str, Path]) -> None:
    """No window option: the checkpoint's sliding_window (6), same as dsr1's own windowed masks."""
    enc = padded_batch(ckpts["mistral"])
    plugin = AutoModel.from_pretrained(ckpts["mistral"], attention="sliding")
    assert plugin.pipeline.attention.window == 6
    builtin = AutoModel.from_pretrained(ckpts["mistral"], attention="eager")
    with torch.inference_mode():
        got, want = plugin(**enc).logits, builtin(**enc).logits
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)


# --- selection and bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml", "name"),
    [("attention: linear\n", "linear"),
     ("attention:\n  name: sliding\n  options:\n    window: 4\n", "sliding")],
)
def test_selectable_from_generate_config(ckpts: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], yaml: str, name: str) -> None:
    cfg = tmp_path / "engine.yaml"
    cfg.write_text(yaml)
    argv = ["generate", "--model", str(ckpts["llama"]), "--config", str(cfg), "--max-new-tokens", "4", "--json", "Hi"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"]["attention"]["name"] == name
    assert report["pipeline"]["attention"]["distribution"] == f"dsr1-attention-{name}"


@pytest.mark.parametrize(
    ("attention", "message"),
    [({"name": "sliding", "options": {"window": 0}}, "attention.options.window"),
     ({"name": "sliding", "options": {"window": -2}}, "attention.options.window"),
     ("sliding", "needs a window: set attention.options.window"),
     ("linaer", "did you mean 'linear'"),
     ("slidng", "did you mean 'sliding'"),
     ({"name": "linear", "options": {"chunk": 0}}, "attention.options.chunk")],
)
def test_bad_attention_config_is_a_one_line_error(ckpts: dict[str, Path], attention: object, message: str) -> None:
    with pytest.raises(Dsr1Error) as err:
        AutoModel.from_pretrained(ckpts["llama"], attention=attention)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sliding_with_a_ring_buffer_cache_equals_the_full_cache(llama_of_mistral: Path) -> None:
    """The natural cache of a window: ``streaming`` with no sinks keeps the last ``window`` tokens only."""
    enc = padded_batch(llama_of_mistral)
    sliding = {"name": "sliding", "options": {"window": 5}}
    full = AutoModel.from_pretrained(llama_of_mistral, attention=sliding)
    ring = AutoModel.from_pretrained(llama_of_mistral, attention=sliding,
                                     kvcache={"name": "streaming", "options": {"sinks": 0, "window": 5}})
    want = full.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=16, ignore_eos=True)
    got = ring.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=16, ignore_eos=True)
    assert torch.equal(got, want)
    assert ring.pipeline.kvcache.nbytes() < full.pipeline.kvcache.nbytes() / 4
