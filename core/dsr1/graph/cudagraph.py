"""Builtin graph pass ``cudagraph``: the decode step captured as one CUDA graph.

What the decode step costs at batch 1 on a GPU is mostly launching its kernels (a 28-layer
model issues several hundred per token), not running them. This pass removes that cost the
way gpt-fast and vLLM do:

* the step gets static shapes: :meth:`LlamaForCausalLM.decode_static` writes the new key and
  value at a slot held *on the device* (``ContiguousKVCache.update_static``) and attends over
  the whole preallocated cache, masking the slots after the current one;
* its inputs live in fixed buffers (:class:`DecodeGraph`); each token copies the new ids,
  positions and slot into them and replays the graph; the only host sync left per token is
  reading the sampled token;
* with ``compile: true`` the step is first compiled by ``torch.compile`` (the device's
  backend and tiling settings, ``dynamic=False``), so inductor fuses the norms, rotary
  embedding and activation kernels before capture, for batches up to ``compile_max_batch``
  (larger ones measured faster with cuBLAS's kernels captured as they are: see the option).
  This is what the hardware section's ``kernel_fusion: true`` selects on ``nvidia``.

Prefill runs eagerly. One graph is captured per (batch size, cache capacity) and reused;
the contiguous cache rounds its capacity up to 256 slots, so generate calls of similar
lengths share a graph. A graph holds raw pointers to the cache and rotary tables, so when
either is reallocated every graph captured against the old buffers is dropped. All graphs
capture into one memory pool that :class:`DecodeGraphs` keeps open with a
``torch.cuda.MemPool`` for its whole life: with a bare ``graph_pool_handle()`` the pool's
use count fell to zero when the last graph in it was dropped, and the next capture into that
id failed inside the caching allocator (``use_count > 0`` assert) and kept failing. :class:`DecodeGraph` with ``capture=False`` runs the same static step
without a graph; the CPU tests use it to check that the static step decodes exactly what
the ordinary one does.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import ConfigDict, Field

from dsr1.errors import Dsr1Error
from dsr1.graph.compile import CompileOptions, compile_kwargs
from dsr1.graph.paged_plans import FixedPaged
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Device, GraphPass, GraphSteps
from dsr1.models.common import CausalLM
from dsr1.specs import PluginSpec

#: warm-up runs before capture (cuBLAS workspaces, autotuning, compilation happen here).
WARMUP_STEPS = 3


class DecodeGraph:
    """One static decode step for a (batch, capacity) shape, optionally captured.

    :param step: ``(ids, positions, slot, key_valid, cache) -> logits (B, V)``, usually
        ``model.decode_static`` or its compiled version.
    """

    def __init__(
        self, step: Callable[..., torch.Tensor], cache: Any, shape: tuple[int, int], device: torch.device,
        capture: bool, pool: Any = None,
    ) -> None:
        b, cap = shape  # batch, cache capacity
        self.step, self.cache, self.capture = step, cache, capture
        self.ids = torch.zeros((b, 1), dtype=torch.long, device=device)  # (B, 1)
        self.positions = torch.zeros((b, 1), dtype=torch.long, device=device)  # (B, 1)
        self.slot = torch.zeros((1,), dtype=torch.long, device=device)  # (1,)
        self.key_valid = torch.ones((b, cap), dtype=torch.bool, device=device)  # (B, Tcap)
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def prepare(self, key_valid: torch.Tensor) -> None:
        """Start of a generate call: which prompt slots are padding. ``(B, T)`` with ``T <= Tcap``."""
        self.key_valid.fill_(True)
        self.key_valid[:, : key_valid.shape[1]].copy_(key_valid)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """Logits ``(B, V)`` of the token ``ids`` ``(B, 1)`` at ``positions`` written to ``slot``.

        The returned tensor is the graph's output buffer: read it before the next call."""
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.slot.fill_(slot)
        if not self.capture:
            return self.step(self.ids, self.positions, self.slot, self.key_valid, self.cache)
        if self.graph is None:
            self._capture()
        assert self.graph is not None and self.logits is not None
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # Warm-up and capture write this step's key/value at this step's slot, exactly what the
        # replay that follows writes again: the cache is left as the real step leaves it.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.step(self.ids, self.positions, self.slot, self.key_valid, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self.step(self.ids, self.positions, self.slot, self.key_valid, self.cache)
        except BaseException:
            # leave nothing half-captured behind: the next call captures again from scratch
            del graph
            torch.cuda.synchronize()
            raise
        self.graph, self.logits = graph, logits


