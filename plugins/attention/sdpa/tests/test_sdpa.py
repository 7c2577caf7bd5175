"""The sdpa attention plugin: the SDK's conformance kit plus its own fast paths and options."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import dsr1_attention_sdpa
from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_sdk.reference import softmax_attention
from dsr1_sdk.testing import AttentionConformance


class TestSdpa(AttentionConformance):
    plugin = "sdpa"


class TestSdpaMathBackend(AttentionConformance):
    """The math kernel pinned: runs everywhere, so the kit checks it on CPU too."""

    plugin = "sdpa"
    options = {"backend": "math"}
    max_examples = 5


def make(**options: Any) -> dsr1_attention_sdpa.SdpaAttention:
    return PluginRegistry().make("attention", PluginChoice(name="sdpa", options=options))


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn"])
def test_validate_refuses_cuda_only_backend_on_cpu(backend: str) -> None:
    reasons = make(backend=backend).validate("cpu", torch.float32)
    assert reasons and all(backend in r and "cpu" in r for r in reasons[:1])
    assert make(backend=backend).validate("cuda", torch.bfloat16) == []


def test_validate_refuses_fp32_on_flash() -> None:
    assert any("fp16/bf16" in r for r in make(backend="flash").validate("cuda", torch.float32))
    assert make(backend="efficient").validate("cuda", torch.float32) == []


def test_unknown_backend_is_a_one_line_error() -> None:
    with pytest.raises(Dsr1Error, match="attention.options.backend"):
        make(backend="flashy")


def test_unknown_option_is_refused() -> None:
    with pytest.raises(Dsr1Error, match="unknown config key 'attention.options.backnd'.*backend"):
        make(backnd="math")


class Recorder:
    """Stands in for F.scaled_dot_product_attention and remembers its keyword arguments."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.real = torch.nn.functional.scaled_dot_product_attention

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append(kwargs)
        return self.real(*args, **kwargs)


@pytest.mark.parametrize(
    ("t", "s", "causal", "mask_shape"),
    [(6, 6, True, None), (3, 9, False, (3, 9))],
    ids=["prefill_is_causal", "chunk_lower_right_mask"],
)
def test_fast_paths(monkeypatch: pytest.MonkeyPatch, t: int, s: int, causal: bool, mask_shape: Any) -> None:
    recorder = Recorder()
    monkeypatch.setattr(dsr1_attention_sdpa.F, "scaled_dot_product_attention", recorder)
    q, k, v = torch.randn(2, 4, t, 16), torch.randn(2, 2, s, 16), torch.randn(2, 2, s, 16)
    out = make()(q, k, v)
    (kwargs,) = recorder.calls
    assert kwargs["is_causal"] is causal
    mask = kwargs["attn_mask"]
    assert (mask is None) if mask_shape is None else tuple(mask.shape) == mask_shape
    assert kwargs.get("enable_gqa") is True  # torch 2.13 has it, and CPU takes it with a mask
    torch.testing.assert_close(out, softmax_attention(q, k, v).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "padding_mask"])
def test_gqa_decode_packs_query_heads(monkeypatch: pytest.MonkeyPatch, masked: bool) -> None:
    """A GQA decode step runs as plain multi-head attention with G query rows per key/value head."""
    recorder = Recorder()
    monkeypatch.setattr(dsr1_attention_sdpa.F, "scaled_dot_product_attention", recorder)
    q, k, v = torch.randn(2, 6, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., :4] = False  # row 1 is left-padded
    out = make(cpu_decode="sdpa")(q, k, v, mask=mask if masked else None)
    (kwargs,) = recorder.calls
    assert "enable_gqa" not in kwargs and not kwargs.get("is_causal")
    assert (kwargs["attn_mask"] is mask) if masked else kwargs["attn_mask"] is None
    expected = softmax_attention(q, k, v, mask=mask if masked else None).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("h", "hkv"), [(6, 2), (4, 4)], ids=["gqa", "mha"])
def test_cpu_decode_runs_the_sdk_kernel(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, h: int,
                                        hkv: int) -> None:
    """One-query CPU decode without a mask skips SDPA (the SDK's kernel, on a view of a longer cache) and
    agrees with the reference; a mask, or cpu_decode: sdpa, goes through SDPA."""
    recorder = Recorder()
    monkeypatch.setattr(dsr1_attention_sdpa.F, "scaled_dot_product_attention", recorder)
    cache = torch.randn(2, 2, hkv, 16, 24).to(dtype)  # (k/v, B, Hkv, capacity, D)
    q, k, v = torch.randn(2, h, 1, 24).to(dtype), cache[0][:, :, :9], cache[1][:, :, :9]
    out = make()(q, k, v)
    assert out.dtype == dtype and out.shape == (2, h, 1, 24)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for scale in (None, 0.5):
        expected = softmax_attention(q.float(), k.float(), v.float(), scale=scale, out_dtype=torch.float32)
        torch.testing.assert_close(make()(q, k, v, scale=scale).float(), expected, atol=tol, rtol=tol)
    assert recorder.calls == []
    make(cpu_decode="sdpa")(q, k, v)
    make()(q, k, v, mask=torch.ones(2, 1, 1, 9, dtype=torch.bool))
    make(backend="math")(q, k, v)
    assert len(recorder.calls) == 3


def test_only_unmasked_cpu_calls_ask_for_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder's calls carry a mask and never build the SDK's kernel; a causal prefill (no mask) loads it
    eagerly, before a compiled decode step would be traced; a kernel that cannot build leaves SDPA, warned once
    (by ``usable``), and is not asked again."""
    asked: list[str] = []

    def usable(owner: str, fallback: str) -> bool:
        asked.append(owner)
        return False

    monkeypatch.setattr(dsr1_attention_sdpa.cpu_kernels, "usable", usable)
    attention = make()
    q = torch.randn(1, 2, 5, 8)
    attention(q, q, q, mask=torch.ones(1, 1, 5, 5, dtype=torch.bool))  # an encoder's call
    assert asked == []
    prefill = attention(q, q, q)  # a causal LM's prefill
    decode = attention(q[:, :, :1], q, q)  # decode, the kernel refused: SDPA
    assert asked == ["sdpa"]
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]  # (1, 1, T, S)
    torch.testing.assert_close(prefill, softmax_attention(q, q, q, mask=causal, out_dtype=torch.float32), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(decode, softmax_attention(q[:, :, :1], q, q, out_dtype=torch.float32), atol=1e-5,
                               rtol=1e-5)


def test_pinned_kernel_failure_is_a_one_line_error() -> None:
    attention = make(backend="efficient")
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(Dsr1Error, match="sdpa backend 'efficient' cannot run this call .*use backend 'auto'"):
        attention(q, q, q)
