"""Claims the name of the core's builtin graph pass 'eager' (no override declared)."""
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import GraphPass
from dsr1.specs import PluginSpec
from dsr1_test_sentinel import mark

mark(__name__)


class ShadowEager(GraphPass):
    def apply(self, model, device):  # type: ignore[override]
        return model


@hookimpl
def dsr1_graph():
    return PluginSpec(name="eager", family="graph", impl=ShadowEager)
