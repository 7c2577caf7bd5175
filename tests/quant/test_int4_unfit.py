"""int4 on the bundled model (issue 20): layers no group size fits stay in floating point by default,
with one warning naming them; ``unfit: refuse`` keeps the one-line error."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from dsr1.auto import AutoModel
from dsr1.cli import main

DOWN = [f"model.layers.{i}.mlp.down_proj" for i in range(4)]  # 688 inputs: 32, 64 and 128 do not divide it


def test_quantize_int4_of_the_bundled_model_keeps_what_does_not_fit(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["quantize", "--model", "dsr1-tiny", "--quant", "int4", "--output-dir", str(tmp_path / "q"),
                     "--json"]) == 0
    ours = [w for w in caught if "int4 keeps" in str(w.message)]
    assert len(ours) == 1 and all(name in str(ours[0].message) for name in DOWN)
    report = json.loads(capsys.readouterr().out)
    assert report["quantized_layers"] == report["linear_layers"] - len(DOWN)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["options"]["skip"] == DOWN  # the checkpoint says which stayed float
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="int4 keeps")  # reloading decides nothing again
        again = AutoModel.from_pretrained(tmp_path / "q")
    assert type(again.get_submodule(DOWN[0])).__name__ == "Linear"


def test_unfit_refuse_is_the_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["quantize", "--model", "dsr1-tiny", "--quant", "int4", "--option", "unfit=refuse",
                 "--output-dir", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsr1: error: int4 group_size 64 does not divide the input dim 688 of layer "
                          "'model.layers.0.mlp.down_proj'") and "\n" not in err
