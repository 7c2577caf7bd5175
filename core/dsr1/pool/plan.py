"""The ``tiered`` pool's placement plan: which unit of a model lives on which tier, and what that costs.

A *unit* is what moves as one: a decoder layer, the ``lm_head``, the embedding table. Everything
else (norms, rotary tables) is small and stays on the compute device. Tiers:

* ``device``: resident where the model computes (GPU memory, or host memory on a CPU-only machine);
* ``cpu``: pinned host memory, copied to the device one unit ahead of its use (GPU compute only);
* ``disk``: a safetensors file under ``disk_dir``, read ahead on a worker thread;
* ``cpu-compute``: kept in host memory and *run* there, its activations moved to the device. The
  embedding goes there whenever the model does not fit (a lookup reads a few rows, so it costs
  nothing to leave it off the device); layers and the ``lm_head`` only where the config allows
  the CPU (``device: [cuda, cpu]``) and the cost model says it beats streaming them.

The cost model: a decode step reads every weight once. Resident bytes cost ``device_read``;
streamed bytes cost ``host_to_device`` (and ``disk_read`` before that for the disk tier); bytes
run on the CPU cost ``cpu_matmul``. The copies run on their own stream, overlapped with compute
on the device *and* on the CPU, while the CPU's work holds the device's up, so a step takes at
least ``max(streamed, resident + on the CPU)`` (:meth:`TierPlan.overlapped_s`), which is what
the planner minimises. The plan reports the issue's floor (the plain sum, :meth:`TierPlan.floor_s`)
as the figure benchmarks compare with. Which units stream is decided by the budgets alone (every
byte costs the same per step whichever layer it belongs to), spread evenly over the layers so
every copy has compute to hide behind; of those, the planner then runs on the CPU the number
that gives the shortest step.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dsr1.errors import Dsr1Error

GIB = float(1 << 30)
#: tiers whose units are copied in per step.
STREAMED = ("cpu", "disk")


@dataclass(frozen=True)
class Unit:
    #: module path in the model, e.g. ``model.layers.3``
    name: str
    nbytes: int
    #: ``layer``, ``head`` (the lm_head) or ``embed``.
    kind: str
    #: False for a unit that shares weights with another (a tied embedding / lm_head): it stays resident.
    movable: bool = True


def gib(nbytes: float) -> str:
    """A size for people: GiB, or MiB below one GiB."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / (1 << 20):.1f} MiB"


