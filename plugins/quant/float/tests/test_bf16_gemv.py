"""bf16 ``cuda_kernel: triton``: the linear layers become :class:`GemvLinear` (same parameters), whose
one-row CUDA calls run the SDK's Triton GEMV; elsewhere it is refused in one line."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsr1_quant_float import Bf16Cast, Bf16Options, GemvLinear
from dsr1_sdk import Dsr1Error


def _model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False)).to(device)


def test_triton_kernel_off_cuda_is_one_line() -> None:
    with pytest.raises(Dsr1Error) as err:
        Bf16Cast(Bf16Options(cuda_kernel="triton")).quantize_(_model("cpu"))
    assert "runs on CUDA devices, not 'cpu'; set options.cuda_kernel: cublas" in str(err.value)
    assert "\n" not in str(err.value)


def test_gemv_linear_shares_the_parameters_and_computes_the_linear() -> None:
    linear = nn.Linear(64, 96).to(torch.bfloat16)
    gemv = GemvLinear.sharing(linear)
    assert gemv.weight is linear.weight and gemv.bias is linear.bias
    assert list(gemv.state_dict()) == list(linear.state_dict())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(gemv(x), F.linear(x, linear.weight, linear.bias))  # CPU: torch's matmul


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton GEMV runs on CUDA")
def test_one_row_on_cuda_runs_the_gemv_and_matches_cublas() -> None:
    pytest.importorskip("triton")
    model = Bf16Cast(Bf16Options(cuda_kernel="triton")).quantize_(_model("cuda"))
    layers = [m for m in model if isinstance(m, nn.Linear)]
    assert all(type(m) is GemvLinear for m in layers)
    for rows in (1, 4):
        x = torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16)
        want = F.linear(F.relu(F.linear(x, layers[0].weight, layers[0].bias)), layers[1].weight)
        torch.testing.assert_close(model(x), want, atol=2e-2, rtol=2e-2)
