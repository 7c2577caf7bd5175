"""The CLI: version, plugin listing, config check, one-line errors."""
from __future__ import annotations

import json

import pytest

from dsr1 import __version__
from tests.conftest import run_cli


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"dsr1 {__version__}"


@pytest.mark.parametrize(("rank", "args", "code", "out"), [
    ("0", ["--version"], 0, f"dsr1 {__version__}"),  # rank 0 prints, and its output is flushed before os._exit
    ("1", ["--version"], 0, ""),  # other ranks are silent
    ("1", ["generate", "--max-new-tokens", "x"], 2, ""),  # a failing command keeps its code (rank 0 says why)
])
def test_a_launched_rank_leaves_with_its_code(rank: str, args: list[str], code: int, out: str) -> None:
    """Under torchrun (WORLD_SIZE > 1) with torch.distributed imported, ``python -m dsr1`` leaves by os._exit
    after flushing: torch's C++ teardown at exit once aborted a rank whose command had succeeded."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WORLD_SIZE": "2", "RANK": rank, "PYTHONPATH": os.pathsep.join(sys.path)}
    script = "import sys, torch.distributed; sys.argv = ['dsr1', *sys.argv[1:]]; import runpy; " \
             "runpy.run_module('dsr1', run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.strip() == out


def test_plugins_list_json_has_every_family():
    proc = run_cli("plugins", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["families"] == [
        "preprocess", "model", "attention", "device", "quant", "pruning",
        "graph", "pool", "scheduler", "kvcache", "decoding", "monitor",
    ]
    for row in data["plugins"]:
        assert {"family", "name", "distribution", "version", "status", "reason"} <= set(row)


def test_every_family_has_a_working_plugin_from_the_right_distribution():
    data = json.loads(run_cli("plugins", "list", "--json").stdout)
    ok = {(r["family"], r["name"]): r["distribution"] for r in data["plugins"] if r["status"] in ("ok", "unavailable")}
    for family in data["families"]:
        assert any(f == family for f, _ in ok), f"no working {family} plugin"
    for family in ("attention", "device", "quant", "pruning"):
        dists = {d for (f, _), d in ok.items() if f == family}
        assert dists and all(d.startswith(f"dsr1-{family}-") for d in dists), (family, dists)


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("attentoin: sdpa\n", ".yaml", "unknown config key 'attentoin'; did you mean 'attention'?"),
        ("attention: spda\n", ".yaml", "no attention plugin named 'spda'; did you mean 'sdpa'?"),
        ("hardware:\n  type: nvidia\n  optimizer:\n    kernel_fusion: [\n", ".yaml", "YAML syntax error"),
        ("", ".toml", "is empty"),
        ('attention = "sdpa"\n[hardware\n', ".toml", "TOML syntax error"),
    ],
)
def test_config_check_errors_are_one_line(tmp_path, content, suffix, message):
    path = tmp_path / f"c{suffix}"
    path.write_text(content)
    proc = run_cli("config", "check", str(path))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.startswith("dsr1: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_config_check_prints_resolution(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("attention: eager\nhardware:\n  type: cpu\n  optimizer:\n    kernel_fusion: false\n")
    proc = run_cli("config", "check", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["resolved"]["attention"]["name"] == "eager"
    assert report["resolved"]["attention"]["distribution"] == "dsr1-attention-eager"
    assert report["resolved"]["device"]["name"] == "cpu" and report["resolved"]["device"]["available"] is True
    text = run_cli("config", "check", str(path))
    assert "attention   eager (dsr1-attention-eager" in text.stdout


def test_config_check_reports_unavailable_device(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("hardware:\n  type: nvidia\n")
    proc = run_cli("config", "check", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    device = json.loads(proc.stdout)["resolved"]["device"]
    assert device["name"] == "cuda"
    import torch

    if torch.cuda.is_available():
        assert device["available"] is True
    else:
        assert device["available"] is False and "CUDA" in device["reason"]


def test_no_command_prints_help():
    proc = run_cli()
    assert proc.returncode == 2 and "usage: dsr1" in proc.stdout


def test_plugins_new_installs_and_is_selected_by_name(tmp_path):
    import os
    import subprocess
    import sys

    pkg = tmp_path / "dsr1-attention-foo"
    made = run_cli("plugins", "new", "--family", "attention", "--name", "foo", "--dir", str(pkg))
    assert made.returncode == 0, made.stderr
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(pkg)],
        check=True, capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("attention: foo\n")
    check = run_cli("config", "check", str(cfg), "--json", env=env)
    assert check.returncode == 0, check.stderr
    attention = json.loads(check.stdout)["resolved"]["attention"]
    assert (attention["name"], attention["distribution"]) == ("foo", "dsr1-attention-foo")
    gen = run_cli("generate", "--model", "dsr1-tiny", "--config", str(cfg), "--max-new-tokens", "4", "--json",
                  "The Python", env=env)
    assert gen.returncode == 0, gen.stderr
    out = json.loads(gen.stdout)
    assert out["pipeline"]["attention"]["distribution"] == "dsr1-attention-foo"
    assert out["new_tokens"] == 4


def test_plugins_new_refuses_the_name_of_an_installed_plugin(tmp_path, capsys):
    """Its package (dsr1-attention-sdpa) would replace the built-in distribution of that name when installed."""
    from dsr1.cli import main

    assert main(["plugins", "new", "--family", "attention", "--name", "sdpa", "--dir", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "attention plugin 'sdpa' is already installed (distribution dsr1-attention-sdpa)" in err
    assert err.count("\n") == 1 and not (tmp_path / "p").exists()
