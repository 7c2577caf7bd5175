"""Builtin graph pass ``adaptive``: per (batch, context) bucket, the fastest decode plan the device offers.

No fixed plan is the fastest everywhere: on a GPU the compiled and captured step wins at small
batches and plain captured kernels win at large ones (``bench/results/decode-h200``), and on a CPU
compile may or may not beat eager for a given shape. So instead of a hand-set threshold
(``cudagraph``'s ``compile_max_batch``), this pass measures:

* **candidates** are the plans of the other builtin passes: ``eager`` (the model's
  ``forward_step``), ``compile`` (its ``torch.compile``'d version), and on CUDA ``cudagraph`` (the
  static step captured) and ``cudagraph+compile`` (compiled, then captured). A quant plugin that
  implements :class:`KernelChoices` multiplies them by its kernels (``cudagraph[int8pack]``).
* a **bucket** is ``(batch rows, cache capacity)``: the shape a captured graph is keyed by (the
  contiguous cache rounds its capacity up, so generate calls of similar lengths share one).
* the first decode step of a bucket runs each candidate ``warmup_steps`` times (compilation and
  capture happen there) and ``trial_steps`` timed times (CUDA events on CUDA, ``perf_counter``
  elsewhere) on the step's real inputs, keeps the fastest and returns its logits. Repeating a step
  writes the same key and value at the same slot again, so the trials leave the cache exactly as
  one step does; a kvcache without static slots (whose update may not be repeatable, e.g. an
  evicting one) is not tried and runs eagerly.
* a candidate that fails (compile error, capture error) is excluded for the model's life with a
  one-line warning naming it; the next best is used.
* after the choice the step only counts: the time between consecutive calls is compared with a
  baseline (the median of the first calls after the choice); ``drift_steps`` calls in a row off by
  more than ``drift_fraction`` re-run the trials at the next call (twice as many after each
  re-plan of the bucket, so that a noisy machine does not spend its time measuring).
* choices are logged (logger ``dsr1``), recorded on the monitor (``graph.plan``), reported by
  :meth:`AdaptiveSteps.report` (``GraphSteps.report``) and cached on disk
  (:mod:`dsr1.graph.plan_cache`), so a second start skips the trials.

The measuring is an object (:class:`StepTimer`) the tests replace with a fake that returns
scripted latencies per (plan, bucket). Nothing here goes through pluggy on the per-token path:
the pass resolves everything into plain objects once, in :meth:`AdaptiveGraph.apply`.
"""
from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field

from dsr1.errors import Dsr1Error
from dsr1.graph.compile import CompileGraph, CompileOptions
from dsr1.graph.cudagraph import CudaGraphOptions, CudaGraphPass
from dsr1.graph.candidates import Bucket, Candidate, KernelChoices, Step, captured, unbound, unfixed, with_kernel
from dsr1.graph.paged_plans import PLANS, MeasuredPaged
from dsr1.graph.plan_cache import PlanCache, device_name, model_fingerprint
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import Device, GraphPass, GraphSteps
from dsr1.models.common import CausalLM
from dsr1.specs import PluginSpec

#: calls after a choice whose median is the drift baseline
BASELINE_STEPS = 8

log = logging.getLogger("dsr1")


class AdaptiveOptions(CompileOptions):
    """``tiling_strategy``, ``mode``, ``dynamic`` and ``fallback`` go to the compiled candidates."""

    model_config = ConfigDict(extra="forbid")

    #: plans to try (default: every plan the device offers, see :data:`PLANS`).
    candidates: list[Literal["eager", "compile", "cudagraph", "cudagraph+compile"]] | None = None
    #: untimed runs of each candidate before its timed ones (compilation and capture happen here).
    warmup_steps: int = Field(default=2, ge=1)
    #: timed runs of each candidate per trial.
    trial_steps: int = Field(default=5, ge=1)
    #: re-plan when a bucket's step time is off its baseline by more than this fraction ...
    drift_fraction: float = Field(default=0.25, gt=0)
    #: ... for this many steps in a row.
    drift_steps: int = Field(default=64, ge=1)
    #: read and write the plans under ``DSR1_HOME/plans/`` (off: measure at every start).
    plan_cache: bool = True