def spread(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` spaced evenly (the last one included when ``k`` is ``n``)."""
    return sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)}) if k else []


def slots_for(k: int) -> int:
    """Device buffers that ``k`` streamed units cycle through: two (double buffering). Plans
    stream two units or more: one unit alone in a buffer would just be a resident unit."""
    return 2 if k else 0


@dataclass
class TierPlan:
    """Where each unit lives, the budgets it was planned under and the cost model's figures."""

    #: the compute device type (``cuda``, ``cpu``...).
    compute: str
    units: list[Unit]
    tier: dict[str, str]
    #: bytes outside any unit (norms...): always on the compute device.
    fixed_bytes: int
    #: the budgets the plan fits (bytes): ``device`` and ``cpu``.
    budgets: dict[str, int]
    #: bytes/s, from :mod:`dsr1.pool.bandwidth`.
    bandwidth: dict[str, float]
    notes: list[str] = field(default_factory=list)
    #: the :class:`~dsr1.pool.stream.UnitStreamer` running the streamed units (set by the pool).
    streamer: Any = field(default=None, repr=False, compare=False)

    @property
    def streamed(self) -> list[Unit]:
        """Units copied in per step, in execution order."""
        return [u for u in self.units if self.tier[u.name] in STREAMED]

    @property
    def streams(self) -> bool:
        return bool(self.streamed)

    @property
    def hooked(self) -> bool:
        """Whether running the model goes through the pool's hooks: units streamed in or run on the CPU."""
        return self.streams or any(t == "cpu-compute" for t in self.tier.values())

    @property
    def slot_bytes(self) -> int:
        return max((u.nbytes for u in self.streamed), default=0)

    @property
    def slots(self) -> int:
        return slots_for(len(self.streamed))

    def bytes_on(self, tier: str) -> int:
        return sum(u.nbytes for u in self.units if self.tier[u.name] == tier)

    def cpu_run_bytes(self) -> int:
        """Weights that the CPU reads per step: the layers and head run there (an embedding
        lookup reads a few rows of its table, so it is not counted)."""
        return sum(u.nbytes for u in self.units if self.tier[u.name] == "cpu-compute" and u.kind != "embed")

    def device_bytes(self) -> int:
        """Weights on the compute device: resident units, the rest, and the streaming buffers."""
        return self.fixed_bytes + self.bytes_on("device") + self.slots * self.slot_bytes

    def host_bytes(self) -> int:
        """Weights held in host memory (pinned tier and the modules run on the CPU); on a CPU-only
        machine the resident weights and the streaming buffers as well."""
        held = self.bytes_on("cpu") + self.bytes_on("cpu-compute")
        return held + (self.device_bytes() if self.compute == "cpu" else 0)

    def step_costs(self) -> dict[str, float]:
        """Seconds one decode step spends reading weights from each place (batch-independent)."""
        bw = self.bandwidth
        resident = self.fixed_bytes + self.bytes_on("device")
        disk = self.bytes_on("disk")
        on_cpu = self.cpu_run_bytes()
        return {
            "device": resident / bw["device_read"],
            "host_to_device": (self.bytes_on("cpu") + disk) / bw["host_to_device"] if self.compute != "cpu" else 0.0,
            "disk": disk / bw["disk_read"],
            "cpu_compute": on_cpu / bw["cpu_matmul"] if on_cpu else 0.0,  # the planner never puts bytes there at 0
        }

    def floor_s(self) -> float:
        """The step floor benchmarks compare with: streamed bytes over their bandwidth plus
        resident bytes over the device's plus the CPU's share over its rate (no overlap assumed)."""
        return sum(self.step_costs().values())

    def overlapped_s(self) -> float:
        """The step the planner minimises: copies (disk reads included) overlap the compute, and
        the compute on the device and on the CPU run one after the other."""
        c = self.step_costs()
        return max(c["host_to_device"] + c["disk"], c["device"] + c["cpu_compute"])

    def as_dict(self) -> dict[str, Any]:
        """The plan for ``generate --json`` and bench JSON."""
        return {
            "compute": self.compute,
            "tiers": {t: {"units": [u.name for u in self.units if self.tier[u.name] == t], "bytes": self.bytes_on(t)}
                      for t in ("device", "cpu", "disk", "cpu-compute")},
            "fixed_bytes": self.fixed_bytes,
            "streaming_buffers": {"count": self.slots, "bytes_each": self.slot_bytes},
            "device_bytes": self.device_bytes(),
            "host_bytes": self.host_bytes(),
            "budgets": dict(self.budgets),
            "bandwidth_gbps": {k: round(v / 1e9, 2) for k, v in self.bandwidth.items()},
            "step_costs_s": {k: round(v, 6) for k, v in self.step_costs().items()},
            "floor_s": round(self.floor_s(), 6),
            "overlapped_s": round(self.overlapped_s(), 6),
            "notes": list(self.notes),
        }

    def table(self) -> str:
        """The plan as ``dsr1 config check --model M`` prints it."""
        where = "GPU memory" if self.compute != "cpu" else "host memory"
        lines = [f"pool tiered, computing on {self.compute}: {len(self.units)} units, budgets: device "
                 f"{gib(self.budgets['device'])}, cpu {gib(self.budgets['cpu'])}"]
        labels = {"device": f"resident ({where})", "cpu": "pinned host, streamed", "disk": "disk, streamed",
                  "cpu-compute": "run on the CPU"}
        for t, label in labels.items():
            names = [u.name for u in self.units if self.tier[u.name] == t]
            if names:
                lines.append(f"  {label:<24} {gib(self.bytes_on(t)):>11}  {compact(names)}")
        if self.streams:
            lines.append(f"  streaming buffers: {self.slots} x {gib(self.slot_bytes)} on the {self.compute} device")
        lines.append(f"  weights in {where}: {gib(self.device_bytes())} (budget {gib(self.budgets['device'])})")
        bw = ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in self.bandwidth.items())
        floor = self.floor_s()
        lines.append(f"  bandwidths: {bw}")
        lines.append(f"  floor per decode step: {floor * 1e3:.2f} ms ({1 / floor:.1f} steps/s)" if floor > 0 else
                     "  floor per decode step: 0")
        if self.cpu_run_bytes():
            lines.append(f"  with copies overlapping compute: {self.overlapped_s() * 1e3:.2f} ms")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def compact(names: Sequence[str]) -> str:
    """``model.layers.1, model.layers.2, model.layers.3, lm_head`` → ``model.layers.[1-3], lm_head``."""
    groups: dict[str, list[int]] = {}
    rest: list[str] = []
    for n in names:
        head, _, tail = n.rpartition(".")
        if tail.isdigit():
            groups.setdefault(head, []).append(int(tail))
        else:
            rest.append(n)
    out = []
    for head, idx in groups.items():
        runs: list[list[int]] = []
        for i in sorted(idx):
            if runs and i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        out.append(f"{head}.[{','.join(f'{r[0]}-{r[-1]}' if len(r) > 1 else str(r[0]) for r in runs)}]")
    return ", ".join(out + rest)


def make_plan(units: Sequence[Unit], fixed_bytes: int, compute: str, budgets: Mapping[str, int],
              bandwidth: Mapping[str, float], cpu_compute: Sequence[str], disk_refusal: str | None,
              budget_name: str) -> TierPlan:
    """Place ``units`` within ``budgets`` (bytes, ``device`` and ``cpu``).

    ``cpu_compute`` names units that may run on the CPU (only used when not everything fits on
    the device: the embedding always, layers and the head where the cost model says so);
    ``disk_refusal`` is why the disk tier cannot be used (None: it can); ``budget_name`` is the
    option the device budget came from, for the errors.
    """
    plan = TierPlan(compute, list(units), {u.name: "device" for u in units}, fixed_bytes, dict(budgets),
                    dict(bandwidth))
    room = budgets["device"]
    if fixed_bytes + sum(u.nbytes for u in units) <= room:
        return plan
    host = budgets["cpu"]
    if compute != "cpu":
        for u in units:
            if u.kind == "embed" and u.name in cpu_compute and u.movable:
                plan.tier[u.name] = "cpu-compute"
                host -= u.nbytes
    # streamable units: the layers first, the lm_head (the largest unit, which sizes the buffers) last
    layers = [u for u in units if u.kind == "layer" and plan.tier[u.name] == "device" and u.movable]
    others = [u for u in units if u.kind != "layer" and plan.tier[u.name] == "device" and u.movable]
    pinned = [u for u in units if plan.tier[u.name] == "device" and not u.movable]
    base = fixed_bytes + sum(u.nbytes for u in pinned)
    chosen: list[Unit] | None = None
    for k in range(2, len(layers) + len(others) + 1):
        if k <= len(layers):
            off = [layers[i] for i in spread(len(layers), k)]
        else:
            off = layers + others[: k - len(layers)]
        kept = sum(u.nbytes for u in units if plan.tier[u.name] == "device" and u not in off) - \
            sum(u.nbytes for u in pinned)
        if base + kept + slots_for(len(off)) * max(u.nbytes for u in off) <= room:
            chosen = off
            break
    if chosen is None:
        biggest = max(layers + others, key=lambda u: u.nbytes) if layers or others else None
        need = base + (2 * biggest.nbytes if biggest else 0)
        what = f"plus 2 streaming buffers of its largest unit {biggest.name} ({gib(biggest.nbytes)})" \
            if biggest else ""
        raise Dsr1Error(f"pool tiered: {budget_name} {gib(room)} cannot hold the parts that stay on the device "
                        f"({gib(base)}) {what}; give {budget_name} at least {need / GIB:.3g} ({gib(need)})")
    order = [u for u in units if u in chosen]
    runnable = [u for u in order if u.name in cpu_compute and compute != "cpu" and bandwidth.get("cpu_matmul", 0) > 0]
    best: dict[str, str] | None = None
    best_s = 0.0
    # how many of the offloaded units run on the CPU instead: each count tried, spread evenly,
    # the shortest overlapped step kept (none, on a tie: moving activations has costs the model leaves out)
    for k in range(len(runnable) + 1):
        on_cpu = [runnable[i] for i in spread(len(runnable), k)]
        left = host - sum(u.nbytes for u in on_cpu)
        if on_cpu and left < 0:
            break  # the units run on the CPU live in host memory
        trial = dict(plan.tier)
        trial.update({u.name: "cpu-compute" for u in on_cpu})
        _stream(trial, [u for u in order if u not in on_cpu], left, compute)
        candidate = TierPlan(compute, plan.units, trial, fixed_bytes, plan.budgets, plan.bandwidth)
        if best is None or candidate.overlapped_s() < best_s * 0.99:
            best, best_s = trial, candidate.overlapped_s()
    plan.tier = best or plan.tier
    on_disk = plan.bytes_on("disk")
    if on_disk and disk_refusal is not None:
        raise Dsr1Error(f"pool tiered: {gib(on_disk)} of weights fit neither the device nor cpu_memory_gb "
                        f"{gib(budgets['cpu'])}, and the disk tier cannot be used: {disk_refusal}")
    return plan


def _stream(tier: dict[str, str], order: Sequence[Unit], host: int, compute: str) -> None:
    """Put the streamed ``order`` in pinned host memory while ``host`` bytes last, the rest on disk."""
    for u in order:
        if compute != "cpu" and u.nbytes <= host:
            tier[u.name] = "cpu"
            host -= u.nbytes
        else:
            tier[u.name] = "disk"
