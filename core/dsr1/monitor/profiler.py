"""Builtin monitor ``profiler``: operator timings of every Nth engine step, step latency per bucket.

Everything :mod:`dsr1.monitor.timing` keeps (the ``prefill`` / ``decode`` spans), plus:

* **Step latency** of every engine step, as a running mean and variance per bucket: the phase
  (``prefill`` when some request fed more than one token, else ``decode``), the batch size and
  the longest context, each rounded up to a power of two (:func:`bucket`).
* **Operator timings** of every ``every``-th step (steps ``every``, ``2 * every``...): the time
  spent in each sub-block of the model, by category (:data:`OPERATORS`): ``norm``, ``qkv``,
  ``attention`` (the self-attention module less its timed projections and norms: rope, the KV
  cache and the attention plugin), ``o_proj``, ``mlp``, ``lm_head``, and ``sampling`` (from the
  end of the last ``lm_head`` to the end of the step: the sampler and the copy of the ids).
  On CUDA the marks are CUDA events, read back lazily (when the next sampled step starts, or
  when someone reads the figures), so a step never waits for them; elsewhere ``perf_counter``.

Cost. Forward hooks exist only during a sampled step: they are put on the model's sub-blocks
when it begins and removed when it ends, so an unsampled step runs the model exactly as without
this monitor and pays two clock reads and one running-mean update in the engine loop. A sampled
step times the sub-blocks of ``layers`` decoder layers (one by default, the next ones at the next
sample, round the model) and everything outside the layers; a layer category's time is the timed
layers' times scaled to the whole stack. Hooks and marks on every sub-block of every layer cost
a launch-bound eager step several times its own length, and that would be the overhead of
sampling; ``layers: all`` times them all (its own cost then shows in the figures). A step
that replays a captured CUDA graph or runs compiled code does not call module hooks (torch
ignores hooks added after compiling): those steps get their step time only, and operator timings
come from eager forwards (prefill, or ``graph: eager``, which ``dsr1 profile`` uses). The hooks do
nothing while dynamo traces, so no mark is compiled in; code first traced during a sampled step is
traced once more when the hooks go (dynamo guards on hook dicts that were not empty), then never.

Exports: :meth:`ProfilerMonitor.summary` (per bucket, plain data), :meth:`~ProfilerMonitor.stream`
(one ``profile.step`` event per sampled step after the recorded events),
:meth:`~ProfilerMonitor.operator_stats` (the server's ``/metrics``) and
:meth:`~ProfilerMonitor.write_trace` (Chrome trace JSON, as ``torch.profiler`` writes it).
"""
from __future__ import annotations

import collections
import heapq
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.hooks import RemovableHandle

from dsr1.errors import Dsr1Error
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import OperatorStat
from dsr1.monitor.clocks import CudaClock, HostClock, RunningStat
from dsr1.monitor.timing import TimingMonitor
from dsr1.output_files import replace_atomic
from dsr1.specs import PluginSpec

#: The operator categories, in the order data flows through a layer.
OPERATORS = ("embed", "norm", "qkv", "attention", "o_proj", "mlp", "lm_head", "sampling")
#: Categories whose time is spent reading the module's weights (achieved bandwidth = bytes / time).
WEIGHT_BOUND = ("qkv", "o_proj", "mlp", "lm_head")
#: ``otherData.writer`` of the traces this module writes: the only files :meth:`write_trace` replaces.
TRACE_WRITER = "dsr1.monitor.profiler"