class StepTimer:
    """Measures candidate steps and stamps calls; tests replace it with a fake that returns
    scripted latencies."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def measure(self, plan: str, bucket: Bucket, run: Callable[[], Any], warmup: int, steps: int) -> float:
        """Seconds per call of ``run`` (the step of candidate ``plan`` in ``bucket``), after ``warmup`` calls."""
        for _ in range(warmup):
            run()
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / steps
        began = time.perf_counter()
        for _ in range(steps):
            run()
        return (time.perf_counter() - began) / steps

    def now(self) -> float:
        """A timestamp in seconds (the drift watch compares the time between calls)."""
        return time.perf_counter()


@dataclass
class BucketPlan:
    """What was decided for one bucket, and the drift watch's counters."""

    chosen: str | None = None
    latency_s: dict[str, float] = field(default_factory=dict)
    source: str = "trial"  # trial | cache | fixed (not tried: see ``note``)
    note: str = ""
    baseline: float | None = None
    samples: list[float] = field(default_factory=list)
    off: int = 0
    replans: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"plan": self.chosen, "source": self.source, "latency_s": dict(self.latency_s),
                "replans": self.replans, **({"note": self.note} if self.note else {})}


def bucket_key(bucket: Bucket) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def fastest(latencies: Mapping[str, float], order: Sequence[str]) -> str:
    """The candidate with the lowest latency; a tie goes to the one earlier in ``order``."""
    return min(latencies, key=lambda name: (latencies[name], order.index(name) if name in order else len(order)))


