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
