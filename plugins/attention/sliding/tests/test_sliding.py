"""The sliding-window attention plugin: the SDK kit against windowed softmax, plus window handling."""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import dsr1_attention_sliding
from dsr1.config import PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.registry import PluginRegistry
from dsr1_sdk.reference import sliding_window_mask, softmax_attention
from dsr1_sdk.testing import AttentionConformance


class TestSliding(AttentionConformance):
    """Window 4: softmax over the keys ``p - 4 < j <= p``, and-ed with the case's mask."""

    plugin = "sliding"
    options = {"window": 4}

    def reference(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        mask: torch.Tensor | None = None, scale: float | None = None,
    ) -> torch.Tensor:
        t, s = query.shape[2], key.shape[2]
        window = sliding_window_mask(t, s, int(self.options["window"]), query.device)  # (T, S)
        return softmax_attention(query, key, value, mask=window if mask is None else mask & window, scale=scale)


class TestSlidingSmallBlocks(TestSliding):
    """Window 3 with 2-query blocks: the blocked prefill path on every multi-token case."""

    options = {"window": 3, "block": 2}
    max_examples = 5


class TestSlidingWideWindow(TestSliding):
    """A window wider than every case: plain causal softmax."""

    options = {"window": 10_000, "block": 5}
    max_examples = 5


def make(**options: Any) -> dsr1_attention_sliding.SlidingAttention:
    return PluginRegistry().make("attention", PluginChoice(name="sliding", options=options))


@pytest.mark.parametrize("window", [0, -3])
def test_window_must_be_positive(window: int) -> None:
    with pytest.raises(Dsr1Error, match="attention.options.window"):
        make(window=window)


def test_window_from_checkpoint_config() -> None:
    attention = make()
    attention.configure({"model_type": "mistral", "sliding_window": 6})
    assert attention.window == 6


def test_no_window_anywhere_is_a_one_line_error() -> None:
    with pytest.raises(Dsr1Error, match="needs a window: set attention.options.window") as err:
        make().configure({"model_type": "llama"})
    assert "\n" not in str(err.value)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(Dsr1Error, match="has no window"):
        make()(q, q, q)


def test_window_other_than_the_checkpoints_warns() -> None:
    with pytest.warns(UserWarning, match="trained with sliding_window 6"):
        make(window=4).configure({"sliding_window": 6})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(window=6).configure({"sliding_window": 6})
        make(window=6).configure({"model_type": "llama"})
