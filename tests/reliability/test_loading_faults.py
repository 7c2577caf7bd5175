"""A model directory is user input: FIFOs, loops, dangling links, unreadable files and NaN weights.

Each fault is a one-line :class:`Dsr1Error` naming the path and the cause (``dsr1: error: ...``
and exit 2 from the CLI), and nothing hangs: the cases that used to block forever (a FIFO in
place of a file) run under a guard that fails the test instead of hanging the suite.

Tests run as root, where permission bits do not stop reads, so unreadability is simulated by
making ``os.open`` / ``os.stat`` / ``os.listdir`` raise ``PermissionError`` for the path.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsr1.auto import AutoModel, AutoTokenizer
from dsr1.errors import Dsr1Error
from dsr1.models.checkpoint import CheckpointReader
from dsr1.models.loading import bundled_dir

TINY = bundled_dir() / "dsr1-tiny"
GUARD_S = 60  # far above any load of dsr1-tiny; reached only by a hang


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DSR1_PLUGINS", raising=False)
    monkeypatch.setenv("DSR1_OFFLINE", "1")  # a name that is not found must not reach for the network
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A copy of dsr1-tiny whose weights are a symlink to the bundled file (cheap; replace it to damage it)."""
    out = tmp_path / "tiny"
    out.mkdir()
    for f in TINY.iterdir():
        if f.name == "model.safetensors":
            os.symlink(f, out / f.name)
        else:
            shutil.copyfile(f, out / f.name)
    return out


def guarded(fn: Callable[[], Any], fifo: Path | None = None) -> Any:
    """``fn()`` in a thread; fail (and unblock a reader stuck on ``fifo``) if it does not finish."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(GUARD_S)
    if thread.is_alive():
        if fifo is not None:  # give the blocked open() its writer, so the thread can end
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"hung: still running after {GUARD_S} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def load_error(path: Path | str, fifo: Path | None = None, **kwargs: Any) -> str:
    with pytest.raises(Dsr1Error) as err:
        guarded(lambda: AutoModel.from_pretrained(path, **kwargs), fifo)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``dsr1 ARGS`` in a subprocess; the timeout turns a hang into a failure."""
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "dsr1.cli", *args], capture_output=True, text=True,
                          env=full, timeout=GUARD_S)