#: Module names (the last part of the dotted name) of each category, across the builtin architectures.
_NAMES: dict[str, str] = {
    **dict.fromkeys(("embed_tokens", "wte", "word_embeddings"), "embed"),
    **dict.fromkeys(("qkv_proj", "q_proj", "k_proj", "v_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                     "kv_b_proj", "query", "key", "value"), "qkv"),
    **dict.fromkeys(("self_attn", "attn", "attention"), "attention"),
    **dict.fromkeys(("o_proj", "out_proj"), "o_proj"),
    **dict.fromkeys(("mlp", "feed_forward"), "mlp"),
    "lm_head": "lm_head",
}


#: the decoder layer a dotted module name sits in (``model.layers.3.mlp`` → 3; GPT-2's ``h.3``, BERT's ``layer.3``)
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)(?:\.|$)")


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (1 for 0 and 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def classify(name: str) -> str | None:
    """The category of the module at dotted ``name``, or None (not timed)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith("norm"):  # input_layernorm, post_attention_layernorm, norm, q_norm, ln_f...
        return "norm"
    return _NAMES.get(leaf)


Key = tuple[str, int, int]  # (phase, batch bucket, context bucket)


class ProfilerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    every: int = Field(100, ge=1, description="time the operators of every Nth engine step (1: every step)")
    keep: int = Field(256, ge=1, description="sampled steps kept for stream() and the Chrome trace (the newest)")
    layers: Annotated[int, Field(ge=1)] | Literal["all"] = Field(
        1, description="decoder layers whose sub-blocks one sampled step times, taken in turn ('all': every layer)")


@dataclass
class _Sample:
    """One sampled step, until its marks are read."""

    index: int
    key: Key
    batch_size: int
    context_len: int
    begin: Any
    time: float  # time.time() at the step's start, as the timing monitor's events carry
    wall_start: float  # the step clock at its start (the trace's time line)
    plan: _Plan  # the plan the spans index into (a later walk may replace the monitor's)
    layers: tuple[int, ...] = ()  # the decoder layers whose sub-blocks this step timed
    # one entry per span, in the order spans opened: parallel lists, so a hook appends plain values
    points: list[int] = field(default_factory=list)  # index into plan.points
    parents: list[int] = field(default_factory=list)  # index of the enclosing timed span, -1 at the top
    starts: list[Any] = field(default_factory=list)
    ends: list[Any] = field(default_factory=list)  # None while open; a forward that raised leaves it so
    end: Any = None
    wall_s: float = 0.0


@dataclass
class _Plan:
    """The timed modules of one model, found by one walk and kept until its module tree changes."""

    points: list[tuple[torch.nn.Module, str, str]]  # (module, operator, dotted name)
    owned: list[tuple[torch.nn.Module, str]]  # (module, operator whose weight bytes its own tensors count to)
    tree: list[tuple[torch.nn.Module, tuple[torch.nn.Module, ...]]]  # every module with children, and them
    pre_hooks: list[Callable[..., None]] = field(default_factory=list)  # one per point, made once
    ids: list[int] = field(default_factory=list)  # each point's hook id in the module's hook dicts
    layer_of: list[int] = field(default_factory=list)  # each point's decoder layer (-1: outside the layers)
    n_layers: int = 0  # decoder layers holding a timed point

    def chosen(self, layers: int | str, turn: int) -> tuple[list[int], tuple[int, ...]]:
        """The points one sampled step times and the layers they cover: every point outside the layers,
        and the sub-blocks of ``layers`` consecutive layers starting at ``turn * layers`` (mod the count)."""
        n = self.n_layers
        if layers == "all" or int(layers) >= n:
            return list(range(len(self.points))), tuple(range(n))
        k = int(layers)
        timed = tuple(sorted((turn * k + i) % n for i in range(k)))
        return [i for i, layer in enumerate(self.layer_of) if layer < 0 or layer in timed], timed

    def current(self) -> bool:
        """Whether no module was added, removed or replaced since the walk: every parent still has the
        same children (by identity). One tuple per parent module, far cheaper than the walk."""
        return all(tuple(m._modules.values()) == kids for m, kids in self.tree)


# --- the monitor -------------------------------------------------------------------------------


class ProfilerMonitor(TimingMonitor):
    """Operator timings of sampled steps and step latency per (phase, batch, context) bucket.

    :param clock: the operator clock (default: CUDA events for a model on CUDA, else ``perf_counter``).
    :param wall: the step clock (default ``perf_counter``); tests pass fake clocks.
    """

    Options = ProfilerOptions
    watches_steps = True

    def __init__(self, options: Any = None, clock: Any = None, wall: Callable[[], float] = time.perf_counter) -> None:
        super().__init__(options)
        self.every = int(self.options.every)
        self.layers = self.options.layers
        self._turn = 0  # sampled steps so far: which layers the next one times
        self._fixed_clock = clock
        self.clock: Any = clock if clock is not None else HostClock()
        self.wall = wall
        self.model: torch.nn.Module | None = None
        self._cuda = False
        self.steps_seen = 0
        self._shape = (0, 0, 0)
        self._t0 = 0.0
        self._sample: _Sample | None = None
        self._stack: list[int] = []
        self._hooked: _Plan | None = None  # the plan whose hooks are on the model
        self._plan: _Plan | None = None  # the model's timed modules, walked once (see _planned)
        self.walks = 0  # module-tree walks so far: one per model and per change of its module set
        self._pending: list[_Sample] = []
        #: the engine thread folds samples on sampled steps, a /metrics scrape on its own thread
        self._fold_lock = threading.Lock()
        self.step_stats: dict[Key, RunningStat] = {}
        self.op_stats: dict[Key, dict[str, RunningStat]] = {}
        self.samples: collections.deque[dict[str, Any]] = collections.deque(maxlen=int(self.options.keep))

    # --- the engine's calls (every step: keep them cheap) --------------------------------------

    def attach(self, model: torch.nn.Module) -> None:
        self.model = model
        self._plan = None
        first = next(model.parameters(), None)
        self._cuda = first is not None and first.is_cuda
        if self._fixed_clock is None:
            self.clock = CudaClock() if self._cuda else HostClock()

    def begin_step(self, batch_size: int, context_len: int, tokens: int) -> None:
        self.steps_seen += 1
        self._shape = (batch_size, context_len, tokens)
        self._t0 = self.wall()
        if self.steps_seen % self.every == 0:
            self._start_sample()

    def end_step(self) -> None:
        wall_s = self.wall() - self._t0
        b, c, t = self._shape
        key = ("decode" if t <= b else "prefill", bucket(b), bucket(c))
        stat = self.step_stats.get(key)
        if stat is None:
            stat = self.step_stats[key] = RunningStat()
        stat.add(wall_s)
        if self._sample is not None:
            self._finish_sample(key, wall_s)

    # --- sampled steps -------------------------------------------------------------------------

    def _start_sample(self) -> None:
        self._resolve(block=False)  # the previous samples' events are done by now, as a rule
        self.clock.begin()
        b, c, _ = self._shape
        self._stack = []
        plan = self._planned() if self.model is not None else _Plan([], [], [])
        points, layers = plan.chosen(self.layers, self._turn)
        self._turn += 1
        # what register_forward_{pre_,}hook do, less a RemovableHandle per hook and step: the ids were
        # taken from torch's counter once, by the walk, so they collide with no other hook
        post = self._post
        for i in points:
            module, hid = plan.points[i][0], plan.ids[i]
            module._forward_pre_hooks[hid] = plan.pre_hooks[i]
            module._forward_hooks[hid] = post
        self._hooked = plan
        self._t0 = self.wall()  # the step's clock starts after the profiler's own set-up
        self._sample = _Sample(self.steps_seen, ("", 0, 0), b, c, self.clock.mark(), time.time(), self._t0, plan,
                               layers)

    def _planned(self) -> _Plan:
        """The model's plan: walked on the first sampled step, and again only when a module was added,
        removed or replaced since (a layout change may swap modules); weight bytes are counted afresh."""
        assert self.model is not None
        plan = self._plan
        if plan is None or not plan.current():
            plan = self._plan = self._walk(self.model)
        return plan

    @property
    def weight_bytes(self) -> dict[str, int]:
        """Weight bytes of each category (params and buffers of its modules), counted when read: tensors
        can be replaced in place (quantization), and a step should not pay for counting them."""
        nbytes: dict[str, int] = dict.fromkeys(OPERATORS, 0)
        for module, op in self._plan.owned if self._plan is not None else ():
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            nbytes[op] += sum(p.numel() * p.element_size() for p in own)
        return {k: v for k, v in nbytes.items() if v}

    def _walk(self, model: torch.nn.Module) -> _Plan:
        """Find every categorised module, the modules whose tensors each category owns, and the tree."""
        self.walks += 1
        timed: dict[str, str] = {}
        points: list[tuple[torch.nn.Module, str, str]] = []
        owned: list[tuple[torch.nn.Module, str]] = []
        tree: list[tuple[torch.nn.Module, tuple[torch.nn.Module, ...]]] = []
        for name, module in model.named_modules():
            if module._modules:
                tree.append((module, tuple(module._modules.values())))
            op = classify(name) if name else None
            if op is not None:
                timed[name] = op
                points.append((module, op, name))
            owner = name  # the nearest timed module at or above this one owns its tensors
            while owner and owner not in timed:
                owner = owner.rpartition(".")[0]
            if owner in timed and (module._parameters or module._buffers):
                owned.append((module, timed[owner]))
        plan = _Plan(points, owned, tree)
        plan.pre_hooks = [self._pre(i) for i in range(len(points))]
        found = [_LAYER.findall(name) for _, _, name in points]
        plan.layer_of = [int(m[0]) if m else -1 for m in found]  # the outermost layer index in the name
        ids = sorted({x for x in plan.layer_of if x >= 0})
        renumber = {x: i for i, x in enumerate(ids)}  # dense: a pipeline stage's layers may not start at 0
        plan.layer_of = [renumber.get(x, -1) for x in plan.layer_of]
        plan.n_layers = len(ids)
        plan.ids = [RemovableHandle(collections.OrderedDict()).id for _ in points]  # reserves unique hook ids
        return plan

    # The hooks run on every timed module call of a sampled step, and on CUDA at small batch the host
    # is what the events measure: a hook's own work between two marks is charged to the enclosing
    # span. So a pre-hook takes its mark last and a post-hook first, and both do only list appends.

    def _pre(self, point: int) -> Callable[..., None]:
        is_compiling, capturing, cuda = torch.compiler.is_compiling, torch.cuda.is_current_stream_capturing, self._cuda

        def hook(module: torch.nn.Module, args: Any) -> None:
            if is_compiling():  # first, before reading any state dynamo would then guard on
                return
            sample = self._sample
            if sample is None or (cuda and capturing()):
                return  # a capture would bake the mark into the graph
            stack = self._stack
            sample.parents.append(stack[-1] if stack else -1)
            stack.append(len(sample.starts))
            sample.points.append(point)
            sample.ends.append(None)
            sample.starts.append(self.clock.mark())

        return hook

    def _post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        sample = self._sample
        if sample is None or not self._stack or (self._cuda and torch.cuda.is_current_stream_capturing()):
            return
        end = self.clock.mark()
        sample.ends[self._stack.pop()] = end

    def _finish_sample(self, key: Key, wall_s: float) -> None:
        sample, self._sample = self._sample, None
        assert sample is not None
        plan, self._hooked = self._hooked, None
        for (module, _, _), hid in zip(plan.points if plan is not None else (), plan.ids if plan is not None else ()):
            module._forward_pre_hooks.pop(hid, None)
            module._forward_hooks.pop(hid, None)
        sample.key, sample.end, sample.wall_s = key, self.clock.mark(), wall_s
        self._pending.append(sample)
        self._resolve(block=False)

    def _resolve(self, block: bool) -> None:
        """Fold the pending samples whose marks are done (``block``: all of them, waiting if need be)."""
        with self._fold_lock:
            keep: list[_Sample] = []
            for sample in self._pending:
                if not block and not self.clock.ready(sample.end):
                    keep.append(sample)
                    continue
                self.clock.wait(sample.end)
                self._fold(sample)
            self._pending = keep

    def _fold(self, sample: _Sample) -> None:
        clock, points = self.clock, sample.plan.points
        # a forward that raised leaves spans open (no end): they count for nothing
        durs = [clock.seconds(a, z) if z is not None else 0.0 for a, z in zip(sample.starts, sample.ends)]
        own = list(durs)
        for i, parent in enumerate(sample.parents):  # exclusive times: timed children are their own operators
            if parent >= 0:
                own[parent] -= durs[i]
        closed = [i for i, z in enumerate(sample.ends) if z is not None]
        # the sub-blocks of the timed layers stand for every layer's (the layers of one model do the same work)
        scale = sample.plan.n_layers / len(sample.layers) if sample.layers else 1.0
        per_op: dict[str, float] = {}
        for i in closed:
            point = sample.points[i]
            op = points[point][1]
            per_op[op] = per_op.get(op, 0.0) + own[i] * (scale if sample.plan.layer_of[point] >= 0 else 1.0)
        heads = [i for i in closed if points[sample.points[i]][1] == "lm_head"]
        if heads:
            per_op["sampling"] = clock.seconds(sample.ends[heads[-1]], sample.end)
        stats = self.op_stats.setdefault(sample.key, {})
        for op, t in (("step", sample.wall_s), *per_op.items()):
            stats.setdefault(op, RunningStat()).add(t)
        phase, bb, cb = sample.key
        self.samples.append({
            "event": "profile.step", "time": sample.time, "step": sample.index,
            "phase": phase, "batch_size": sample.batch_size, "context_len": sample.context_len, "batch_bucket": bb,
            "context_bucket": cb, "seconds": sample.wall_s, "operators": per_op, "wall_start": sample.wall_start,
            "layers": list(sample.layers),
            "spans": [(points[sample.points[i]][1], points[sample.points[i]][2],
                       clock.seconds(sample.begin, sample.starts[i]), durs[i]) for i in closed],
        })
        clock.release([sample.begin, sample.end, *sample.starts, *(z for z in sample.ends if z is not None)])

    # --- readers -------------------------------------------------------------------------------

    def clear(self) -> None:
        super().clear()
        self._resolve(block=True)
        self.step_stats.clear()
        self.op_stats.clear()
        self.samples.clear()

    def stream(self) -> Iterator[dict[str, Any]]:
        """The recorded events and one ``profile.step`` per kept sampled step, oldest first."""
        self._resolve(block=True)
        samples = [{k: v for k, v in s.items() if k not in ("spans", "wall_start")} for s in self.samples]
        return heapq.merge(list(self.events), samples, key=lambda e: e["time"])

    def operator_stats(self) -> list[OperatorStat]:
        self._resolve(block=True)
        # copies: the engine thread may add a bucket meanwhile (list() of a dict's items is one step under the GIL)
        steps = sorted(list(self.step_stats.items()))
        out = [OperatorStat(*key, "step", s.count, s.mean, s.variance) for key, s in steps]
        for key, ops in sorted(list(self.op_stats.items())):
            out += [OperatorStat(*key, f"sampled.{op}" if op == "step" else op, s.count, s.mean, s.variance)
                    for op, s in list(ops.items())]
        return out

    def summary(self) -> dict[str, Any]:
        """The timing monitor's summary, plus ``profile``: per bucket the step latency (every step), and
        for sampled steps each operator's mean seconds per step, variance and share of the step."""
        out = super().summary()
        self._resolve(block=True)
        buckets = []
        for key in sorted(set(self.step_stats) | set(self.op_stats)):
            phase, bb, cb = key
            step = self.step_stats.get(key, RunningStat())
            ops = self.op_stats.get(key, {})
            sampled = ops.get("step", RunningStat())
            buckets.append({
                "phase": phase, "batch_bucket": bb, "context_bucket": cb,
                "steps": step.count, "step_mean_s": step.mean, "step_variance_s": step.variance,
                "sampled_steps": sampled.count,
                "operators": {op: {"mean_s": s.mean, "variance_s": s.variance,
                                   "share": s.mean / sampled.mean if sampled.mean else None}
                              for op, s in ops.items() if op != "step"},
            })
        out["profile"] = {"every": self.every, "layers": self.layers, "steps": self.steps_seen,
                          "weight_bytes": dict(self.weight_bytes), "buckets": buckets}
        return out

    # --- Chrome trace --------------------------------------------------------------------------

    def trace(self) -> dict[str, Any]:
        """The kept sampled steps as a Chrome trace (``chrome://tracing``, Perfetto): one complete event per
        step (thread 0, host time) and per timed module (thread 1, device time from the step's start)."""
        self._resolve(block=True)
        events: list[dict[str, Any]] = [
            {"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "dsr1"}},
            {"ph": "M", "pid": 0, "tid": 0, "name": "thread_name", "args": {"name": "engine steps"}},
            {"ph": "M", "pid": 0, "tid": 1, "name": "thread_name", "args": {"name": "operators"}},
        ]
        first = self.samples[0]["wall_start"] if self.samples else 0.0
        for s in self.samples:
            ts = (s["wall_start"] - first) * 1e6  # microseconds from the first kept sample, on the step clock
            events.append({"ph": "X", "pid": 0, "tid": 0, "cat": "step", "name": f"{s['phase']} step {s['step']}",
                           "ts": ts, "dur": s["seconds"] * 1e6,
                           "args": {"batch_size": s["batch_size"], "context_len": s["context_len"]}})
            for op, module, offset, dur in s["spans"]:
                events.append({"ph": "X", "pid": 0, "tid": 1, "cat": op, "name": module or op,
                               "ts": ts + offset * 1e6, "dur": dur * 1e6})
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"writer": TRACE_WRITER, "every": self.every}}

    def write_trace(self, path: str | Path) -> Path:
        """Write :meth:`trace` to ``path`` atomically. An existing file is replaced only if it is a trace
        this module wrote; anything else there is a one-line error."""
        path = Path(path)
        if path.exists() or path.is_symlink():
            if not is_own_trace(path):
                raise Dsr1Error(f"{path} exists and is not a trace dsr1 wrote; pass another path or move it away")
        text = json.dumps(self.trace())
        replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path


def is_own_trace(path: Path) -> bool:
    """Whether ``path`` is a regular file holding a trace :meth:`ProfilerMonitor.write_trace` wrote."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("otherData"), dict) and (
        data["otherData"].get("writer") == TRACE_WRITER)


@hookimpl
def dsr1_monitor() -> PluginSpec:
    return PluginSpec(
        name="profiler",
        family="monitor",
        impl=ProfilerMonitor,
        options=ProfilerOptions,
        description="operator timings of every Nth step and step latency per (batch, context) bucket",
    )
