"""int8 weight-only against the SDK's conformance kit, and its kernel against the reference."""
from __future__ import annotations

import pytest
import torch

from dsr1.registry import PluginRegistry
from dsr1_quant_int8 import Int8WeightOnlyLinear
from dsr1_sdk.reference.quant import fake_quant_per_channel, sqnr
from dsr1_sdk.testing import QuantConformance


class TestInt8(QuantConformance):
    plugin = "int8"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 64), (3, 5, 64)])
def test_kernel_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = Int8WeightOnlyLinear(linear, dtype)
    x = torch.randn(*shape, generator=gen).to(dtype)
    got = layer(x)
    assert got.shape == (*shape[:-1], 48) and got.dtype == dtype
    assert sqnr(layer.reference(x), got) > 40


def test_fp32_scales_match_the_sdk_reference() -> None:
    """With fp32 scales the round trip is the SDK's per-channel reference."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    policy = PluginRegistry().load("quant", "int8").make({"compute_dtype": "fp32"})
    assert sqnr(fake_quant_per_channel(w), policy.quantize_tensor(w)) > 100
