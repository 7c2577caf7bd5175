"""dsr1-graph-mine against the dsr1 conformance kit.

Run with ``pytest tests`` after installing the package (``pip install -e .``): the kit
loads the plugin through its installed entry point, as the engine does.
"""
from __future__ import annotations

from dsr1_sdk.testing import GraphConformance


class TestMine(GraphConformance):
    plugin = "mine"
