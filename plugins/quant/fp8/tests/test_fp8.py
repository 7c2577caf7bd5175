"""fp8 on a CPU-only machine: the kit's packaging/contract checks (its GPU checks skip with the
plugin's reason), the quantization math, the layer's checkpoint layout and the refusals."""
from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from dsr1.errors import Dsr1Error
from dsr1.quantization.checkpoint import FORMATS
from dsr1.registry import PluginRegistry
from dsr1_quant_fp8 import Fp8E4M3, Fp8Linear
from dsr1_sdk.kernels import INTERPRETER_CASES, run_interpreted
from dsr1_sdk.reference.quant import sqnr
from dsr1_sdk.testing import QuantConformance
from dsr1_sdk.testing.quant import CASES, TinyMLP, check_round_trip, check_sqnr


class TestFp8(QuantConformance):
    plugin = "fp8"


def policy(**options: object) -> Fp8E4M3:
    made: Fp8E4M3 = PluginRegistry().load("quant", "fp8").make(options)
    return made


@pytest.mark.parametrize("case_name", list(CASES))
def test_round_trip_math_on_cpu(case_name: str) -> None:
    """The e4m3 cast runs on the CPU, so the math is checked even where the matmul cannot run."""
    weight = CASES[case_name].make()
    check_round_trip(policy(), weight)
    check_sqnr(policy(), weight, case_name)


def test_layer_state_dict_is_e4m3_and_survives_a_dtype_cast() -> None:
    layer = Fp8Linear(torch.nn.Linear(32, 16), torch.bfloat16)
    state = layer.state_dict()
    assert state["qweight"].dtype == torch.float8_e4m3fn and state["scales"].dtype == torch.float32
    layer.to(torch.bfloat16)
    assert layer.qweight.dtype == torch.float8_e4m3fn and layer.scales.dtype == torch.bfloat16
    other = Fp8Linear(torch.nn.Linear(32, 16), torch.bfloat16)
    other.load_state_dict(state)
    assert torch.equal(other.qweight.float(), state["qweight"].float())
    fmt = FORMATS[Fp8Linear.FORMAT]
    w = fmt.dequantize({k: state[k] for k in fmt.tensors}, {})
    assert torch.equal(w, other.dequantize())


def test_reference_path_is_close_to_the_float_layer() -> None:
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    assert sqnr(linear(x), Fp8Linear(linear, torch.float32).reference(x)) > 25


def test_cpu_is_refused_with_the_reason() -> None:
    with pytest.raises(Dsr1Error, match=r"fp8 e4m3 needs an NVIDIA GPU of compute capability 8\.9\+.*cpu has no fp8"):
        policy().quantize_(TinyMLP())


def test_gpu_without_fp8_is_refused_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    assert policy().validate("cuda") == [
        "fp8 e4m3 needs compute capability 8.9+ (Ada, Hopper); NVIDIA A100-SXM4-80GB is sm80, without fp8 tensor "
        "cores: use int8"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert policy().validate("cuda") == []


#: the plugin's layer quantizes; the SDK kernel that ``cuda_kernel: triton`` runs on CUDA takes its e4m3 bytes and
#: scales (fp16 activations: the interpreter has no bf16 atomics and a wrong bf16 dot).
_INTERPRETED = """
import json, torch
import torch.nn.functional as F
from dsr1_quant_fp8 import Fp8Linear
from dsr1_sdk.kernels import INTERPRETER_CASES
from dsr1_sdk.kernels.weight_only import weight_only_mm_with
g = torch.Generator().manual_seed(0)
layer = Fp8Linear(torch.nn.Linear(256, 40), torch.float16, "triton")
errors = []
for rows, config in INTERPRETER_CASES:
    x = torch.randn(rows, 256, generator=g).to(torch.float16)
    y = weight_only_mm_with(x, "fp8", layer.qweight_bytes, layer.scales, None, 0, config)
    want = F.linear(x.float(), layer.dequantize())
    errors.append(float((y.float() - want).abs().max() / want.abs().max()))
print(json.dumps(errors))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (CUDA builds of torch ship it)")
def test_triton_kernels_in_the_interpreter() -> None:
    """``cuda_kernel: triton``'s kernels (the SDK's) on this plugin's layer, run on the CPU by Triton's interpreter:
    one row and three, split-K off and on, against the layer's dequantized weight (activations unquantized)."""
    errors = json.loads(run_interpreted(_INTERPRETED).strip().splitlines()[-1])
    assert len(errors) == len(INTERPRETER_CASES) and max(errors) < 1e-2, errors


def test_weight_only_kernel_runs_on_sm80_and_is_offered_to_adaptive(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cuda_kernel: triton`` needs no fp8 tensor cores (sm80 passes, sm75 does not); on sm90 graph ``adaptive`` is
    offered both kernels, on sm80 only one (nothing to choose); switching sets every layer, an unknown kernel is
    refused in one line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    has_triton = importlib.util.find_spec("triton") is not None
    reasons = policy(cuda_kernel="triton").validate("cuda")
    assert reasons == [] if has_triton else reasons == [
        "fp8 cuda_kernel 'triton' needs the triton package (pip install triton; CUDA builds of torch ship it), or "
        "set options.cuda_kernel: scaled_mm"]
    cuda = SimpleNamespace(torch_device_type="cuda")
    assert policy(cuda_kernel="triton").kernel_choices(cuda) == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert policy(cuda_kernel="triton").validate("cuda") == [
        "fp8 cuda_kernel 'triton' needs compute capability 8.0+; NVIDIA A100-SXM4-80GB is sm75: use int8"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert policy().kernel_choices(cuda) == (["scaled_mm", "triton"] if has_triton else [])
    assert policy(cuda_kernel="triton").validate("cpu") == [
        "fp8 cuda_kernel 'triton' needs an NVIDIA GPU of compute capability 8.0+; cpu has none: use int8"]
    assert policy().kernel_choices(SimpleNamespace(torch_device_type="cpu")) == []
    model = torch.nn.Sequential(Fp8Linear(torch.nn.Linear(32, 16), torch.bfloat16))
    policy().use_kernel_(model, "triton")
    assert model[0].cuda_kernel == "triton"
    with pytest.raises(Dsr1Error, match=r"fp8 has no cuda_kernel 'cutlass'; use one of scaled_mm, triton"):
        policy().use_kernel_(model, "cutlass")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU of compute capability 8.9+")
@pytest.mark.parametrize("kernel", ["scaled_mm", "triton"])
@pytest.mark.parametrize("rows", [1, 3, 16, 65])
def test_cuda_kernels_match_reference(kernel: str, rows: int) -> None:
    """Both CUDA kernels at every row count a layer can see (65: the weight-only path dequantizes + cuBLAS)."""
    layer = Fp8Linear(torch.nn.Linear(256, 96).cuda(), torch.bfloat16, kernel)
    x = torch.randn(rows, 256, device="cuda").to(torch.bfloat16)
    assert sqnr(layer.reference(x).float(), layer(x).float()) > 25
