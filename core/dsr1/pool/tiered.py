"""Builtin pool ``tiered``: weights over device memory, pinned host memory and disk, within budgets.

The model is built in host memory; :meth:`TieredPool.place` then plans (:mod:`dsr1.pool.plan`,
with the bandwidths of :mod:`dsr1.pool.bandwidth`) and carries the plan out: resident units move
to the compute device, streamed ones are packed into pinned host blocks or written to
safetensors files under ``disk_dir`` and run out of two device buffers (:mod:`dsr1.pool.stream`),
and the embedding may stay on the CPU and run there. With ``device: [cuda, cpu]`` the cost model
may also run whole layers (and the ``lm_head``) on the CPU instead of streaming them: their
projections run where their weights are, with the activations moved, while attention, the
norms and the KV cache stay on the device. With budgets that hold everything, the model ends up
exactly where ``single`` puts it.

    AutoModel.from_pretrained(d, pool={"name": "tiered", "options": {"gpu_memory_gb": 7}})
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from dsr1.errors import Dsr1Error
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Device, Pool, SwapPolicy
from dsr1.pool import bandwidth as bw
from dsr1.pool.plan import GIB, TierPlan, Unit, gib, make_plan
from dsr1.pool.spill import SpillingState
from dsr1.pool.stream import UnitStreamer
from dsr1.specs import PluginSpec

#: units that may run on the CPU when the model does not fit the device (``cpu_modules: auto``).
AUTO_CPU_MODULES = ("model.embed_tokens",)


class TieredOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: weights on the GPU, streaming buffers included (GiB); default: what it reports free, less ``margin_gb``.
    gpu_memory_gb: float | None = Field(default=None, gt=0)
    #: weights in host memory (GiB): pinned tier and CPU-run modules; on a CPU-only machine all
    #: resident weights. Default: what the machine reports available, less ``margin_gb``.
    cpu_memory_gb: float | None = Field(default=None, gt=0)
    #: where disk-tier units are written (default ``$DSR1_HOME/offload``).
    disk_dir: str | None = None
    #: units that may run on the CPU, moving activations, when the model does not fit the device.
    #: ``auto``: the embedding; with ``device: [cuda, cpu]`` the layers and the lm_head as well,
    #: where the cost model says that beats streaming them.
    cpu_modules: Literal["auto"] | list[str] = "auto"
    #: memory left free below what the device or machine reports when a budget is not given (GiB).
    margin_gb: float = Field(default=1.0, ge=0)
    #: bandwidths to plan with instead of measured ones (GB/s): device_read, host_to_device, host_read, disk_read.
    bandwidth_gbps: dict[str, float] = Field(default_factory=dict)
    #: host memory for the KV blocks of preempted requests (GiB); 0: always recompute them.
    kv_swap_gb: float = Field(default=4.0, ge=0)

    @field_validator("bandwidth_gbps")
    @classmethod
    def _known(cls, value: dict[str, float]) -> dict[str, float]:
        odd = [k for k in value if k not in bw.NAMES]
        if odd:
            raise ValueError(f"unknown bandwidth {odd[0]!r}; the cost model uses {', '.join(bw.NAMES)}")
        if any(v <= 0 for v in value.values()):
            raise ValueError("bandwidths are positive figures in GB/s")
        return value


def _meminfo(field_name: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _tensor_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def model_units(model: nn.Module) -> list[tuple[Unit, nn.Module]]:
    """The movable units of a decoder in execution order: embedding, layers, lm_head."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise Dsr1Error(f"pool tiered places decoder models laid out as model.layers; {type(model).__name__} is not; "
                        f"use pool: single")
    embed, head = getattr(inner, "embed_tokens", None), getattr(model, "lm_head", None)
    tied = embed is not None and head is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0)
    out: list[tuple[Unit, nn.Module]] = []
    if isinstance(embed, nn.Module):
        out.append((Unit("model.embed_tokens", _tensor_bytes(embed), "embed", movable=not tied), embed))
    out += [(Unit(f"model.layers.{i}", _tensor_bytes(m), "layer"), m) for i, m in enumerate(layers)]
    if isinstance(head, nn.Module):
        # a tied head is the embedding's tensor: counted once, with the embedding
        out.append((Unit("lm_head", 0 if tied else _tensor_bytes(head), "head", movable=not tied), head))
    return out