class Planner:
    """The choice logic, on plain data: which candidate per bucket, when to re-plan. It knows no
    model; it runs the closures it is given through ``timer``."""

    def __init__(self, candidates: Sequence[Candidate], timer: Any, options: AdaptiveOptions,
                 cache: PlanCache | None = None, record: Callable[..., None] | None = None) -> None:
        self.candidates = {c.name: c for c in candidates}
        self.order = [c.name for c in candidates]
        self.timer, self.options, self.cache, self.record = timer, options, cache, record
        self.plans: dict[Bucket, BucketPlan] = {}
        #: candidates excluded for good: name -> why
        self.failed: dict[str, str] = {}
        self.loaded: dict[str, dict[str, Any]] = cache.load() if cache is not None else {}

    @property
    def live(self) -> list[str]:
        return [n for n in self.order if n not in self.failed]

    def plan(self, bucket: Bucket) -> BucketPlan:
        """The bucket's plan record; one from the disk cache comes chosen already."""
        plan = self.plans.get(bucket)
        if plan is None:
            plan = self.plans[bucket] = BucketPlan()
            saved = self.loaded.get(bucket_key(bucket))
            if saved is not None and saved["plan"] in self.live:
                plan.chosen, plan.source = saved["plan"], "cache"
                latency = saved.get("latency_s")
                plan.latency_s = {str(k): float(v) for k, v in latency.items()} if isinstance(latency, dict) else {}
                self._announce(bucket, plan)
        return plan

    def fix(self, bucket: Bucket, why: str) -> BucketPlan:
        """Decide ``bucket`` without trials (they cannot run there: ``why``): ``eager``, or the first
        live candidate that needs no static slots."""
        names = [n for n in self.live if n == "eager"] or [n for n in self.live if not n.startswith("cudagraph")]
        if not names:
            raise Dsr1Error(f"graph adaptive: batch {bucket[0]}, context {bucket[1]}: {why}, and every candidate left "
                            f"({', '.join(self.live) or 'none'}) needs one; add 'eager' to candidates")
        plan = self.plans[bucket] = BucketPlan(chosen=names[0], source="fixed", note=why)
        self._announce(bucket, plan)
        return plan

    def choose(self, bucket: Bucket, trial: Callable[[str], Callable[[], Any]]) -> str:
        """Measure every live candidate in ``bucket`` and keep the fastest.

        ``trial(name)`` binds candidate ``name`` and returns a call of its step; a candidate whose
        binding or runs raise is excluded with a warning naming it. The last candidate standing
        failing re-raises its error (nothing is left to run)."""
        plan = self.plan(bucket)
        if not self.live:
            failed = "; ".join(f"{n}: {w}" for n, w in self.failed.items())
            raise Dsr1Error(f"graph adaptive: every candidate failed ({failed}); use graph 'eager'")
        latencies: dict[str, float] = {}
        for name in self.live:
            try:
                latencies[name] = float(self.timer.measure(name, bucket, trial(name), self.options.warmup_steps,
                                                           self.options.trial_steps))
            except Exception as err:  # any failure of a candidate is its own: the others still run
                if name == self.live[-1] and not latencies:
                    raise
                self.exclude(name, bucket, err)
        best = fastest(latencies, self.order)
        for name in latencies:
            if name != best:
                self.candidates[name].release(bucket)
        plan.chosen, plan.latency_s, plan.source = best, latencies, "trial"
        plan.baseline, plan.samples, plan.off = None, [], 0
        self._announce(bucket, plan)
        if self.cache is not None:
            saved = {**self.loaded, **{bucket_key(b): p.as_dict() for b, p in self.plans.items()
                                       if p.chosen is not None and p.source != "fixed"}}
            self.cache.save(saved)
            self.loaded = saved
        return best

    def exclude(self, name: str, bucket: Bucket, err: Exception) -> None:
        """Candidate ``name`` failed in ``bucket``: never run it again, and say so in one line."""
        why = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
        self.failed[name] = why
        warnings.warn(f"graph adaptive: candidate {name!r} failed at batch {bucket[0]}, context {bucket[1]} "
                      f"({why}); excluded, the next best is used", stacklevel=3)
        plan = self.plans.get(bucket)
        if plan is not None and plan.chosen == name:
            plan.chosen = None

    def observe(self, bucket: Bucket, plan: BucketPlan, seconds: float) -> None:
        """One call's time in ``bucket``; ``drift_steps`` in a row off the baseline mark it for re-planning."""
        if plan.source == "fixed":  # no trials can run there: nothing to re-plan
            return
        if plan.baseline is None:
            plan.samples.append(seconds)
            if len(plan.samples) >= BASELINE_STEPS:
                plan.baseline, plan.samples = statistics.median(plan.samples), []
            return
        if abs(seconds - plan.baseline) > self.options.drift_fraction * plan.baseline:
            plan.off += 1
            # each re-plan doubles the steps the next needs: a noisy machine does not keep re-measuring
            if plan.off >= self.options.drift_steps << min(plan.replans, 10):
                log.info("graph adaptive: batch %d, context %d: step time %.3g ms is off the %.3g ms baseline "
                         "for %d steps; measuring the plans again", bucket[0], bucket[1], seconds * 1e3,
                         plan.baseline * 1e3, plan.off)
                plan.chosen, plan.replans, plan.off = None, plan.replans + 1, 0
        else:
            plan.off = 0

    def report(self) -> dict[str, Any]:
        """The choices so far, as plain data (``generate --json``, the bench)."""
        return {
            "candidates": list(self.order),
            "excluded": dict(self.failed),
            "buckets": [{"batch": b, "context": c, **p.as_dict()} for (b, c), p in sorted(self.plans.items())
                        if p.chosen is not None],
            "cache": str(self.cache.path) if self.cache is not None else None,
        }

    def _announce(self, bucket: Bucket, plan: BucketPlan) -> None:
        times = ", ".join(f"{n} {s * 1e3:.3g} ms" for n, s in plan.latency_s.items())
        detail = times or plan.note
        log.info("graph adaptive: batch %d, context %d: %s (%s%s)", bucket[0], bucket[1], plan.chosen, plan.source,
                 f": {detail}" if detail else "")
        if self.record is not None:
            self.record("graph.plan", batch=bucket[0], context=bucket[1], **plan.as_dict())


