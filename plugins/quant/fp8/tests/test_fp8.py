"""fp8 on a CPU-only machine: the kit's packaging/contract checks (its GPU checks skip with the
plugin's reason), the quantization math, the layer's checkpoint layout and the refusals."""
from __future__ import annotations

import pytest
import torch

from dsr1.errors import Dsr1Error
from dsr1.quantization.checkpoint import FORMATS
from dsr1.registry import PluginRegistry
from dsr1_quant_fp8 import Fp8E4M3, Fp8Linear
from dsr1_sdk.reference.quant import sqnr
from dsr1_sdk.testing import QuantConformance
from dsr1_sdk.testing.quant import CASES, TinyMLP, check_round_trip, check_sqnr


class TestFp8(QuantConformance):
    plugin = "fp8"


def policy() -> Fp8E4M3:
    made: Fp8E4M3 = PluginRegistry().load("quant", "fp8").make()
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
