"""The eager attention plugin against the SDK's conformance kit."""
from __future__ import annotations

from dsr1_sdk.testing import AttentionConformance


class TestEager(AttentionConformance):
    plugin = "eager"
