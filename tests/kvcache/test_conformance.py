"""Every builtin KV cache through the SDK's kvcache conformance kit."""
from __future__ import annotations

from typing import Any, ClassVar

from dsr1_sdk.testing import KVCacheConformance


class TestContiguous(KVCacheConformance):
    plugin = "contiguous"


class TestPaged(KVCacheConformance):
    plugin = "paged"
    options: ClassVar[dict[str, Any]] = {"block_size": 4}


class TestPagedBlock1(KVCacheConformance):
    plugin = "paged"
    options: ClassVar[dict[str, Any]] = {"block_size": 1}


class TestInt8(KVCacheConformance):
    plugin = "int8"


class TestInt8Paged(KVCacheConformance):
    plugin = "int8"
    options: ClassVar[dict[str, Any]] = {"paged": True, "block_size": 8}


class TestStreaming(KVCacheConformance):
    plugin = "streaming"
    options: ClassVar[dict[str, Any]] = {"sinks": 2, "window": 5}


class TestStreamingRing(KVCacheConformance):
    """sinks=0: the sliding-window ring buffer."""

    plugin = "streaming"
    options: ClassVar[dict[str, Any]] = {"sinks": 0, "window": 4}


class TestHeavyHitter(KVCacheConformance):
    plugin = "heavy-hitter"
    options: ClassVar[dict[str, Any]] = {"budget": 6, "recent": 2}


class TestHeavyHitterFraction(KVCacheConformance):
    plugin = "heavy-hitter"
    options: ClassVar[dict[str, Any]] = {"budget": 0.4, "recent": 3}
