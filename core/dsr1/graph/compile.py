"""Builtin graph pass ``compile``: ``torch.compile`` of the decode step only.

Prefill runs eagerly (one call per ``generate``); the per-token decode step is compiled
with the device's backend (``Device.compile_backend()``) and its tiling settings
(``Device.autotune_settings(tiling_strategy)``: ``auto`` = autotune, ``fixed`` = defaults).
The pass returns :class:`~dsr1.interfaces.GraphSteps` with the compiled step as
``decode_step``; the model keeps its plain ``forward_step`` and the engine's runner, which holds
the steps (through the model's runtime), calls the compiled one for decode steps.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from dsr1.errors import Dsr1Error
from dsr1.graph.paged_plans import FixedPaged
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Device, GraphPass, GraphSteps
from dsr1.models.common import CausalLM
from dsr1.specs import PluginSpec


class CompileOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: ``auto``: the device's autotuning settings; ``fixed``: its defaults.
    tiling_strategy: Literal["auto", "fixed"] = "fixed"
    #: a ``torch.compile`` mode (``"reduce-overhead"``, ``"max-autotune"``...); overrides the device's.
    mode: str | None = None
    #: ``torch.compile(dynamic=...)``; ``None`` lets dynamo mark the growing cache length dynamic.
    dynamic: bool | None = None
    #: on a device without a compile backend, run unfused (with a warning) instead of refusing.
    fallback: bool = False


def compile_kwargs(options: CompileOptions, device: Device) -> dict[str, Any] | None:
    """The ``torch.compile`` arguments for ``device`` (mode and options merged when both are set).

    A device without a compile backend is a one-line error, or, with ``fallback: true``, a warning
    and ``None``: the caller runs the unfused step.
    """
    found = device.compile_backend()
    if found is None:
        missing = f"device {type(device).__name__} has no torch.compile backend, so kernel fusion cannot run there"
        if not options.fallback:
            raise Dsr1Error(f"{missing}; use graph 'eager', or set fallback: true (hardware.optimizer.fallback) "
                            "to run unfused")
        import warnings

        warnings.warn(f"{missing}: running the unfused decode step (fallback: true)", stacklevel=3)
        return None
    backend, backend_options = found
    tuning = dict(device.autotune_settings(options.tiling_strategy))
    mode = options.mode or tuning.pop("mode", None)
    merged = {**backend_options, **tuning}
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": options.dynamic}
    if mode and merged:
        if backend != "inductor":
            raise Dsr1Error(f"graph compile: mode {mode!r} and options {merged} cannot both go to backend {backend!r}")
        import torch._inductor

        merged = {**torch._inductor.list_mode_options(mode, options.dynamic), **merged}
        kwargs["options"] = merged
    elif mode:
        kwargs["mode"] = mode
    elif merged:
        kwargs["options"] = merged
    return kwargs


class CompileGraph(GraphPass):
    Options = CompileOptions
    options: CompileOptions

    def apply(self, model: Any, device: Device) -> GraphSteps:
        if not isinstance(model, CausalLM):  # encoders have no decode step: nothing to compile
            return GraphSteps()
        kwargs = compile_kwargs(self.options, device)
        if kwargs is None:  # no compile backend, fallback allowed (and warned about)
            return GraphSteps()
        return GraphSteps(decode_step=torch.compile(model.forward_step, **kwargs), compile_kwargs=kwargs,
                          paged=FixedPaged("compile"))

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        reasons = []
        if not hasattr(torch, "compile"):
            reasons.append(f"torch {torch.__version__} has no torch.compile")
        return reasons


@hookimpl
def dsr1_graph() -> PluginSpec:
    return PluginSpec(
        name="compile",
        family="graph",
        impl=CompileGraph,
        options=CompileOptions,
        capabilities=frozenset({"kernel_fusion", "autotune"}),
        description="torch.compile of the decode step with the device's backend and tiling settings",
    )
