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
    ms each on prompts of new lengths); decode through SDPA (``cuda_decode: sdpa``) keeps torch's full choice."""
    import torch.nn.functional as F

    from dsr1_attention_sdpa import SdpaAttention, SdpaOptions

    seen: list[bool] = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn = SdpaAttention(SdpaOptions(cuda_decode="sdpa"))
    q = torch.randn(1, 8, 37, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 37, 64, device="cuda", dtype=torch.bfloat16)
    out = attn(q, k, k.clone(), None, 0.125)
    want = real(q, k.repeat_interleave(4, 1), k.repeat_interleave(4, 1), is_causal=True, scale=0.125)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    attn(q[:, :, :1], k, k.clone(), None, 0.125)  # decode
    assert seen == [False, torch.backends.cuda.cudnn_sdp_enabled()]


class TestSdpaAutoCuda(AttentionConformance):
    """``auto`` on CUDA, as configs get it: decode calls in fp16/bf16 go to the SDK's decode attention."""

    plugin = "sdpa"
    device = "cuda"
    max_examples = 5


@pytest.mark.parametrize("masked", [False, True])
def test_cuda_decode_runs_the_sdk_kernel(monkeypatch: pytest.MonkeyPatch, masked: bool) -> None:
    """A one-query bf16 call with no mask or a (B, 1, 1, S) boolean one goes to the SDK's kernel and agrees with
    SDPA; fp32, a pinned backend, or ``cuda_decode: sdpa`` stays with SDPA."""
    import dsr1_attention_sdpa as plugin
    from dsr1_attention_sdpa import SdpaAttention, SdpaOptions
    from dsr1_sdk.kernels.decode_attention import decode_attention

    calls: list[tuple[int, ...]] = []

    def spy(q, k, v, mask, scale):  # type: ignore[no-untyped-def]
        calls.append(tuple(q.shape))
        return decode_attention(q, k, v, mask, scale)

    monkeypatch.setitem(plugin._CUDA_DECODE, "fn", spy)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 28, 1, 128, device="cuda", generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 4, 300, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    mask = (torch.arange(300, device="cuda") < torch.tensor([[250], [300]], device="cuda"))[:, None, None, :]
    mask = mask if masked else None
    out = SdpaAttention()(q, k, v, mask, 0.1)
    assert calls == [(2, 4, 7, 128)]
    want = SdpaAttention(SdpaOptions(cuda_decode="sdpa"))(q, k, v, mask, 0.1)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    SdpaAttention(SdpaOptions(cuda_decode="sdpa"))(q, k, v, mask, 0.1)
    SdpaAttention(SdpaOptions(backend="efficient"))(q, k, v, mask, 0.1)
    SdpaAttention()(q.float(), k.float(), v.float(), mask, 0.1)
    assert len(calls) == 1
