"""Test-only plugins for the engine tests: a torch-SDPA attention and a CPU device.

Registered under the default names ``sdpa`` / ``cpu`` only while the real plugin
distributions are not installed (see ``conftest.py``), plus ``engine-test-nogqa`` (an
attention without the ``gqa`` capability) and ``engine-test-device`` (a CPU device whose
compile backend is dynamo's ``eager``, to test the compile wiring quickly).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import AttentionMechanism, Device, MemoryInfo, ProbeResult
from dsr1.specs import PluginSpec


class TestSdpaAttention(AttentionMechanism):
    """torch SDPA; ``mask=None`` means causal with the last T keys aligned to the queries."""

    def forward(self, query, key, value, mask=None, scale=None):  # type: ignore[no-untyped-def]
        t, s = query.shape[2], key.shape[2]
        gqa = query.shape[1] != key.shape[1]
        if mask is None:
            if t == s:
                return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
            if t > 1:
                q_pos = torch.arange(s - t, s, device=query.device)[:, None]
                mask = torch.arange(s, device=query.device)[None, :] <= q_pos  # (T, S), bottom-right aligned
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)


class TestNoGqaAttention(TestSdpaAttention):
    def forward(self, query, key, value, mask=None, scale=None):  # type: ignore[no-untyped-def]
        assert key.shape[1] == query.shape[1], "engine must repeat k/v for a plugin without 'gqa'"
        return super().forward(query, key, value, mask, scale)


class TestCpuDevice(Device):
    torch_device_type = "cpu"

    def probe(self) -> ProbeResult:
        return ProbeResult(True, "", 1)

    def device_count(self) -> int:
        return 1

    def memory_info(self, index: int = 0) -> MemoryInfo:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return MemoryInfo(total, free, total - free)

    def synchronize(self, index: int = 0) -> None:
        return None

    def supported_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]


class EagerCompileDevice(TestCpuDevice):
    def compile_backend(self):  # type: ignore[no-untyped-def]
        return "eager", {}


_NAMES = set(filter(None, os.environ.get("DSR1_ENGINE_TEST_PROVIDE", "").split(",")))


@hookimpl
def dsr1_attention():  # type: ignore[no-untyped-def]
    specs = [PluginSpec(name="engine-test-nogqa", family="attention", impl=TestNoGqaAttention)]
    specs.append(PluginSpec(name="engine-test-sdpa", family="attention", impl=TestSdpaAttention,
                            capabilities=frozenset({"gqa"})))
    if "sdpa" in _NAMES:
        specs.append(PluginSpec(name="sdpa", family="attention", impl=TestSdpaAttention,
                                capabilities=frozenset({"gqa"})))
    return specs


@hookimpl
def dsr1_device():  # type: ignore[no-untyped-def]
    specs = [PluginSpec(name="engine-test-device", family="device", impl=EagerCompileDevice)]
    if "cpu" in _NAMES:
        specs.append(PluginSpec(name="cpu", family="device", impl=TestCpuDevice))
    return specs
