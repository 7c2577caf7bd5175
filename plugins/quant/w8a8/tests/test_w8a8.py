"""w8a8 against the SDK's conformance kit, and its int8 × int8 kernel against the reference."""
from __future__ import annotations

import pytest
import torch

from dsr1_quant_w8a8 import W8A8Linear, w8a8_linear
from dsr1_sdk.kernels import cpu as cpu_kernels
from dsr1_sdk.reference.quant import sqnr
from dsr1_sdk.testing import QuantConformance


class TestW8A8(QuantConformance):
    plugin = "w8a8"
    #: activations are quantized too: the whole-model margin is wider than weight-only's.
    model_sqnr_margin_db = 12.0


@pytest.mark.parametrize("shape", [(1, 64), (2, 7, 64)])
def test_kernel_matches_reference(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = W8A8Linear(torch.nn.Linear(64, 32), torch.bfloat16)
    x = torch.randn(*shape, generator=gen).bfloat16()
    got = layer(x)
    assert got.shape == (*shape[:-1], 32) and got.dtype == torch.bfloat16
    assert sqnr(layer.reference(x).float(), got.float()) > 30


def test_integer_accumulation_is_exact() -> None:
    """With integer-valued inputs whose row max is 127 the activation scale is 1: the int32 result is exact."""
    q = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    x = torch.randint(-127, 128, (3, 32)).float()
    x[:, 0] = 127
    y = w8a8_linear(x, q, torch.ones(16))
    assert torch.equal(y, x @ q.float().t())


@pytest.mark.skipif(cpu_kernels.unavailable() is not None, reason="the SDK's CPU GEMV cannot be built here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_decode_runs_the_sdk_gemv(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, 1 to 8 rows go through the SDK's GEMV (9 take torch._int_mm), with the same result as the
    torch formulation bit for bit."""
    calls: list[int] = []
    real = cpu_kernels.gemv

    def spy(x: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args, **kw)  # type: ignore[arg-type]

    layer = W8A8Linear(torch.nn.Linear(200, 67), dtype)  # K, N: no multiple of a vector width
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*shape, generator=gen).to(dtype) for shape in [(1, 200), (2, 4, 200), (9, 200)]]
    # the torch formulation: what every row count ran before the kernel, and still runs past 8 rows
    with monkeypatch.context() as patch:
        patch.setattr(cpu_kernels, "MAX_ROWS", 0)
        torch_path = [layer(x) for x in inputs]
    monkeypatch.setattr(cpu_kernels, "gemv", spy)
    for x, want in zip(inputs, torch_path):
        got = layer(x)
        assert got.shape == (*x.shape[:-1], 67) and got.dtype == dtype and torch.equal(got, want)
    assert calls == [1, 8]
