"""Builtin graph pass ``eager``: run the model as written (identity)."""
from __future__ import annotations

from typing import Any

from dsr1.graph.paged_plans import FixedPaged
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Device, GraphPass, GraphSteps
from dsr1.specs import PluginSpec


class EagerGraph(GraphPass):
    def apply(self, model: Any, device: Device) -> GraphSteps:
        return GraphSteps(paged=FixedPaged("eager"))  # the model's own forward_step


@hookimpl
def dsr1_graph() -> PluginSpec:
    return PluginSpec(name="eager", family="graph", impl=EagerGraph, description="run eagerly (no rewrite)")
