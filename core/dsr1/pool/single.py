"""Builtin pool ``single``: the whole model on the selected device."""
from __future__ import annotations

import torch

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Device, Pool
from dsr1.specs import PluginSpec


class SinglePool(Pool):
    def place(self, model: torch.nn.Module, device: Device) -> torch.nn.Module:
        target = device.torch_device()
        if any(p.device != target for p in model.parameters()) or any(b.device != target for b in model.buffers()):
            model = model.to(target)
        return model


@hookimpl
def dsr1_pool() -> PluginSpec:
    return PluginSpec(name="single", family="pool", impl=SinglePool, description="whole model on one device")