class AdaptiveSteps:
    """The pass's ``decode_graphs``: the engine's batch runner asks it for the step of a call."""

    def __init__(self, planner: Planner, timer: Any) -> None:
        self.planner, self.timer = planner, timer

    def runner(self, model: CausalLM, cache: Any, key_valid: torch.Tensor) -> BucketStep:
        """The step for this call's batch (``key_valid`` ``(B, Tmax)``) and the cache's capacity."""
        capacity = getattr(cache, "capacity", None)  # a cache without one (not a contiguous one): the call's length
        bucket = (int(key_valid.shape[0]), int(capacity) if capacity is not None else int(key_valid.shape[1]))
        return BucketStep(self, bucket, model, cache, key_valid)

    def report(self) -> dict[str, Any]:
        return self.planner.report()

    def summary(self) -> str:
        """One line per bucket: what runs there and what it measured."""
        lines = []
        for entry in self.report()["buckets"]:
            times = ", ".join(f"{n} {s * 1e3:.3g} ms" for n, s in entry["latency_s"].items())
            lines.append(f"batch {entry['batch']:>4}, context {entry['context']:>6}: {entry['plan']:<18} "
                         f"({entry['source']}{': ' + times if times else ''})")
        return "\n".join(lines)


class BucketStep:
    """One generate call's decode step: trials on its first call when the bucket has no plan,
    then the chosen candidate's step, with the call timed for the drift watch."""

    def __init__(self, owner: AdaptiveSteps, bucket: Bucket, model: Any, cache: Any, key_valid: torch.Tensor) -> None:
        self.owner, self.bucket = owner, bucket
        self.model, self.cache, self.key_valid = model, cache, key_valid
        self.bound: dict[str, Step] = {}
        self.step: Step | None = None
        self.last: float | None = None
        planner = owner.planner
        self.plan = planner.plan(bucket)
        # repeating a step must leave the cache as one step does: static slots, no recurrent state
        if self.plan.chosen is None and (getattr(cache, "update_static", None) is None or model.recurrent):
            why = (f"kvcache {type(cache).__name__} has no static slots" if not model.recurrent
                   else "the attention is recurrent")
            self.plan = planner.fix(bucket, f"not tried: {why}, so a step cannot be repeated")

    def _bind(self, name: str) -> Step:
        step = self.bound.get(name)
        if step is None:
            step = self.bound[name] = self.owner.planner.candidates[name].bind(self.model, self.cache, self.key_valid)
        return step

    def _first(self, ids: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        """The first call with the bucket's plan: measure the candidates when it has none; a plan
        read from the cache that fails now is excluded and the others measured."""
        plan, planner = self.plan, self.owner.planner
        if plan.chosen is not None and plan.source == "cache":
            try:
                self.step, self.last = self._bind(plan.chosen), None
                return self.step(ids, positions, slot)
            except Exception as err:  # the saved plan cannot run here any more
                planner.exclude(plan.chosen, self.bucket, err)
                self.bound = {}
        if plan.chosen is None:
            planner.choose(self.bucket, lambda name: lambda: self._bind(name)(ids, positions, slot))
            self.bound = {}  # the losers' steps (and what they hold) go
        assert plan.chosen is not None
        self.step, self.last = self._bind(plan.chosen), None
        return self.step(ids, positions, slot)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, slot: int) -> torch.Tensor:
        plan = self.plan
        if plan.chosen is None or self.step is None:
            return self._first(ids, positions, slot)
        step = self.step
        now = self.owner.timer.now()
        if self.last is not None:
            self.owner.planner.observe(self.bucket, plan, now - self.last)
            if plan.chosen is None:  # drifted: this call runs as before, the next one measures again
                self.step = None
        self.last = now
        return step(ids, positions, slot)