class DecodeGraphs:
    """The captured steps of one model, by shape; the engine's batch runner asks it for a step.

    ``compiled`` (when set) is used for batches up to ``compiled_max_batch``, ``step`` above.
    """

    def __init__(
        self, step: Callable[..., torch.Tensor], capture: bool,
        compiled: Callable[..., torch.Tensor] | None = None, compiled_max_batch: int = 0,
    ) -> None:
        self.step, self.capture = step, capture
        self.compiled, self.compiled_max_batch = compiled, compiled_max_batch
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        #: pointers of the buffers the graphs in ``graphs`` were captured against
        self.buffers: tuple[int, ...] = ()
        # The MemPool object holds a reference on the pool for as long as this object lives, so
        # dropping graphs never closes it under the ones captured later.
        self.mempool = torch.cuda.MemPool() if capture else None
        self.pool = self.mempool.id if self.mempool is not None else None

    def runner(self, model: CausalLM, cache: Any, key_valid: torch.Tensor) -> DecodeGraph:
        """The step for this call's batch and the cache's capacity, prepared with ``key_valid``."""
        update_static = getattr(cache, "update_static", None)
        if update_static is None:
            raise Dsr1Error(f"graph 'cudagraph' needs a kvcache with static slots ('contiguous'); "
                            f"{type(cache).__name__} has none: use kvcache 'contiguous' or graph 'eager'")
        if model.recurrent:
            raise Dsr1Error("graph 'cudagraph' captures a K/V-cache decode step; recurrent (linear) attention has "
                            "none: use graph 'eager' or 'compile'")
        b = key_valid.shape[0]
        cap = int(cache.capacity)
        rope = model.rope
        # a graph holds raw pointers: every cache buffer and rotary table must be the captured one
        buffers = (*(t.data_ptr() for t in (*cache.k, *cache.v)), rope.cos.data_ptr(), rope.sin.data_ptr(),
                   rope.sin_signed.data_ptr(), rope.cos.shape[0])
        if buffers != self.buffers:
            self.graphs.clear()  # captured against buffers that are gone
            self.buffers = buffers
        graph = self.graphs.get((b, cap))
        if graph is None:
            step = self.compiled if self.compiled is not None and b <= self.compiled_max_batch else self.step
            graph = DecodeGraph(step, cache, (b, cap), key_valid.device, self.capture, self.pool)
            self.graphs[(b, cap)] = graph
        graph.prepare(key_valid)
        return graph


class CudaGraphOptions(CompileOptions):
    model_config = ConfigDict(extra="forbid")

    #: compile the static step with ``torch.compile`` (fusion) before capturing it.
    compile: bool = False
    #: largest batch that runs the compiled step; larger ones capture the eager kernels: on the
    #: H200 inductor's step won only at batch 1 (bench/results/decode-h200/README.md).
    compile_max_batch: int = Field(default=1, ge=1)
    #: capture a CUDA graph (off: run the static step eagerly, e.g. to compare outputs).
    capture: bool = True


class CudaGraphPass(GraphPass):
    Options = CudaGraphOptions
    options: CudaGraphOptions

    def apply(self, model: Any, device: Device) -> GraphSteps:
        if not isinstance(model, CausalLM):  # encoders have no decode step
            return GraphSteps()
        step = model.decode_static
        capture = self.options.capture
        if capture and device.torch_device_type != "cuda":
            raise Dsr1Error(f"graph 'cudagraph' captures CUDA graphs and the device is "
                            f"{device.torch_device_type!r}; use graph 'compile' there, or option capture: false")
        plain, compiled = step, None
        kwargs = compile_kwargs(self.options, device) if self.options.compile else None  # None: plain step only
        if kwargs:
            kwargs["dynamic"] = False
            if capture and kwargs["backend"] == "inductor":  # captured here, not by inductor's cudagraph trees
                from torch._inductor import list_mode_options

                mode = kwargs.pop("mode", None)
                opts = dict(kwargs.get("options") or {})
                if mode:
                    opts = {**list_mode_options(mode, False), **opts}
                opts["triton.cudagraphs"] = False
                kwargs["options"] = opts
            compiled = torch.compile(step, **kwargs)
        paged = ("cudagraph" if capture else "eager") + ("+compile" if compiled is not None else "")
        paged = {"eager+compile": "compile"}.get(paged, paged)
        return GraphSteps(decode_graphs=DecodeGraphs(plain, capture, compiled, self.options.compile_max_batch),
                          compile_kwargs=kwargs or None,
                          paged=FixedPaged(paged, self.options.compile_max_batch if compiled is not None else None))

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        if self.options.capture and device != "cuda":
            return [f"graph 'cudagraph' captures CUDA graphs and needs device 'cuda', not {device!r}; "
                    "use graph 'compile' (or option capture: false)"]
        return []


@hookimpl
def dsr1_graph() -> PluginSpec:
    return PluginSpec(
        name="cudagraph",
        family="graph",
        impl=CudaGraphPass,
        options=CudaGraphOptions,
        capabilities=frozenset({"kernel_fusion", "autotune"}),
        description="static-shape decode step captured as a CUDA graph (optionally torch.compile'd first)",
    )
