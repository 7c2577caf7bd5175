"""The linear attention plugin: the SDK kit against the exact linear-attention reference, plus its own options."""
from __future__ import annotations

from typing import Any

import pytest
import torch

import dsr1_attention_linear
from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_sdk.reference import linear_attention
from dsr1_sdk.testing import AttentionConformance


class TestLinear(AttentionConformance):
    """Default options (elu+1, chunk 128): causal and padding masks, GQA, fp16/bf16, recurrent."""

    plugin = "linear"

    def reference(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        mask: torch.Tensor | None = None, scale: float | None = None,
    ) -> torch.Tensor:
        feature_map = str(self.options.get("feature_map", "elu+1"))
        return linear_attention(query, key, value, mask=mask, scale=scale, feature_map=feature_map)


class TestLinearReluSmallChunks(TestLinear):
    """relu feature map and 3-key chunks: every case crosses chunk boundaries."""

    options = {"feature_map": "relu", "chunk": 3}
    max_examples = 5


def make(**options: Any) -> dsr1_attention_linear.LinearAttention:
    return PluginRegistry().make("attention", PluginChoice(name="linear", options=options))


def test_arbitrary_masks_are_skipped_with_the_reason() -> None:
    from dsr1_sdk.testing.attention import CASES

    reason = TestLinear().unsupported(CASES["random_mask"])
    assert reason is not None and "mask" in reason
    assert TestLinear().unsupported(CASES["padded_batch"]) is None


@pytest.mark.parametrize(("options", "key"), [({"chunk": 0}, "chunk"), ({"eps": 0}, "eps"),
                                              ({"feature_map": "softplus"}, "feature_map")])
def test_bad_options_are_one_line_errors(options: dict[str, Any], key: str) -> None:
    with pytest.raises(Dsr1Error, match=f"attention.options.{key}"):
        make(**options)


def test_fidelity_warning_unless_trained_linear() -> None:
    with pytest.warns(UserWarning, match="trained with softmax attention: its outputs will change"):
        make().configure({"model_type": "llama"})
    with pytest.warns(UserWarning, match="sliding_window is ignored"):
        make().configure({"model_type": "mistral", "sliding_window": 8})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make().configure({"model_type": "llama", "dsr1_attention": "linear"})


def test_state_is_per_kv_head_and_fixed() -> None:
    shapes = make().state_shapes(batch=3, heads=8, kv_heads=2, head_dim=64)
    assert shapes == {"s": (3, 2, 64, 64), "z": (3, 2, 64)}


def test_long_sequence_never_builds_the_score_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    """The largest tensor of a prefill is the output: every intermediate is O(chunk² + D²) per head."""
    biggest = [0]
    real = torch.Tensor.__matmul__

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real(a, b)
        biggest[0] = max(biggest[0], out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    t, d = 4096, 16
    q = k = v = torch.randn(1, 2, t, d)
    out = make(chunk=64)(q, k, v)
    assert out.shape == (1, 2, t, d)
    assert biggest[0] <= 2 * 64 * 64, biggest[0]  # a (T, S) matrix would be 2·4096²
