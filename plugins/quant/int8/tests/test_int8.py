"""int8 weight-only against the SDK's conformance kit, and its kernel against the reference."""
from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_quant_int8 import Int8WeightOnlyLinear
from dsr1_sdk.kernels import INTERPRETER_CASES, run_interpreted
from dsr1_sdk.kernels import cpu as cpu_kernels
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


@pytest.mark.skipif(cpu_kernels.unavailable() is not None, reason="the SDK's CPU GEMV cannot be built here")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_decode_runs_the_sdk_gemv(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU, 1 to 8 rows go through the SDK's GEMV (13 do not) and match the dequantized reference."""
    calls: list[int] = []
    real = cpu_kernels.gemv

    def spy(x: torch.Tensor, *args: object, **kw: object) -> torch.Tensor:
        calls.append(x.shape[0])
        return real(x, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cpu_kernels, "gemv", spy)
    layer = Int8WeightOnlyLinear(torch.nn.Linear(200, 67), dtype)  # K, N: no multiple of a vector width
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 200), (2, 4, 200), (13, 200)]:  # 9 to 12 rows: aten int8pack, which crashes at this K
        x = torch.randn(*shape, generator=gen).to(dtype)
        got = layer(x)
        assert got.shape == (*shape[:-1], 67) and got.dtype == dtype
        assert sqnr(layer.reference(x).float(), got.float()) > (40 if dtype == torch.bfloat16 else 80)
    assert calls == [1, 8]


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


#: the plugin's own layer quantizes (fp16 scales: the interpreter has no bf16 atomics and a wrong bf16 dot); the
#: SDK kernel it calls on CUDA runs each case on its tensors, against the layer's dequantized weight.
_INTERPRETED = """
import json, torch
import torch.nn.functional as F
from dsr1_quant_int8 import Int8WeightOnlyLinear
from dsr1_sdk.kernels import INTERPRETER_CASES
from dsr1_sdk.kernels.weight_only import weight_only_mm_with
g = torch.Generator().manual_seed(0)
layer = Int8WeightOnlyLinear(torch.nn.Linear(256, 40), torch.float16)
errors = []
for rows, config in INTERPRETER_CASES:
    x = torch.randn(rows, 256, generator=g).to(torch.float16)
    y = weight_only_mm_with(x, "int8", layer.qweight, layer.scales, None, 0, config)
    want = F.linear(x.float(), layer.dequantize())
    errors.append(float((y.float() - want).abs().max() / want.abs().max()))
print(json.dumps(errors))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (CUDA builds of torch ship it)")
def test_triton_kernels_in_the_interpreter() -> None:
    """The CUDA kernels' code (the SDK's, on this plugin's tensors), run on the CPU by Triton's interpreter:
    one row and three, split-K off and on, against the layer's dequantized weight."""
    errors = json.loads(run_interpreted(_INTERPRETED).strip().splitlines()[-1])
    assert len(errors) == len(INTERPRETER_CASES) and max(errors) < 1e-2, errors


def test_kernel_switch_sets_every_layer() -> None:
    """Graph ``adaptive`` is offered nothing to choose (Triton wins up to 64 rows); ``use_kernel_`` sets every
    layer's kernel, and an unknown one is refused in one line."""
    policy = PluginRegistry().load("quant", "int8").make()
    assert policy.kernel_choices(SimpleNamespace(torch_device_type="cuda")) == []
    model = policy.quantize_(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 64)))
    policy.use_kernel_(model, "dequant")
    assert [m.cuda_kernel for m in model] == ["dequant", "dequant"]
    with pytest.raises(Dsr1Error, match=r"int8 has no cuda_kernel 'cublas'; use one of triton, dequant, int8pack"):
        policy.use_kernel_(model, "cublas")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 65])
def test_triton_kernel_on_cuda(rows: int) -> None:
    """Every row count a layer can see on CUDA (65 goes to dequantize + cuBLAS) agrees with the reference."""
    linear = torch.nn.Linear(256, 96).cuda()
    layer = Int8WeightOnlyLinear(linear, torch.bfloat16, cuda_kernel="triton")
    x = torch.randn(rows, 256, device="cuda").to(torch.bfloat16)
    assert sqnr(layer.reference(x).float(), layer(x).float()) > 40
