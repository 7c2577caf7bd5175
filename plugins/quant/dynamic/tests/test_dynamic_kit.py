"""``dynamic`` against the SDK's conformance kit (its int8 path's round trip; whole-model checks in warm-up)."""
from __future__ import annotations

from dsr1_sdk.testing import QuantConformance


class TestDynamic(QuantConformance):
    plugin = "dynamic"
