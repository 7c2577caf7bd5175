"""Every bad input of ``dsr1 prune`` is one line on stderr, exit 2, and names what is wrong."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

Prune = Callable[..., tuple[int, str]]

#: (extra arguments, message) for inputs refused before any model is loaded.
CASES: dict[str, tuple[list[str], str]] = {
    "target_one": (["--target-sparsity", "1.0"], "--target-sparsity must be in [0, 1), got 1.0"),
    "target_negative": (["--target-sparsity", "-0.1"], "--target-sparsity must be in [0, 1), got -0.1"),
    "unknown_strategy": (["--pruning-strategy", "magnitud"],
                         "no pruning plugin named 'magnitud'; did you mean 'magnitude'?"),
    "unknown_strategy_far": (["--pruning-strategy", "zzz"], "installed pruning plugins: magnitude, semi24, structured,"),
    "stages_not_increasing": (["--schedule", "progressive", "--stages", "0.3,0.2"],
                              "--stages must be strictly increasing, got 0.3 then 0.2"),
    "stages_repeat": (["--schedule", "progressive", "--stages", "0.2,0.2"],
                      "--stages must be strictly increasing, got 0.2 then 0.2"),
    "stages_past_target": (["--schedule", "progressive", "--stages", "0.2,0.6"],
                           "--stages goes to 0.6, past --target-sparsity 0.5"),
    "stages_not_numbers": (["--schedule", "progressive", "--stages", "0.1,half"],
                           "--stages must be comma-separated numbers"),
    "stages_need_progressive": (["--stages", "0.1,0.5"], "--stages needs --schedule progressive"),
    "stage_out_of_range": (["--schedule", "progressive", "--stages", "0,0.5"], "--stages must each be in (0, 1), got 0.0"),
    "min_params_zero": (["--min-params", "0"], "--min-params must be in (0, 1], got 0.0"),
    "min_params_above_one": (["--min-params", "1.5"], "--min-params must be in (0, 1], got 1.5"),
    "below_min_params": (["--target-sparsity", "0.8"],
                         "--target-sparsity 0.8 keeps 20% of the parameters, below --min-params 0.3"),
    "semi24_stage_below_half": (["--pruning-strategy", "semi24", "--schedule", "progressive", "--stages", "0.3,0.5"],
                                "strategy 'semi24' prunes at least 50% of a layer; stage 0.3 is below that"),
    "semi24_target_below_half": (["--pruning-strategy", "semi24", "--target-sparsity", "0.3"],
                                 "strategy 'semi24' prunes at least 50% of a layer; stage 0.3 is below that"),
    "unknown_option": (["--option", "scop=global"], "unknown config key 'pruning.options.scop'; did you mean 'scope'"),
    "bad_option_value": (["--option", "scope=model"], "pruning.options.scope"),
    "option_syntax": (["--option", "scope"], "--option takes KEY=VALUE, got 'scope'"),
    "negative_recover": (["--recover-steps", "-1"], "--recover-steps must be ≥ 0, got -1"),
    "model_missing_path": (["--model", "/nonexistent/model-dir"], "model path '/nonexistent/model-dir' does not exist"),
    "model_name_not_found": (["--model", "bert-base"], "model 'bert-base' not found; looked in: path 'bert-base';"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_before_loading(case: str, prune: Prune, tmp_path: Path) -> None:
    extra, message = CASES[case]
    argv = ["--model", "dsr1-tiny", "--target-sparsity", "0.5", "--output-dir", tmp_path / "out", *extra]
    code, err = prune(*argv)
    assert code == 2
    assert err.startswith("dsr1: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists(), "a refused run must not create the output dir"


def test_output_dir_not_empty(prune: Prune, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stage-0.50").mkdir()
    code, err = prune("--model", "dsr1-tiny", "--target-sparsity", "0.5", "--output-dir", out)
    assert code == 2 and f"output dir '{out}' holds no .dsr1-output.json marker" in err  # not known to be ours
    (out / "notes.txt").write_text("mine")
    code, err = prune("--model", "dsr1-tiny", "--target-sparsity", "0.5", "--output-dir", out, "--overwrite")
    assert code == 2 and "holds files dsr1 prune did not write (notes.txt)" in err
    assert (out / "notes.txt").read_text() == "mine" and (out / "stage-0.50").is_dir()


def test_output_dir_is_a_file(prune: Prune, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    code, err = prune("--model", "dsr1-tiny", "--target-sparsity", "0.5", "--output-dir", tmp_path / "f")
    assert code == 2 and "output dir" in err and "is a file" in err


def test_model_not_loadable(prune: Prune, tmp_path: Path, tiny_llama: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_llama / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    code, err = prune("--model", broken, "--target-sparsity", "0.5", "--output-dir", tmp_path / "out")
    assert code == 2 and "is missing" in err and err.count("\n") == 1
    (broken / "model.safetensors").write_bytes(b"\x01")
    code, err = prune("--model", broken, "--target-sparsity", "0.5", "--output-dir", tmp_path / "out")
    assert code == 2 and "is truncated or corrupt" in err
    no_config = tmp_path / "empty"
    no_config.mkdir()
    code, err = prune("--model", no_config, "--target-sparsity", "0.5", "--output-dir", tmp_path / "out")
    assert code == 2 and "has no config.json" in err
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(prune: Prune, tmp_path: Path) -> None:
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = prune("--model", model, "--target-sparsity", "0.5", "--output-dir", tmp_path / "out")
    assert code == 2 and "dsr1 prune works on llama-family (llama, mistral, qwen2) and bert models" in err
    assert "model_type 'gpt2'" in err


@pytest.mark.parametrize(("content", "message"), [
    (None, "calibration file '{path}' does not exist"),
    ("", "calibration file '{path}' is empty"),
    ("a few words", "calibration text '{path}' is too short: "),
])
def test_wanda_without_usable_calibration(content: str | None, message: str, prune: Prune, tmp_path: Path,
                                          tiny_llama: Path) -> None:
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_text(content)
    code, err = prune("--model", tiny_llama, "--target-sparsity", "0.5", "--pruning-strategy", "wanda",
                      "--calibration", path, "--output-dir", tmp_path / "out")
    assert code == 2 and message.format(path=path) in err, err
    if content == "a few words":
        assert "at least 64 are needed" in err


def test_model_without_tokenizer(prune: Prune, tmp_path: Path, tiny_llama: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).symlink_to(tiny_llama / name)
    code, err = prune("--model", bare, "--target-sparsity", "0.5", "--output-dir", tmp_path / "out")
    assert code == 2 and "has no tokenizer.json; dsr1 prune needs one" in err
