"""int4 against the SDK's conformance kit; packing, kernel and the one-line errors of bad input."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_quant_int4 import Int4WeightOnlyLinear, kernels
from dsr1_sdk.kernels import INTERPRETER_CASES, run_interpreted
from dsr1_sdk.reference.quant import sqnr
from dsr1_sdk.testing import QuantConformance
from dsr1_sdk.testing.quant import TinyMLP, check_pretrained_round_trip, tiny_llama_checkpoint


class TestInt4Group32(QuantConformance):
    plugin = "int4"
    options = {"group_size": 32}


@pytest.mark.parametrize("group", [64, 128])
def test_checkpoint_round_trip_per_group_size(group: int, tmp_path: Path) -> None:
    model_dir = tiny_llama_checkpoint(tmp_path / "fp32", hidden_size=128, intermediate_size=256)
    check_pretrained_round_trip("int4", {"group_size": group}, model_dir, tmp_path / f"g{group}")


def policy(**options: object) -> object:
    return PluginRegistry().load("quant", "int4").make(options)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), k=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_unpack_inverts_the_cpu_packer(n: int, k: int, seed: int) -> None:
    q = torch.randint(0, 16, (16 * n, 32 * k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(kernels.unpack(kernels.pack(q, torch.device("cpu")), 16 * n, 32 * k), q)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_reference(group: int, dtype: torch.dtype) -> None:
    layer = Int4WeightOnlyLinear(torch.nn.Linear(256, 48), dtype, group)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = layer(x)
    assert got.shape == (2, 3, 48) and got.dtype == dtype
    assert sqnr(layer.reference(x).float(), got.float()) > 35


def test_state_dict_is_canonical_and_round_trips() -> None:
    layer = Int4WeightOnlyLinear(torch.nn.Linear(128, 32), torch.bfloat16, 64)
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales", "zeros", "bias"}
    assert state["qweight"].shape == (32, 64) and state["scales"].shape == (32, 2)
    other = Int4WeightOnlyLinear(torch.nn.Linear(128, 32), torch.bfloat16, 64)
    other.load_state_dict(state)
    x = torch.randn(4, 128).bfloat16()
    assert torch.equal(layer(x), other(x))


def test_group_that_does_not_divide_names_the_layer() -> None:
    with pytest.raises(Dsr1Error, match=r"group_size 64 does not divide the input dim 32 of layer '0'; "
                                        r"use group_size 32"):
        policy(group_size=64, unfit="refuse").quantize_(TinyMLP())


def test_cpu_kernel_needs_outputs_in_multiples_of_16() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 24))
    with pytest.raises(Dsr1Error, match=r"layer '0' has 24"):
        policy(group_size=32, unfit="refuse").quantize_(model)


def test_layers_that_do_not_fit_stay_in_floating_point_with_one_warning() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 24), torch.nn.Linear(24, 64),
                                torch.nn.Linear(64, 16))
    p = policy(group_size=32)
    with pytest.warns(UserWarning) as caught:
        p.quantize_(model)
    assert len(caught) == 1
    assert "keeps 2 linear layer(s) in floating point" in str(caught[0].message)
    assert "1, 2 (first:" in str(caught[0].message)  # layer '1': 24 outputs (CPU kernel); '2': 24 inputs
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Int4WeightOnlyLinear", "Linear", "Linear", "Int4WeightOnlyLinear"]
    assert model.quantization_config["options"]["skip"] == ["1", "2"]  # recorded for the checkpoint
    assert p.options.skip == []  # the policy's own options are unchanged


@pytest.mark.parametrize("device", ["mlu", "npu", "mps"])
def test_device_without_kernel_is_refused(device: str) -> None:
    assert policy().validate(device) == [f"int4 has no kernel on {device}; use int8"]


def test_group_size_outside_the_offered_ones_is_refused() -> None:
    with pytest.raises(Dsr1Error, match=r"quant.options.group_size"):
        PluginRegistry().make("quant", PluginChoice(name="int4", options={"group_size": 48}))


#: the plugin's layer quantizes (CPU layout; fp16: the interpreter has no bf16 atomics and a wrong bf16 dot), and
#: the SDK kernel that ``cuda_kernel: triton`` runs on CUDA takes its canonical tensors, as the CUDA layer keeps them.
_INTERPRETED = """
import json, torch
import torch.nn.functional as F
from dsr1_quant_int4 import Int4WeightOnlyLinear
from dsr1_sdk.kernels import INTERPRETER_CASES
from dsr1_sdk.kernels.weight_only import weight_only_mm_with
g = torch.Generator().manual_seed(0)
errors = []
for group, cases in [(32, INTERPRETER_CASES), (64, [(1, {"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 2}),
                                                   (3, {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 3})])]:
    layer = Int4WeightOnlyLinear(torch.nn.Linear(256, 48), torch.float16, group)
    c = layer.canonical()
    for rows, config in cases:
        x = torch.randn(rows, 256, generator=g).to(torch.float16)
        y = weight_only_mm_with(x, "int4", c["qweight"], c["scales"], c["zeros"], group, config)
        want = F.linear(x.float(), layer.dequantize())
        errors.append(float((y.float() - want).abs().max() / want.abs().max()))
print(json.dumps(errors))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (CUDA builds of torch ship it)")
def test_triton_kernels_in_the_interpreter() -> None:
    """``cuda_kernel: triton``'s kernels (the SDK's) on this plugin's quantization, run on the CPU by Triton's
    interpreter: one row and three, split-K off and on, groups 32 and 64, against the layer's dequantized weight."""
    errors = json.loads(run_interpreted(_INTERPRETED).strip().splitlines()[-1])
    assert len(errors) == len(INTERPRETER_CASES) + 2 and max(errors) < 1e-2, errors


def test_cuda_kernel_option_is_checked_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cuda_kernel: triton`` needs triton (refused in one line naming the package and the alternative) and
    sm80+ as tinygemm does; adaptive is offered no switch (the kernels keep different layouts)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    reasons = policy(cuda_kernel="triton").validate("cuda")
    if importlib.util.find_spec("triton") is None:
        assert reasons == ["int4 cuda_kernel 'triton' needs the triton package (pip install triton; CUDA builds of "
                           "torch ship it), or set options.cuda_kernel: tinygemm"]
    else:
        assert reasons == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert policy(cuda_kernel="triton").validate("cuda") == [
        "int4 has no kernel on cuda sm75 (triton needs compute capability 8.0+); use int8"]
    assert policy(cuda_kernel="triton").kernel_choices(SimpleNamespace(torch_device_type="cuda")) == []
    with pytest.raises(Dsr1Error, match=r"int4 cannot switch its layers to kernel 'tinygemm' after quantizing; "
                                        r"set options.cuda_kernel: tinygemm"):
        policy().use_kernel_(torch.nn.Sequential(), "tinygemm")


def test_cuda_kernel_outside_the_offered_ones_is_refused() -> None:
    with pytest.raises(Dsr1Error, match=r"quant.options.cuda_kernel"):
        PluginRegistry().make("quant", PluginChoice(name="int4", options={"cuda_kernel": "marlin"}))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["tinygemm", "triton"])
@pytest.mark.parametrize("rows", [1, 3, 16, 65])
def test_cuda_kernels_match_reference(kernel: str, rows: int) -> None:
    """Both CUDA kernels at every row count a layer can see (65: dequantize + cuBLAS on the triton layout), and
    the triton layout's checkpoint tensors are the canonical ones."""
    layer = Int4WeightOnlyLinear(torch.nn.Linear(256, 96).cuda(), torch.bfloat16, 64, kernel)
    assert layer.layout == kernel
    x = torch.randn(rows, 256, device="cuda").to(torch.bfloat16)
    assert sqnr(layer.reference(x).float(), layer(x).float()) > 35
    other = Int4WeightOnlyLinear(torch.nn.Linear(256, 96).cuda(), torch.bfloat16, 64, "tinygemm")
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.dequantize(), layer.dequantize())
