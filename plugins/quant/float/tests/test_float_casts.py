"""The fp32/fp16/bf16 cast policies against the SDK's conformance kit, and their details."""
from __future__ import annotations

import pytest
import torch

from dsr1.config import load_config
from dsr1.registry import PluginRegistry
from dsr1_sdk.testing import QuantConformance


class TestFp32(QuantConformance):
    plugin = "fp32"


class TestFp16(QuantConformance):
    plugin = "fp16"


class TestBf16(QuantConformance):
    plugin = "bf16"


def test_one_module_three_entry_points() -> None:
    registry = PluginRegistry()
    specs = {name: registry.load("quant", name) for name in ("fp32", "fp16", "bf16")}
    assert {registry.origin("quant", n).distribution for n in specs} == {"dsr1-quant-float"}
    assert [specs[n].impl.dtype for n in ("fp32", "fp16", "bf16")] == [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_quantize_casts_floats_and_keeps_integer_buffers(name: str, dtype: torch.dtype) -> None:
    model = torch.nn.Linear(4, 4)
    model.register_buffer("position_ids", torch.arange(4))
    model.register_buffer("inv_freq", torch.ones(2))
    policy = PluginRegistry().load("quant", name).make()
    assert policy.quantize_(model) is model
    assert model.weight.dtype == dtype and model.inv_freq.dtype == dtype
    assert model.position_ids.dtype == torch.int64
    assert policy.compute_dtype() == dtype


def test_fp16_overflow_is_inside_the_declared_bound() -> None:
    policy = PluginRegistry().load("quant", "fp16").make()
    w = torch.tensor([[1e5, 1.0, 1e-9]])
    assert bool(((policy.quantize_tensor(w) - w).abs() <= policy.error_bound(w)).all())


def test_hardware_precision_selects_the_cast() -> None:
    config = load_config({"hardware": {"type": "cpu", "precision": "bf16"}})
    choice = config.choice("quant")
    assert choice is not None and choice.name == "bf16"
    assert PluginRegistry().make("quant", choice).compute_dtype() == torch.bfloat16
