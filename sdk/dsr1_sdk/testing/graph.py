"""Graph-pass conformance: the pass's step functions decode the same tokens as eager.

A graph pass (:class:`dsr1.interfaces.GraphPass`) hands the engine a
:class:`~dsr1.interfaces.GraphSteps` (a replacement decode step, static decode graphs) and
must leave the model as it is. The reference is the model's own eager ``forward_step`` (the
builtin ``eager`` pass). The kit loads a tiny random llama with the pass and checks:

* ``apply(model, device)`` returns a ``GraphSteps`` (the older form, the model itself, is
  accepted only if it is the same object) and leaves the model's tensors bit-identical and its
  attributes unchanged (runtime state belongs to the engine, never to the module);
* a left-padded batch of two prompts generates exactly the tokens eager generates, greedily and
  with a seeded sampler, twice in a row (a step that keeps state between calls shows then);
* ``validate`` refuses, with a reason, the devices it does not declare (the shared checks).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from dsr1.interfaces import GraphPass, GraphSteps
from dsr1_sdk.testing import tiny_runs
from dsr1_sdk.testing.base import PluginConformance


def check_graph_tokens(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    """Every generation equals eager's, token for token (the first differing row and column named)."""
    for kind, w in want.items():
        g = got[kind]
        assert g.shape == w.shape, f"{where}: {kind} output shape {tuple(g.shape)}, eager {tuple(w.shape)}"
        diff = (g != w).nonzero()
        assert diff.numel() == 0, (
            f"{where}: {kind} decoding differs from eager first at row {int(diff[0, 0])}, position "
            f"{int(diff[0, 1])}: {int(g[diff[0, 0], diff[0, 1]])} != {int(w[diff[0, 0], diff[0, 1]])} "
            f"(row {g[diff[0, 0]].tolist()} vs {w[diff[0, 0]].tolist()})"
        )


def check_apply_leaves_model(graph: GraphPass, model: Any, device: Any) -> GraphSteps:
    """``apply`` returns steps and changes neither the model's tensors nor its attributes."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = set(vars(model))
    steps = graph.apply(model, device)
    if steps is model:  # the older form: "no step functions"
        steps = GraphSteps()
    assert isinstance(steps, GraphSteps), (
        f"apply returned {type(steps).__name__}; return dsr1_sdk.GraphSteps(decode_step=...) (empty: eager)"
    )
    assert steps.decode_step is None or callable(steps.decode_step), "GraphSteps.decode_step is not callable"
    added = set(vars(model)) - attrs
    assert not added, f"apply attached {sorted(added)} to the model; return them in GraphSteps instead"
    after = model.state_dict()
    assert set(after) == set(before), f"apply changed the model's tensors: {sorted(set(after) ^ set(before))}"
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"apply changed the weights {changed[:3]}: a graph pass leaves the model as it is"
    return steps


class GraphConformance(PluginConformance):
    """Conformance kit of the ``graph`` family. Subclass it and set ``plugin`` (and ``options``)."""

    family: ClassVar[str] = "graph"
    #: new tokens per generation compared with eager.
    new_tokens: ClassVar[int] = 8

    def runnable(self) -> GraphPass:
        impl: GraphPass = self.make_impl()
        if self.target_device() != "cpu":
            pytest.skip("the graph kit runs its tiny model on the CPU")
        self.skip_unless_runs_here(impl)
        return impl

    def test_apply_leaves_the_model(self, tmp_path: Path) -> None:
        impl = self.runnable()
        model = tiny_runs.load(tiny_runs.checkpoint(tmp_path), "graph", "eager")
        check_apply_leaves_model(impl, model, model.pipeline.device)

    def test_decodes_the_same_tokens_as_eager(self, tmp_path: Path) -> None:
        self.runnable()
        want = tiny_runs.builtin_tokens("graph", "eager", self.new_tokens)
        model = tiny_runs.load(tiny_runs.checkpoint(tmp_path), "graph", self.plugin, self.options)
        where = f"graph {self.plugin!r}"
        check_graph_tokens(tiny_runs.tokens(model, self.new_tokens), want, where)
        check_graph_tokens(tiny_runs.tokens(model, self.new_tokens), want, f"{where}, second run")
