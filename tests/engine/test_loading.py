"""Loading, saving, name resolution and the one-line errors of bad checkpoints."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsr1.auto import AutoModel, AutoTokenizer
from dsr1.errors import Dsr1Error
from dsr1.models.checkpoint import CheckpointReader
from dsr1.models.loading import resolve_model_dir


@pytest.fixture
def llama(ckpts: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the tiny llama checkpoint that a test may damage."""
    return Path(shutil.copytree(ckpts["llama"], tmp_path / "llama"))


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 40, 41, 42, 43, 44, 45]])


def test_seed_snippet_runs_verbatim(ckpts: dict[str, Path]) -> None:
    code = (
        "from deepseek_r1 import AutoModel, AutoTokenizer\n"
        "model = AutoModel.from_pretrained(path)\n"
        "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        'inputs = tokenizer("输入文本", return_tensors="pt")\n'
        "outputs = model(**inputs)\n"
    )
    scope: dict[str, object] = {"path": str(ckpts["llama"])}
    exec(code, scope)  # noqa: S102 - the seed's snippet, verbatim
    outputs = scope["outputs"]
    inputs = scope["inputs"]
    assert outputs.logits.shape == (1, inputs["input_ids"].shape[1], 400)  # type: ignore[attr-defined,index]
    assert torch.isfinite(outputs.logits).all()  # type: ignore[attr-defined]


