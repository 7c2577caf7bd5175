"""Every bad input of the precision-policies issue is a one-line error (exit 2, no traceback)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsr1.cli import main
from dsr1.errors import Dsr1Error
from dsr1.models.loading import resolve_model_dir
from dsr1.registry import PluginRegistry
from dsr1_sdk.testing.quant import TinyMLP


def error_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsr1: error: ") and "\n" not in err, err
    return err


def quantize(tmp_path: Path, *extra: str) -> list[str]:
    return ["quantize", "--model", "dsr1-tiny", "--output-dir", str(tmp_path / "out"), *extra]


def test_unknown_quant_name_lists_the_closest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = error_line(capsys, *quantize(tmp_path, "--quant", "int9"))
    assert "no quant plugin named 'int9'; did you mean 'int8' or 'int4'?" in err
    assert "pip install" not in err  # no guessed distribution name for a name nobody publishes


def test_group_size_that_does_not_divide_names_the_layer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = error_line(capsys, *quantize(tmp_path, "--quant", "int4", "--option", "group_size=32",
                                       "--option", "unfit=refuse"))
    assert ("int4 group_size 32 does not divide the input dim 688 of layer 'model.layers.0.mlp.down_proj'; "
            "no group size of 32/64/128 divides it: keep the layer in floating point with options.skip") in err
    assert not (tmp_path / "out").exists()


def test_group_size_outside_32_64_128(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = error_line(capsys, *quantize(tmp_path, "--quant", "int4", "--option", "group_size=48"))
    assert "quant.options.group_size" in err and "32, 64 or 128" in err


def test_fp8_without_a_gpu_that_has_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = error_line(capsys, *quantize(tmp_path, "--quant", "fp8"))
    assert "fp8 e4m3 needs an NVIDIA GPU of compute capability 8.9+ (Ada, Hopper)" in err and "use int8" in err


def test_int4_on_a_device_without_a_kernel_says_which_and_what_instead() -> None:
    policy = PluginRegistry().load("quant", "int4").make({"group_size": 32})
    with pytest.raises(Dsr1Error, match=r"^int4 has no kernel on meta; use int8$"):
        policy.quantize_(TinyMLP().to("meta"))
    assert policy.validate("npu") == ["int4 has no kernel on npu; use int8"]


def test_dynamic_cannot_be_written_ahead_of_time(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    err = error_line(capsys, *quantize(tmp_path, "--quant", "dynamic"))
    assert "picks int8 layers at run time" in err and "--quant int8" in err


def test_output_dir_rules(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert "holds files dsr1 quantize did not write (keep.txt)" in error_line(capsys, *quantize(tmp_path, "--quant",
                                                                                               "int8"))
    assert "--option takes KEY=VALUE" in error_line(capsys, "quantize", "--model", "dsr1-tiny", "--quant", "int8",
                                                     "--output-dir", str(tmp_path / "new"), "--option", "x")
    tiny = str(resolve_model_dir("dsr1-tiny"))
    assert "is the model dir itself" in error_line(capsys, "quantize", "--model", tiny, "--quant", "int8",
                                                   "--output-dir", tiny)


def test_thresholds_out_of_range_through_generate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "dynamic.json"
    for key, value in (("sqnr_threshold_db", 150), ("guard_agreement", 1.5), ("warmup_steps", 0)):
        config.write_text(json.dumps({"quant": {"name": "dynamic", "options": {key: value}}}))
        err = error_line(capsys, "generate", "--config", str(config), "--max-new-tokens", "2", "hello")
        assert f"quant.options.{key}" in err


def test_generate_json_shows_the_precision_map(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "dynamic.json"
    config.write_text(json.dumps({"quant": {"name": "dynamic", "options": {"warmup_steps": 3}}}))
    assert main(["generate", "--json", "--config", str(config), "--max-new-tokens", "6", "The Python"]) == 0
    report = json.loads(capsys.readouterr().out)
    precision = report["precision_map"]
    assert len(precision) == 17 and set(precision.values()) == {"int8"}  # all measure above 30 dB on dsr1-tiny
    switches = report["precision_switches"]
    assert len(switches) == 17 and switches[0]["event"] == "quant.switch" and switches[0]["step"] == 3
    assert report["pipeline"]["quant"]["name"] == "dynamic"


def test_generate_json_of_a_static_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--json", "--max-new-tokens", "3", "The Python"]) == 0
    assert "precision_map" not in json.loads(capsys.readouterr().out)  # no quant policy: report unchanged
    torch.manual_seed(0)
