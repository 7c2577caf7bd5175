"""int8 weight-only against the SDK's conformance kit, and its kernel against the reference."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

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


def test_cuda_triton_kernel_needs_triton() -> None:
    """``cuda_kernel: triton`` (the default) is refused on CUDA by ``validate`` when triton is missing,
    naming the package and the alternative; other kernels and devices are accepted."""
    policy = PluginRegistry().load("quant", "int8").make()
    reasons = policy.validate("cuda")
    if importlib.util.find_spec("triton") is None:
        assert len(reasons) == 1 and "pip install triton" in reasons[0] and "cuda_kernel: dequant" in reasons[0]
    else:
        assert reasons == []
    assert policy.validate("cpu") == []
    assert PluginRegistry().load("quant", "int8").make({"cuda_kernel": "dequant"}).validate("cuda") == []


_INTERPRETED = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from dsr1_quant_int8.triton_kernels import weight_only_mm
g = torch.Generator().manual_seed(0)
worst = 0.0
# (rows, out, in): one row (GEMV kernel, masked and unmasked tiles), several rows (tl.dot kernel;
# fp16 only: the interpreter's bf16 dot is wrong, the GPU's is not)
for (m, n, k), dtype in [((1, 48, 64), torch.bfloat16), ((1, 37, 300), torch.float16), ((1, 32, 128), torch.float16),
                         ((5, 37, 300), torch.float16), ((17, 40, 96), torch.float16)]:
    x = torch.randn(m, k, generator=g).to(dtype)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, generator=g) / 100 + 1e-3).to(dtype)
    y = weight_only_mm(x, q, s)
    assert y.shape == (m, n) and y.dtype == dtype
    want = x.float() @ (q.float() * s.float()[:, None]).T
    worst = max(worst, float((y.float() - want).abs().max() / want.abs().max()))
# a strided x (the last position of a (B, T, K) tensor) is read row by row correctly
x = torch.randn(3, 5, 64, generator=g).to(torch.float16)[:, -1]
q = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
s = (torch.rand(32, generator=g) / 100 + 1e-3).to(torch.float16)
want = x.float() @ (q.float() * s.float()[:, None]).T
worst = max(worst, float((weight_only_mm(x, q, s).float() - want).abs().max() / want.abs().max()))
# the int8 -> fp32 bit trick is exact for every code: a one-hot row picks one column of q
q = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).reshape(16, 16).contiguous()
for j in range(16):
    x = torch.zeros(1, 16, dtype=torch.float16)
    x[0, j] = 1
    assert torch.equal(weight_only_mm(x, q, torch.ones(16, dtype=torch.float16))[0].float(), q[:, j].float())
print(worst)
"""


def _triton_version() -> tuple[int, ...] | None:
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib.metadata import version

    return tuple(int(p) for p in version("triton").split(".")[:2] if p.isdigit())


@pytest.mark.skipif(_triton_version() is None, reason="triton is not installed (CUDA builds of torch ship it)")
@pytest.mark.skipif((_triton_version() or (99,)) < (3, 9),
                    reason="Triton's interpreter before 3.9 fails on a loop bounded by a scalar argument with recent "
                           "numpy (TypeError in range(0, K, BLOCK_K); seen with triton 3.6): the GPU test covers it")
def test_triton_kernels_in_the_interpreter() -> None:
    """The CUDA kernels' code, run on the CPU by Triton's interpreter (its own process: the variable
    must be set before triton is imported), against the dequantized weight's product."""
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 65])
def test_triton_kernel_on_cuda(rows: int) -> None:
    """Every row count a layer can see on CUDA (65 goes to dequantize + cuBLAS) agrees with the reference."""
    linear = torch.nn.Linear(256, 96).cuda()
    layer = Int8WeightOnlyLinear(linear, torch.bfloat16, cuda_kernel="triton")
    x = torch.randn(rows, 256, device="cuda").to(torch.bfloat16)
    assert sqnr(layer.reference(x).float(), layer(x).float()) > 40
