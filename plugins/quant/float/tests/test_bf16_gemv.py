"""bf16 ``cuda_kernel: triton``: the linear layers become :class:`GemvLinear` (same parameters), whose
one-row CUDA calls run the SDK's Triton GEMV; elsewhere it is refused in one line. fp16 and bf16
``cpu_kernel: gemv``: CPU calls run the SDK's CPU GEMV."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsr1_quant_float import Bf16Cast, Bf16Options, Fp16Cast, Fp16Options, GemvLinear
from dsr1_sdk import Dsr1Error
from dsr1_sdk.kernels import cpu as cpu_kernels


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


@pytest.mark.skipif(cpu_kernels.unavailable() is not None, reason="the SDK's CPU GEMV cannot be built here")
@pytest.mark.parametrize("policy", [Fp16Cast(), Bf16Cast()], ids=["fp16", "bf16"])
def test_cpu_calls_run_the_sdk_gemv(policy: Fp16Cast | Bf16Cast, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cpu_kernel: gemv`` (the default): decode-sized CPU calls go through the SDK's CPU GEMV, as do larger ones
    where torch has no native kernel for the dtype, and match the fp32 product of the cast weights."""
    calls: list[int] = []
    real = cpu_kernels.gemv

    def spy(x: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_kernels, "gemv", spy)
    model = policy.quantize_(_model("cpu"))
    layers = [m for m in model if isinstance(m, nn.Linear)]
    assert all(type(m) is GemvLinear and m.cpu_gemv and not m.cuda_triton for m in layers)
    dtype = policy.dtype
    for shape in [(1, 64), (2, 4, 64), (9, 64)]:
        x = torch.randn(*shape).to(dtype)
        h = F.relu(F.linear(x.float(), layers[0].weight.float(), layers[0].bias.float())).to(dtype)
        want = F.linear(h.float(), layers[1].weight.float())
        torch.testing.assert_close(model(x).float(), want, atol=2e-2, rtol=2e-2)
    fast = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16
                else torch.ops.mkldnn._is_mkldnn_fp16_supported())
    assert calls == [1, 1, 8, 8] + ([] if fast else [9, 9])


def test_cpu_kernel_torch_keeps_nn_linear() -> None:
    model = Fp16Cast(Fp16Options(cpu_kernel="torch")).quantize_(_model("cpu"))
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_a_weight_kept_transposed_is_laid_out_for_the_gemv_once() -> None:
    """dsr1's CPU builders keep weights (in, out) under an (out, in) view; the GEMV reads (out, in) rows, and a
    view left as it was would be copied whole on every call (a decode 15x slower, seen on tiny-125m)."""
    model = _model("cpu")
    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t(), requires_grad=False)
            assert not layer.weight.is_contiguous()
    want = model(torch.ones(1, 64).to(torch.bfloat16).float())
    model = Bf16Cast().quantize_(model)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    assert all(type(m) is GemvLinear and m.weight.is_contiguous() for m in layers)
    torch.testing.assert_close(model(torch.ones(1, 64).to(torch.bfloat16)).float(), want, atol=5e-2, rtol=5e-2)
