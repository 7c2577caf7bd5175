"""The graph kit: the builtin ``eager`` pass passes it; steps that change tokens or the model fail it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dsr1.interfaces import Device, GraphPass, GraphSteps
from dsr1_sdk.testing import GraphConformance
from dsr1_sdk.testing import tiny_runs
from dsr1_sdk.testing.graph import check_apply_leaves_model, check_graph_tokens


class TestEager(GraphConformance):
    plugin = "eager"


class Wrapped(GraphPass):
    """A right pass: the model's own step behind a wrapper."""

    def apply(self, model: Any, device: Device) -> GraphSteps:
        step = model.forward_step

        def decode_step(*args: Any) -> torch.Tensor:
            return step(*args)

        return GraphSteps(decode_step=decode_step)


class Biased(Wrapped):
    """Its decode step nudges the logits: right shapes, wrong tokens."""

    def apply(self, model: Any, device: Device) -> GraphSteps:
        step = model.forward_step
        bias = torch.zeros(model.args.vocab_size)
        bias[3] = 50.0

        def decode_step(*args: Any) -> torch.Tensor:
            return step(*args) + bias

        return GraphSteps(decode_step=decode_step)


class Attaches(Wrapped):
    def apply(self, model: Any, device: Device) -> GraphSteps:
        model.compiled = True
        return super().apply(model, device)


class HalvesWeights(Wrapped):
    def apply(self, model: Any, device: Device) -> GraphSteps:
        with torch.no_grad():
            next(model.parameters()).mul_(0.5)
        return super().apply(model, device)


def run_with(model: Any, steps: GraphSteps) -> dict[str, torch.Tensor]:
    model.runtime.steps = steps
    return tiny_runs.tokens(model)


def test_broken_passes_fail(tmp_path: Path) -> None:
    model = tiny_runs.load(tiny_runs.checkpoint(tmp_path), "graph", "eager")
    device = model.pipeline.device
    want = tiny_runs.tokens(model)
    check_graph_tokens(run_with(model, check_apply_leaves_model(Wrapped(), model, device)), want, "wrapped")
    with pytest.raises(AssertionError, match="greedy decoding differs from eager first at row 0"):
        check_graph_tokens(run_with(model, check_apply_leaves_model(Biased(), model, device)), want, "biased")
    with pytest.raises(AssertionError, match=r"attached \['compiled'\]"):
        check_apply_leaves_model(Attaches(), model, device)
    with pytest.raises(AssertionError, match="changed the weights"):
        check_apply_leaves_model(HalvesWeights(), model, device)