def test_save_pretrained_round_trip(ckpts: dict[str, Path], tmp_path: Path) -> None:
    for kind in ("qwen2-tied", "mistral"):
        model = AutoModel.from_pretrained(ckpts[kind])
        out = model.save_pretrained(tmp_path / kind)
        assert sorted(p.name for p in out.iterdir()) == [".dsr1-output.json", "config.json", "generation_config.json",
                                                          "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        again = AutoModel.from_pretrained(out)
        with torch.inference_mode():
            assert torch.equal(model(_ids()).logits, again(_ids()).logits)
        # the saved file is plain transformers format (unfused names), loadable by transformers
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            names = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.mlp.up_proj.weight" in names
        assert ("lm_head.weight" in names) == (kind != "qwen2-tied")
        import transformers

        ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.inference_mode():
            torch.testing.assert_close(ref(_ids()).logits, model(_ids()).logits, atol=1e-4, rtol=0)


def test_save_is_atomic_and_replaces(ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = AutoModel.from_pretrained(ckpts["llama"])
    target = tmp_path / "out"
    model.save_pretrained(target)
    (target / "config.json").write_text("old")  # a previous save_pretrained output (its marker lists config.json)
    import dsr1.models.loading as loading

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(loading, "write_safetensors", boom)
    with pytest.raises(OSError):
        model.save_pretrained(target)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "config.json").read_text() == "old"
    monkeypatch.undo()
    model.save_pretrained(target)
    assert (target / "config.json").read_text() != "old" and (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or old dir left
    (target / "notes.txt").write_text("mine")  # a file dsr1 did not write: never replaced
    with pytest.raises(Dsr1Error, match="holds files dsr1 save_pretrained did not write"):
        model.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"


def test_sharded_safetensors_load(ckpts: dict[str, Path], tmp_path: Path) -> None:
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpts["qwen2"], dtype=torch.float32)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    shutil.copy(ckpts["qwen2"] / "tokenizer.json", tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a = AutoModel.from_pretrained(tmp_path / "sharded")
    b = AutoModel.from_pretrained(ckpts["qwen2"])
    with torch.inference_mode():
        assert torch.equal(a(_ids()).logits, b(_ids()).logits)


def test_dtype_override_and_checkpoint_dtype(ckpts: dict[str, Path], tmp_path: Path) -> None:
    model = AutoModel.from_pretrained(ckpts["llama"], dtype="bf16")
    assert model.dtype == torch.bfloat16 and model(_ids()).logits.dtype == torch.bfloat16
    out = model.save_pretrained(tmp_path / "bf16")
    again = AutoModel.from_pretrained(out)  # dtype from the checkpoint
    assert again.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModel.from_pretrained(out, dtype=torch.float32).dtype == torch.float32


def test_pickle_needs_opt_in(llama: Path) -> None:
    reader = CheckpointReader(llama)
    state = {n: reader.read(n, None, torch.device("cpu")) for n in reader.names()}
    reader.close()
    (llama / "model.safetensors").unlink()
    torch.save(state, llama / "pytorch_model.bin")
    with pytest.raises(Dsr1Error, match=r"pytorch_model.bin .* pickle checkpoint.*allow_pickle=True"):
        AutoModel.from_pretrained(llama)
    model = AutoModel.from_pretrained(llama, allow_pickle=True)
    assert model(_ids()).logits.shape == (1, 7, 400)


def _error(path: Path, **kw: object) -> str:
    with pytest.raises(Dsr1Error) as info:
        AutoModel.from_pretrained(path, **kw)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_checkpoints_say_what_is_wrong(llama: Path, tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in _error(tmp_path / "empty")

    cfg = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt-neo"}))
    msg = _error(llama)
    assert "unknown model_type 'gpt-neo'" in msg and "llama" in msg and "qwen2" in msg and "bert" in msg

    (llama / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    assert "missing" in _error(llama) and "model.layers.2.self_attn.q_proj.weight" in _error(llama)
    (llama / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    assert "unexpected" in _error(llama) and "model.layers.1." in _error(llama)
    (llama / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    msg = _error(llama)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "(96, 64)" in msg and "(100, 64)" in msg
    (llama / "config.json").write_text(json.dumps(cfg))

    data = (llama / "model.safetensors").read_bytes()
    (llama / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(llama)
    (llama / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[24:])
    assert "corrupt" in _error(llama)
    (llama / "model.safetensors").write_bytes(data)

    (llama / "tokenizer.json").unlink()
    with pytest.raises(Dsr1Error, match="no tokenizer.json"):
        AutoTokenizer.from_pretrained(llama)


def test_name_resolution_order(ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    hub = tmp_path / "hub"
    bundled = tmp_path / "assets"
    monkeypatch.setenv("DSR1_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import dsr1.models.loading as loading

    monkeypatch.setattr(loading, "bundled_dir", lambda: bundled)
    with pytest.raises(Dsr1Error) as info:
        resolve_model_dir("org/tiny")
    msg = str(info.value)
    for place in (str(home / "models" / "org/tiny"), "models--org--tiny", str(bundled / "org/tiny"), "HF_HUB_OFFLINE"):
        assert place in msg

    shutil.copytree(ckpts["llama"], bundled / "org" / "tiny")
    assert resolve_model_dir("org/tiny") == bundled / "org" / "tiny"
    snap = hub / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(ckpts["qwen2"], snap)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc123")
    assert resolve_model_dir("org/tiny") == snap
    shutil.copytree(ckpts["mistral"], home / "models" / "org" / "tiny")
    assert resolve_model_dir("org/tiny") == home / "models" / "org" / "tiny"
    assert AutoModel.from_pretrained("org/tiny").config["model_type"] == "mistral"
    monkeypatch.chdir(ckpts["llama"].parent)
    assert resolve_model_dir("llama") == Path("llama")  # an existing path wins over everything


def test_bundled_dsr1_tiny_resolves_when_present() -> None:
    from dsr1.models.loading import bundled_dir

    if not (bundled_dir() / "dsr1-tiny" / "config.json").is_file():
        pytest.skip("dsr1-tiny is not committed yet (tools/train_tiny.py)")
    assert resolve_model_dir("dsr1-tiny") == bundled_dir() / "dsr1-tiny"


def test_model_loaded_hook_fires_once(ckpts: dict[str, Path]) -> None:
    from dsr1.hookspecs import hookimpl
    from dsr1.registry import PluginRegistry

    seen: list[object] = []

    class Listener:
        @hookimpl
        def dsr1_model_loaded(self, model: object, config: object) -> None:
            seen.append(model)

    registry = PluginRegistry()
    registry.pm.register(Listener())
    model = AutoModel.from_pretrained(ckpts["llama"], registry=registry)
    assert seen == [model]


def test_import_is_cheap() -> None:
    code = "import sys, dsr1.auto; print('dsr1.models.llama' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
