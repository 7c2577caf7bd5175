"""The SDK's CPU RMSNorm (:func:`dsr1_sdk.kernels.cpu.rms_norm`) against transformers' formulation, and the core
norm that calls it for eager CPU decode.

Half-precision inputs give the formulation's result bit for bit (the sum is fp32 either way, and the rounding
steps are the same); fp32 can differ by the last bit, because the sum adds in another order.
"""
from __future__ import annotations

import pytest
import torch

from dsr1.models.common import RMSNorm
from dsr1_sdk import Dsr1Error
from dsr1_sdk.kernels import cpu

REASON = cpu.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CPU kernels unavailable: {REASON}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("w_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", DTYPES, ids=str)
def test_matches_the_formulation(x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1, 771), (3, 2, 64), (5, 8)]:  # 771: no multiple of the 8 partial sums
        x = (torch.randn(shape, generator=g) * 3).to(x_dtype)
        w = torch.randn(shape[-1], generator=g).to(w_dtype)
        got, want = cpu.rms_norm(x, w, 1e-5), _reference(x, w, 1e-5)
        assert got.dtype == want.dtype and got.shape == want.shape
        if x_dtype == torch.float32:  # the sum's last bit moves the normalized value by an ulp or two
            torch.testing.assert_close(got, want, atol=1e-6, rtol=2e-6)
        else:
            assert torch.equal(got, want), f"{x_dtype} x, {w_dtype} weight, {shape}"


def test_strided_input_and_no_rows() -> None:
    x = torch.randn(4, 16).t()  # (16, 4), not contiguous
    torch.testing.assert_close(cpu.rms_norm(x, torch.ones(4), 1e-6), _reference(x, torch.ones(4), 1e-6),
                               atol=0, rtol=2e-6)
    assert cpu.rms_norm(torch.empty(0, 8), torch.ones(8), 1e-6).shape == (0, 8)


@pytest.mark.parametrize(("args", "message"), [
    ((torch.randn(2, 8), torch.ones(7)), "the weight must be (8,)"),
    ((torch.randn(2, 8), torch.ones(2, 8)), "the weight must be (8,)"),
    ((torch.ones(2, 8, dtype=torch.int64), torch.ones(8)), "takes float x"),
])
def test_bad_input_is_one_line(args: tuple[torch.Tensor, torch.Tensor], message: str) -> None:
    with pytest.raises(Dsr1Error) as err:
        cpu.rms_norm(*args, eps=1e-6)
    assert message in str(err.value) and "\n" not in str(err.value)


def _calls(fn: object) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()  # type: ignore[operator]
    return sum(e.count for e in prof.key_averages() if e.key == "dsr1_sdk::cpu_rms_norm")


def test_the_core_norm_calls_it_for_eager_decode_only() -> None:
    """dsr1's RMSNorm: decode steps (B, 1, C) go to the kernel whatever B; prefill (and any other shape) and
    compiled code keep torch's."""
    norm = RMSNorm(64, eps=1e-5)
    norm.weight.data = torch.randn(64)
    decode, prefill = torch.randn(2, 1, 64), torch.randn(1, 2, 64)
    assert _calls(lambda: norm(decode)) == 1 and _calls(lambda: norm(torch.randn(33, 1, 64))) == 1
    assert _calls(lambda: norm(prefill)) == 0 and _calls(lambda: norm(torch.randn(2, 64))) == 0
    torch.testing.assert_close(norm(decode), _reference(decode, norm.weight, 1e-5), atol=0, rtol=2e-6)
    compiled = torch.compile(norm, backend="eager")
    assert _calls(lambda: compiled(decode)) == 0
    torch.testing.assert_close(compiled(decode), norm(decode), atol=0, rtol=2e-6)
