"""Builtin pool ``single``: the whole model on the selected device.

The builder reads every checkpoint tensor straight onto :meth:`SinglePool.weight_device`;
:meth:`SinglePool.place` then moves what a quant plugin may have made elsewhere.
"""
from __future__ import annotations

import torch

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Device, Pool
from dsr1.specs import PluginSpec


class SinglePool(Pool):
    def weight_device(self, device: Device) -> torch.device:
        return device.torch_device()

    def place(self, model: torch.nn.Module, device: Device) -> torch.nn.Module:
        target = self.weight_device(device)
        if any(p.device != target for p in model.parameters()) or any(b.device != target for b in model.buffers()):
            model = model.to(target)
        return model


@hookimpl
def dsr1_pool() -> PluginSpec:
    return PluginSpec(name="single", family="pool", impl=SinglePool, description="whole model on one device")
