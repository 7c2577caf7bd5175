"""The sdpa plugin with each CUDA kernel pinned, through the conformance kit (GPU only)."""
from __future__ import annotations

import pytest
import torch

from dsr1_sdk.testing import AttentionConformance

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