def assert_one_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("dsr1: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr


# --- non-regular files --------------------------------------------------------------------------

FIFO_CASES = {
    "weights": "model.safetensors",
    "config": "config.json",
    "tokenizer": "tokenizer.json",
    "tokenizer config": "tokenizer_config.json",
    "generation config": "generation_config.json",
}


@pytest.mark.parametrize("case", FIFO_CASES)
def test_fifo_in_place_of_a_model_file_is_refused(tiny: Path, case: str) -> None:
    target = tiny / FIFO_CASES[case]
    target.unlink()
    os.mkfifo(target)
    msg = load_error(tiny, fifo=target)
    assert repr(str(target)) in msg and "is a FIFO (named pipe), not a regular file" in msg


def test_fifo_shard_and_index_are_refused(tiny: Path) -> None:
    (tiny / "model.safetensors").unlink()
    shard = tiny / "model-00001-of-00001.safetensors"
    os.mkfifo(shard)
    index = tiny / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": shard.name}}))
    assert "is a FIFO" in load_error(tiny, fifo=shard)
    index.unlink()  # no index: the shard is found by listing the directory
    assert "is a FIFO" in load_error(tiny, fifo=shard)
    shard.unlink()
    os.mkfifo(index)
    assert f"weights index {str(index)!r} is a FIFO" in load_error(tiny, fifo=index)


def test_fifo_pickle_checkpoint_is_refused(tiny: Path) -> None:
    (tiny / "model.safetensors").unlink()
    os.mkfifo(tiny / "pytorch_model.bin")
    assert "is a FIFO" in load_error(tiny, fifo=tiny / "pytorch_model.bin", allow_pickle=True)


def test_fifo_tokenizer_is_refused_by_autotokenizer(tiny: Path) -> None:
    (tiny / "tokenizer.json").unlink()
    os.mkfifo(tiny / "tokenizer.json")
    with pytest.raises(Dsr1Error, match="tokenizer file .* is a FIFO"):
        guarded(lambda: AutoTokenizer.from_pretrained(tiny), tiny / "tokenizer.json")


def test_fifo_weights_from_the_cli_is_one_line(tiny: Path) -> None:
    (tiny / "model.safetensors").unlink()
    os.mkfifo(tiny / "model.safetensors")
    proc = cli("generate", "--model", str(tiny), "--max-new-tokens", "1", "hello")
    assert_one_line(proc, "model.safetensors", "is a FIFO")


def test_directory_in_place_of_weights_or_config(tiny: Path) -> None:
    (tiny / "model.safetensors").unlink()
    (tiny / "model.safetensors").mkdir()
    msg = load_error(tiny)
    assert "weights file" in msg and "is a directory, not a regular file" in msg
    (tiny / "config.json").unlink()
    (tiny / "config.json").mkdir()
    assert "config.json' is a directory, not a regular file" in load_error(tiny)


def test_model_path_that_is_a_fifo(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "m")
    assert "is a FIFO (named pipe); pass the directory that holds config.json" in load_error(tmp_path / "m")


# --- links ----------------------------------------------------------------------------------------

def test_symlink_loop_as_the_model_dir(tmp_path: Path) -> None:
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    msg = load_error(tmp_path / "loop")
    assert f"model path {str(tmp_path / 'loop')!r}" in msg and "symlink loop" in msg


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_symlink_loop_in_the_model_dir(tiny: Path, name: str) -> None:
    (tiny / name).unlink()
    os.symlink(tiny / "a", tiny / name)
    os.symlink(tiny / name, tiny / "a")
    msg = load_error(tiny)
    assert repr(str(tiny / name)) in msg and "symlink loop" in msg


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_dangling_symlink_in_the_model_dir(tiny: Path, name: str) -> None:
    (tiny / name).unlink()
    os.symlink(tiny / "gone", tiny / name)
    msg = load_error(tiny)
    assert repr(str(tiny / name)) in msg and "dangling symlink" in msg and "gone" in msg


def test_dangling_symlink_as_the_model_dir(tmp_path: Path) -> None:
    os.symlink(tmp_path / "moved-away", tmp_path / "m")
    msg = load_error(tmp_path / "m")
    assert f"model path {str(tmp_path / 'm')!r} is a dangling symlink" in msg


def test_symlink_loop_as_dsr1_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    os.symlink(home, home)
    monkeypatch.setenv("DSR1_HOME", str(home))
    msg = load_error("some-model")
    assert "DSR1_HOME path" in msg and str(home) in msg and "symlink loop" in msg
    proc = cli("generate", "--model", "some-model", "hi", env={"DSR1_HOME": str(home), "DSR1_OFFLINE": "1"})
    assert_one_line(proc, "symlink loop")


# --- unreadable (simulated: tests run as root) ------------------------------------------------------

def _deny(monkeypatch: pytest.MonkeyPatch, name: str, path: Path, inside: bool = False) -> None:
    """Make ``os.<name>`` raise PermissionError for ``path`` (or, ``inside``, for what is in it)."""
    real = getattr(os, name)
    prefix = str(path) + os.sep if inside else str(path)

    def denied(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(os.fspath(path)).startswith(prefix):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, name, denied)


def test_unreadable_weights_file(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _deny(monkeypatch, "open", tiny / "model.safetensors")
    msg = load_error(tiny)
    assert f"cannot read weights file {str(tiny / 'model.safetensors')!r}: permission denied" in msg


def test_unreadable_model_dir(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _deny(monkeypatch, "stat", tiny, inside=True)  # no search permission: nothing inside can be reached
    msg = load_error(tiny)
    assert f"cannot read model file {str(tiny / 'config.json')!r}: permission denied" in msg


def test_unlistable_model_dir(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tiny / "model.safetensors").unlink()  # the sharded case lists the directory
    os.symlink(TINY / "model.safetensors", tiny / "model-00001-of-00001.safetensors")
    _deny(monkeypatch, "listdir", tiny)
    assert f"cannot list model directory {str(tiny)!r}: permission denied" in load_error(tiny)


def test_unreadable_dsr1_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("DSR1_HOME", str(home))
    _deny(monkeypatch, "stat", home, inside=True)
    msg = load_error("some-model")
    assert "DSR1_HOME path" in msg and str(home) in msg and "permission denied" in msg


# --- NaN / Inf weights --------------------------------------------------------------------------

POISONED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def poisoned(tiny: Path) -> Path:
    (tiny / "model.safetensors").unlink()
    tensors = load_file(str(TINY / "model.safetensors"))
    w = tensors[POISONED]
    w[3, 5], w[7, 1], w[0, 0] = float("nan"), float("inf"), float("-inf")
    save_file(tensors, str(tiny / "model.safetensors"), metadata={"format": "pt"})
    return tiny


def test_nan_weights_are_refused_naming_the_tensor(poisoned: Path) -> None:
    msg = load_error(poisoned)
    assert "holds NaN/Inf" in msg and repr(POISONED) in msg and "1 NaN and 2 Inf" in msg
    assert "allow_nonfinite=True" in msg


def test_nan_weights_from_the_cli_is_one_line(poisoned: Path) -> None:
    proc = cli("generate", "--model", str(poisoned), "--max-new-tokens", "2", "hello")
    assert_one_line(proc, "holds NaN/Inf", POISONED)


def test_allow_nonfinite_loads_them_anyway(poisoned: Path) -> None:
    model = AutoModel.from_pretrained(poisoned, allow_nonfinite=True)
    weight = dict(model.named_parameters())
    assert not all(bool(torch.isfinite(p).all()) for p in weight.values())


def test_finite_check_covers_float8_and_skips_integers(tmp_path: Path) -> None:
    fp8 = torch.tensor([1.0, float("nan"), 2.0]).to(torch.float8_e4m3fn)
    save_file({"ints": torch.tensor([-1, 0, 1], dtype=torch.int8), "fp8": fp8, "ok": torch.ones(2)},
              str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    try:
        assert reader.read("ints", None, torch.device("cpu")).tolist() == [-1, 0, 1]
        assert reader.read("ok", torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16
        with pytest.raises(Dsr1Error, match=r"tensor 'fp8' \(model.safetensors\) has 1 NaN and 0 Inf of 3 values"):
            reader.read("fp8", None, torch.device("cpu"))
    finally:
        reader.close()


def test_nan_in_a_quantized_checkpoint_is_refused(tmp_path: Path) -> None:
    """A `dsr1 quantize` dir is read through the same reader: a NaN scale is named like a NaN weight."""
    from dsr1.cli import main

    out = tmp_path / "tiny-int8"
    assert main(["quantize", "--model", str(TINY), "--quant", "int8", "--output-dir", str(out)]) == 0
    tensors = load_file(str(out / "model.safetensors"))
    scales = sorted(n for n in tensors if n.endswith(".scales"))[0]
    tensors[scales][0] = float("nan")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    msg = load_error(out)
    assert "holds NaN/Inf" in msg and repr(scales) in msg and "1 NaN and 0 Inf" in msg


def test_a_cast_that_overflows_is_named_as_such(tmp_path: Path) -> None:
    save_file({"big": torch.tensor([1.0, 1e6, -1e6])}, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    try:
        assert reader.read("big", torch.bfloat16, torch.device("cpu"))[1] > 9e5  # bfloat16 has float32's range
        with pytest.raises(Dsr1Error, match=r"'big' .* values beyond the range of float16 .*bfloat16 or float32"):
            reader.read("big", torch.float16, torch.device("cpu"))
    finally:
        reader.close()


# --- config.json fields of the wrong type or out of range ------------------------------------------------

#: field → (bad value, the message). They gave tracebacks (int("big"), int(None)) or were taken silently
#: (4.5 heads truncated, a negative eps, an unknown dtype name, a string eos id).
CONFIG_FIELDS: dict[str, tuple[Any, str]] = {
    "vocab_size": ("big", "config.json vocab_size must be a positive integer, got 'big'"),
    "hidden_size": (None, "config.json hidden_size must be a positive integer, got None"),
    "num_attention_heads": (4.5, "config.json num_attention_heads must be a positive integer, got 4.5"),
    "num_hidden_layers": (0, "config.json num_hidden_layers must be a positive integer, got 0"),
    "max_position_embeddings": ("abc", "config.json max_position_embeddings must be a positive integer, got 'abc'"),
    "rope_theta": ("abc", "config.json rope_theta must be a positive number, got 'abc'"),
    "rope_parameters": ({"rope_theta": "abc"}, "config.json rope_parameters.rope_theta must be a positive number, "
                                               "got 'abc'"),
    "rope_scaling": ("x", "config.json rope_scaling must be an object (or null), got 'x'"),
    "rms_norm_eps": (-1, "config.json rms_norm_eps must be a positive number, got -1"),
    "tie_word_embeddings": ("false", "config.json tie_word_embeddings must be true or false, got 'false'"),
    "torch_dtype": ("float33", "config.json torch_dtype must be a torch dtype name or 'auto', got 'float33'; "
                               "did you mean 'float32'"),
    "dtype": ("float33", "config.json dtype must be a torch dtype name or 'auto', got 'float33'"),
    "eos_token_id": ("x", "config.json eos_token_id must be a token id (an integer >= 0) or a list of them, "
                          "got 'x'"),
}


def _edit_config(model_dir: Path, **fields: Any) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("field", sorted(CONFIG_FIELDS))
def test_a_config_field_of_the_wrong_type_is_one_line(tiny: Path, field: str) -> None:
    value, message = CONFIG_FIELDS[field]
    _edit_config(tiny, **{field: value})
    assert message in load_error(tiny)


def test_a_config_field_of_the_wrong_type_from_the_cli(tiny: Path) -> None:
    _edit_config(tiny, vocab_size="big")
    assert_one_line(cli("generate", "--model", str(tiny), "--max-new-tokens", "2", "hi"),
                    "config.json vocab_size must be a positive integer, got 'big'")


@pytest.mark.parametrize("fields", [{"torch_dtype": "torch.bfloat16"}, {"dtype": "auto"}, {"torch_dtype": None},
                                    {"eos_token_id": [1, 2]}, {"num_attention_heads": 4.0}, {"head_dim": None}])
def test_valid_spellings_still_load(tiny: Path, fields: dict[str, Any]) -> None:
    _edit_config(tiny, **fields)
    assert AutoModel.from_pretrained(tiny).args.n_heads == 4


def test_a_bad_eos_in_generation_config_is_named(tiny: Path) -> None:
    (tiny / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, "two"]}))
    assert ("generation_config.json eos_token_id must be a token id (an integer >= 0) or a list of them, "
            "got [1, 'two']") in load_error(tiny)


def test_deepseek_and_bert_fields_are_checked_too() -> None:
    from dsr1.models.bert import BertArgs
    from dsr1.models.deepseek import DeepseekArgs

    bert = {"vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16}
    assert BertArgs.from_hf(bert).head_dim == 4
    with pytest.raises(Dsr1Error, match=r"^config.json layer_norm_eps must be a positive number, got 'tiny'$"):
        BertArgs.from_hf({**bert, "layer_norm_eps": "tiny"})
    with pytest.raises(Dsr1Error, match=r"^config.json num_attention_heads must be a positive integer, got 2.5$"):
        BertArgs.from_hf({**bert, "num_attention_heads": 2.5})
    with pytest.raises(Dsr1Error, match=r"^config.json kv_lora_rank must be a positive integer, got '16'$"):
        DeepseekArgs.from_hf({"model_type": "deepseek_v2", **bert, "kv_lora_rank": "16", "qk_nope_head_dim": 4,
                              "qk_rope_head_dim": 4, "v_head_dim": 4})
