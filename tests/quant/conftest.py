"""Fixtures of the quantization tests: dsr1-tiny quantized once per module, an isolated DSR1_HOME."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def quant_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Offline, private caches, no DSR1_* family overrides from the caller's shell; undone afterwards."""
    saved = dict(os.environ)
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "DSR1_HOME": str(tmp_path_factory.mktemp("dsr1home"))})
    for var in [v for v in os.environ if v.startswith("DSR1_") and v not in ("DSR1_HOME",)]:
        os.environ.pop(var)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dsr1-tiny written by ``dsr1 quantize --quant int8``."""
    from dsr1.cli import main

    out = tmp_path_factory.mktemp("q") / "tiny-int8"
    assert main(["quantize", "--model", "dsr1-tiny", "--quant", "int8", "--output-dir", str(out)]) == 0
    return out


IDS = torch.randint(3, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
