"""The sdpa plugin with each CUDA kernel pinned, through the conformance kit (GPU only)."""
from __future__ import annotations

import pytest
import torch

from dsr1_sdk.testing import AttentionCase, AttentionConformance

if not torch.cuda.is_available():
    pytest.skip("the pinned CUDA kernels need a CUDA device", allow_module_level=True)


class TestSdpaFlashCuda(AttentionConformance):
    """The flash kernel pinned (CUDA, fp16/bf16, no masks): runs where a GPU is."""

    plugin = "sdpa"
    options = {"backend": "flash"}
    device = "cuda"
    max_examples = 5

    def capabilities(self) -> frozenset[str]:
        return super().capabilities() - {"mask"}  # flash takes no attention mask

    def unsupported(self, case: AttentionCase) -> str | None:
        if case.mask == "none" and 1 < case.q_len < case.kv_len:
            return "chunked prefill needs a lower-right causal mask, and flash takes no mask"
        return super().unsupported(case)


class TestSdpaEfficientCuda(AttentionConformance):
    """The memory-efficient kernel pinned (CUDA; masks and fp32 too; GQA by repeated heads)."""

    plugin = "sdpa"
    options = {"backend": "efficient"}
    device = "cuda"
    max_examples = 5


class TestSdpaCudnnCuda(AttentionConformance):
    """The cuDNN kernel pinned (CUDA, fp16/bf16)."""

    plugin = "sdpa"
    options = {"backend": "cudnn"}
    device = "cuda"
    max_examples = 5

    def unsupported(self, case: AttentionCase) -> str | None:
        if case.kv_len == 1:
            return "cuDNN attention takes no key/value length 1 (torch 2.11 warns and refuses)"
        return super().unsupported(case)


def test_auto_prefill_leaves_cudnn_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` prefill on CUDA runs with cuDNN attention disabled (its per-shape plans cost tens of
    ms each on prompts of new lengths); decode keeps torch's full choice."""
    import torch.nn.functional as F

    from dsr1_attention_sdpa import SdpaAttention

    seen: list[bool] = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn = SdpaAttention()
    q = torch.randn(1, 8, 37, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 37, 64, device="cuda", dtype=torch.bfloat16)
    out = attn(q, k, k.clone(), None, 0.125)
    want = real(q, k.repeat_interleave(4, 1), k.repeat_interleave(4, 1), is_causal=True, scale=0.125)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    attn(q[:, :, :1], k, k.clone(), None, 0.125)  # decode
    assert seen == [False, torch.backends.cuda.cudnn_sdp_enabled()]