class TieredPool(Pool):
    Options = TieredOptions
    options: TieredOptions
    #: ``device: [cuda, cpu]``: layers may run on the CPU (see :meth:`use_devices`).
    host_compute = False

    def use_devices(self, extra: list[str]) -> bool:
        odd = [d for d in extra if d != "cpu"]
        if odd:
            raise Dsr1Error(f"pool tiered runs modules on the cpu beside the compute device, not on {odd[0]!r}; "
                            f"write device: [cuda, cpu]")
        self.host_compute = True
        return True

    #: the compute device when the checkpoint fits it whole (set by :meth:`build_state`, which the
    #: builders call first): the weights are then read straight there, as ``single`` reads them.
    direct: torch.device | None = None

    def weight_device(self, device: Device) -> torch.device:
        # otherwise the plan needs the built sizes: weights are read to host memory and place() moves what stays
        return self.direct or torch.device("cpu")

    # --- budgets ------------------------------------------------------------------------------

    def disk_dir(self) -> Path:
        from dsr1.models.loading import dsr1_home

        path = Path(self.options.disk_dir).expanduser() if self.options.disk_dir else dsr1_home() / "offload"
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=path, prefix=".dsr1-probe-")
            probe.close()
        except OSError as err:
            raise Dsr1Error(f"pool tiered: disk_dir {str(path)!r} is not a writable directory ({err.strerror}); "
                            f"give a writable one") from None
        return path

    def budgets(self, compute: torch.device, device: Device) -> dict[str, int]:
        o, margin = self.options, int(self.options.margin_gb * GIB)
        # the device plugin reports its memory (the CPU's: /proc/meminfo); computing on a GPU, the host's
        # figures come from /proc/meminfo here, as core cannot ask the cpu plugin
        own = device.memory_info()
        host_total, host_free = (own.total, own.free) if compute.type == "cpu" else \
            (_meminfo("MemTotal"), _meminfo("MemAvailable"))
        cpu = self._budget("cpu_memory_gb", o.cpu_memory_gb, host_total, max(host_free - margin, 0), "the machine")
        if compute.type == "cpu":
            if o.gpu_memory_gb is not None:
                raise Dsr1Error("pool tiered: gpu_memory_gb budgets a GPU, but this model computes on the cpu; "
                                "give cpu_memory_gb instead")
            return {"device": cpu, "cpu": cpu}
        if compute.type != "cuda":
            raise Dsr1Error(f"pool tiered streams to cuda or runs on cpu; device {compute.type} is neither: "
                            f"use pool: single")
        gpu = self._budget("gpu_memory_gb", o.gpu_memory_gb, own.total, max(own.free - margin, 0), "the GPU")
        return {"device": gpu, "cpu": cpu}

    @staticmethod
    def _budget(name: str, given: float | None, total: int, default: int, what: str) -> int:
        if given is None:
            return default
        want = int(given * GIB)
        if want > total:
            warnings.warn(f"pool tiered: {name} {given} GiB is more than {what} has ({gib(total)}); using "
                          f"{gib(total)}", stacklevel=3)
            return total
        return want

    def plan(self, units: list[Unit], fixed: int, device: Device, model_dir: Path | None,
             dtype: torch.dtype = torch.float32) -> TierPlan:
        compute = device.torch_device()
        if self.host_compute and compute.type == "cpu":
            raise Dsr1Error("pool tiered: device [..., cpu] lets a GPU model run modules on the cpu, but this model "
                            "computes on the cpu already; write device: cpu")
        budgets = self.budgets(compute, device)
        disk = self.disk_dir()
        refusal = None
        if model_dir is not None and not any(p.suffix == ".safetensors" for p in Path(model_dir).iterdir()):
            refusal = f"the checkpoint in {str(model_dir)!r} is not safetensors (convert it, or raise cpu_memory_gb)"
        rates = bw.bandwidths(compute, disk, self.options.bandwidth_gbps, dtype=dtype)
        cpu_ok = list(AUTO_CPU_MODULES) if self.options.cpu_modules == "auto" else list(self.options.cpu_modules)
        if self.options.cpu_modules == "auto" and self.host_compute:
            cpu_ok += [u.name for u in units if u.kind != "embed"]
        names = {u.name for u in units}
        odd = [n for n in cpu_ok if n not in names]
        if odd and self.options.cpu_modules != "auto":
            raise Dsr1Error(f"pool tiered: cpu_modules names {odd[0]!r}, which is not a unit of this model; "
                            f"units: model.embed_tokens, model.layers.N, lm_head")
        budget_name = "cpu_memory_gb" if compute.type == "cpu" else "gpu_memory_gb"
        return make_plan(units, fixed, compute.type, budgets, rates, cpu_ok, refusal, budget_name)

    def plan_checkpoint(self, model_dir: Path, device: Device, itemsize: int | None = None) -> TierPlan:
        """The plan for a checkpoint before loading it, from its tensors' sizes (headers only) in
        its floating dtype (or at ``itemsize`` bytes per floating element): what ``dsr1 config
        check --model M`` prints. A quant plugin shrinks the units."""
        units, fixed, dtype = self._checkpoint_units(model_dir, itemsize)
        return self._checkpoint_plan(units, fixed, dtype, device, model_dir)

    def _checkpoint_units(self, model_dir: Path, itemsize: int | None = None
                          ) -> tuple[list[Unit], int, torch.dtype | None]:
        """The units of :meth:`plan_checkpoint`, the bytes outside them, and the checkpoint's floating dtype."""
        from dsr1.models.checkpoint import CheckpointReader
        from dsr1.models.loading import read_hf_config

        reader = CheckpointReader(model_dir)
        try:
            names, dtype = reader.names(), reader.float_dtype()
            sizes: dict[str, int] = {}
            fixed = 0
            for name in names:
                numel = 1
                for d in reader.shape(name):
                    numel *= d
                stored = reader.stored_dtype(name)
                wide = itemsize or (dtype.itemsize if dtype is not None else stored.itemsize)
                size = numel * (wide if stored.is_floating_point else stored.itemsize)
                parts = name.split(".")
                if name.startswith("model.layers.") and parts[2].isdigit():
                    key = ".".join(parts[:3])
                elif name.startswith(("lm_head.", "model.embed_tokens.")):
                    key = name.rsplit(".", 1)[0]
                else:
                    fixed += size
                    continue
                sizes[key] = sizes.get(key, 0) + size
        finally:
            reader.close()
        tied = "lm_head" not in sizes and bool(read_hf_config(model_dir).get("tie_word_embeddings", True))
        layers = sorted((k for k in sizes if k.startswith("model.layers.")), key=lambda k: int(k.split(".")[2]))
        units = [Unit("model.embed_tokens", sizes.get("model.embed_tokens", 0), "embed", movable=not tied)]
        units += [Unit(k, sizes[k], "layer") for k in layers]
        units.append(Unit("lm_head", sizes.get("lm_head", 0), "head", movable=not tied))
        return units, fixed, dtype

    def _checkpoint_plan(self, units: list[Unit], fixed: int, dtype: torch.dtype | None, device: Device,
                         model_dir: Path) -> TierPlan:
        plan = self.plan(units, fixed, device, model_dir, dtype or torch.float32)
        where = str(dtype).removeprefix("torch.") if dtype is not None else "their stored dtypes"
        plan.notes.append(f"planned from the checkpoint's tensor sizes in {where}, before any quant plugin")
        return plan

    def build_state(self, pipeline: Any) -> dict[str, torch.Tensor]:
        """The builder's tensor dict: one that spills the units the checkpoint's plan puts on disk
        (:mod:`dsr1.pool.spill`), so host memory never holds the whole model while it is read."""
        model_dir = getattr(pipeline, "model_dir", None)
        if model_dir is None:
            return {}
        path, device = Path(model_dir), pipeline.device
        compute = device.torch_device()
        units, fixed, dtype = self._checkpoint_units(path)
        if compute.type == "cpu":
            plan = self._checkpoint_plan(units, fixed, dtype, device, path)
        else:
            # fits even in float32: built where it computes, nothing for place() to move. A float32
            # checkpoint's own sizes are those: its one plan answers both questions
            wide = (units, fixed) if dtype == torch.float32 else self._checkpoint_units(path, itemsize=4)[:2]
            plan = self._checkpoint_plan(*wide, dtype, device, path)
            self.direct = None if plan.hooked else compute
            if self.direct is not None:  # read straight to the device: nothing in host memory to spill
                return {}
            if dtype != torch.float32:
                plan = self._checkpoint_plan(units, fixed, dtype, device, path)
        disk = [u.name for u in plan.streamed if plan.tier[u.name] == "disk"]
        if not disk:
            return {}
        self.spill_dir = Path(tempfile.mkdtemp(prefix="dsr1-spill-", dir=self.disk_dir()))
        return SpillingState(disk, self.spill_dir)

    # --- placing ------------------------------------------------------------------------------

    def place(self, model: nn.Module, device: Device) -> nn.Module:
        with device.relayout_memory():  # the host copies that placing frees go back to the system
            return self._place(model, device)

    def _place(self, model: nn.Module, device: Device) -> nn.Module:
        compute = device.torch_device()
        pairs = model_units(model)
        fixed = _tensor_bytes(model) - sum(u.nbytes for u, _ in pairs)
        pipeline = getattr(model, "pipeline", None)
        dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
        plan = self.plan([u for u, _ in pairs], fixed, device, getattr(pipeline, "model_dir", None), dtype)
        graph = pipeline.choices.get("graph") if pipeline is not None else None
        if plan.hooked and graph is not None and graph.name != "eager":
            moved = sum(t != "device" for t in plan.tier.values())
            raise Dsr1Error(f"pool tiered moves {moved} units' weights or "
                            f"activations per step, which graph {graph.name!r} cannot capture; use graph: eager, "
                            f"or budgets that hold the model")
        off_device = {id(m) for u, m in pairs if plan.tier[u.name] != "device"}
        _move_except(model, compute, off_device)
        rope = getattr(model, "rope", None)
        if rope is not None and hasattr(rope, "to"):
            rope.to(compute)
        by_name = {u.name: m for u, m in pairs}
        for u in plan.units:
            if plan.tier[u.name] == "cpu-compute":
                _run_on_cpu(by_name[u.name], compute)
        if plan.streams:
            files = self._disk_files(plan)
            units = [(u.name, by_name[u.name], plan.tier[u.name]) for u in plan.streamed]
            plan.streamer = UnitStreamer(units, compute, files, plan.slots)
            if hasattr(model, "batch_layout"):
                model.batch_layout = False  # a CPU relayout would copy a streamed layer's buffer once, stale after
        spilled = getattr(self, "spill_dir", None)
        if spilled is not None:  # maps still open keep their pages; the names can go now
            shutil.rmtree(spilled, ignore_errors=True)
            self.spill_dir = None
        self.last_floor_s, self.last_rates = plan.floor_s(), plan.bandwidth
        runtime = getattr(model, "_runtime", None)
        if runtime is not None:
            runtime.placement = plan
            if plan.bytes_on("cpu-compute"):
                runtime.compute_device = compute
        return model

    def _disk_files(self, plan: TierPlan) -> dict[str, Path]:
        """Where each disk unit's safetensors file goes: a directory of this placement's own,
        removed when the model is collected (only files this pool wrote are ever removed)."""
        names = [u.name for u in plan.streamed if plan.tier[u.name] == "disk"]
        if not names:
            return {}
        tag = hashlib.sha1(f"{os.getpid()}-{id(plan)}".encode()).hexdigest()[:12]
        root = Path(tempfile.mkdtemp(prefix=f"dsr1-tiered-{tag}-", dir=self.disk_dir()))
        weakref.finalize(plan, shutil.rmtree, root, True)
        return {name: root / f"{name}.safetensors" for name in names}

    def kv_swap(self, kv_bytes_per_token: int, device: torch.device) -> SwapPolicy | None:
        """Swap a preempted request's KV to pinned host memory when copying it out and back costs
        less than one pass over the weights (what recomputing its tokens takes at the least)."""
        if self.options.kv_swap_gb == 0 or device.type != "cuda":
            return None  # on a CPU-only machine the KV already lives in host memory
        # the figures the placement planned with (measured now for a model this pool did not place)
        rates = getattr(self, "last_rates", None) or bw.bandwidths(device, self.disk_dir(), self.options.bandwidth_gbps)
        weights_pass = getattr(self, "last_floor_s", 0.0)

        def should_swap(num_tokens: int) -> bool:
            return 2 * num_tokens * kv_bytes_per_token / rates["host_to_device"] < weights_pass

        return SwapPolicy(int(self.options.kv_swap_gb * GIB), should_swap, pin=True)