class AdaptiveGraph(GraphPass):
    Options = AdaptiveOptions
    options: AdaptiveOptions

    def __init__(self, options: AdaptiveOptions | None = None, timer: Any = None) -> None:
        super().__init__(options)
        #: the measuring object (None: :class:`StepTimer` on the model's device); tests pass a fake.
        self.timer = timer

    def offered(self, device: Device, model: Any) -> list[str]:
        """The plans this device (and model) can run, in :data:`PLANS` order, filtered by ``candidates``."""
        cuda = device.torch_device_type == "cuda" and not model.streams_weights  # streamed weights: no graph
        offered = [p for p in PLANS if cuda or not p.startswith("cudagraph")]
        wanted = self.options.candidates
        if wanted is None:
            return offered
        missing = [p for p in wanted if p not in offered]
        if missing:
            raise Dsr1Error(f"graph adaptive: candidate {missing[0]!r} cannot run here (cudagraph needs a CUDA device "
                            f"and weights that are not streamed); the plans offered are {', '.join(offered)}")
        return [p for p in offered if p in wanted]

    def plans(self, model: Any, device: Device) -> tuple[list[Candidate], dict[str, Any] | None]:
        """One candidate per offered plan (a fresh set per call: captured graphs are not shared
        between kernel choices), and the ``torch.compile`` arguments of the compiled ones."""
        o = self.options
        tuning = {"tiling_strategy": o.tiling_strategy, "mode": o.mode, "dynamic": o.dynamic, "fallback": o.fallback}
        candidates: list[Candidate] = []
        compile_kwargs = None
        for name in self.offered(device, model):
            if name == "eager":
                candidates.append(Candidate(name, unfixed(model.forward_step)))
            elif name == "compile":
                steps = CompileGraph(CompileOptions(**tuning)).apply(model, device)
                if steps.decode_step is not None:  # None: no compile backend, fallback allowed (warned)
                    candidates.append(Candidate(name, unfixed(steps.decode_step)))
                    compile_kwargs = steps.compile_kwargs
            else:
                fused = name == "cudagraph+compile"
                # which batches run compiled is what this pass measures, so no threshold here
                options = CudaGraphOptions(**tuning, compile=fused, compile_max_batch=1 << 30) if fused \
                    else CudaGraphOptions()
                steps = CudaGraphPass(options).apply(model, device)
                if fused and steps.decode_graphs.compiled is None:
                    continue  # no compile backend: the plain capture is a candidate already
                candidates.append(captured(name, steps.decode_graphs))
                compile_kwargs = compile_kwargs or steps.compile_kwargs
        return candidates, compile_kwargs

    def apply(self, model: Any, device: Device) -> GraphSteps:
        if not isinstance(model, CausalLM):  # encoders have no decode step
            return GraphSteps()
        o = self.options
        candidates, compile_kwargs = self.plans(model, device)
        quant = model.pipeline.quant
        kernels = list(quant.kernel_choices(device)) if isinstance(quant, KernelChoices) else []
        if len(kernels) > 1:
            candidates = [with_kernel(c, quant, kernel) for kernel in kernels for c in self.plans(model, device)[0]]
        torch_device = model.device
        timer = self.timer if self.timer is not None else StepTimer(torch_device)

        def cache(runner: str) -> PlanCache | None:  # the paged runner's plans in a file of their own
            if not o.plan_cache:
                return None
            from dsr1.models.loading import dsr1_home

            config = model.pipeline.config.to_json() + o.model_dump_json() + runner
            return PlanCache(dsr1_home() / "plans", {"model": model_fingerprint(model),
                                                     "device": device_name(torch_device), "config": config})

        record = model.pipeline.monitor.record if model.pipeline.monitor is not None else None
        adaptive = AdaptiveSteps(Planner(candidates, timer, o, cache(""), record), timer)
        # the paged step's plans, by the same names; the quant plugin's kernels are not multiplied in there
        paged = MeasuredPaged(Planner([Candidate(name, unbound) for name in self.offered(device, model)],
                                      timer, o, cache("|paged"), record))
        return GraphSteps(decode_graphs=adaptive, compile_kwargs=compile_kwargs, paged=paged,
                          report=lambda: {**adaptive.report(), "paged": paged.report()})

    def validate(self, device: str = "cpu", dtype: torch.dtype | None = None) -> list[str]:
        wanted = self.options.candidates or []
        captured = [p for p in wanted if p.startswith("cudagraph")]
        if captured and device != "cuda":
            return [f"graph 'adaptive' candidate {captured[0]!r} captures CUDA graphs and needs device 'cuda', "
                    f"not {device!r}; leave it out of candidates"]
        return []


@hookimpl
def dsr1_graph() -> PluginSpec:
    return PluginSpec(
        name="adaptive",
        family="graph",
        impl=AdaptiveGraph,
        options=AdaptiveOptions,
        capabilities=frozenset({"kernel_fusion", "autotune"}),
        description="per (batch, context) bucket, the fastest of eager / compiled / captured decode steps, measured",
    )