def _move_except(model: nn.Module, target: torch.device, skip: set[int]) -> None:
    """Every parameter and buffer of ``model`` to ``target``, except those under the modules in ``skip``."""
    def walk(module: nn.Module) -> None:
        if id(module) in skip:
            return
        for name, p in module._parameters.items():
            if p is not None and p.device != target:
                p.data = p.data.to(target)
        for name, b in module._buffers.items():
            if b is not None and b.device != target:
                module._buffers[name] = b.to(target)
        for child in module.children():
            walk(child)

    walk(model)


def _run_on_cpu(module: nn.Module, compute: torch.device) -> None:
    """Run the weight-bearing parts of ``module`` where their weights are (the CPU), everything
    else on ``compute``. A submodule holding a matrix (a projection, an embedding table, stacked
    experts) runs on the CPU whole: its tensor inputs go there and its outputs come back. Vectors
    (norm weights, biases outside a projection) move to ``compute`` with the modules that use them,
    so attention and the norms of a layer run on the CPU stay on the device with its KV cache."""
    own = [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]
    if any(t.dim() >= 2 for t in own):
        module.register_forward_pre_hook(_inputs_to_cpu, with_kwargs=True)
        module.register_forward_hook(lambda mod, args, out: _to(out, compute, non_blocking=True))
        return
    for name, p in module._parameters.items():
        if p is not None:
            p.data = p.data.to(compute)
    for name, b in module._buffers.items():
        if b is not None:
            module._buffers[name] = b.to(compute)
    for child in module.children():
        _run_on_cpu(child, compute)


def _to(value: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``value`` with its tensors (also inside tuples, lists and dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device, non_blocking) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device, non_blocking) for k, v in value.items()}
    return value


def _inputs_to_cpu(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    return _to(args, torch.device("cpu")), _to(kwargs, torch.device("cpu"))


@hookimpl
def dsr1_pool() -> PluginSpec:
    return PluginSpec(name="tiered", family="pool", impl=TieredPool, options=TieredOptions,
                      description="weights over GPU, pinned CPU memory and disk within budgets, streamed per layer")
