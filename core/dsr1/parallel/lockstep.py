"""The engine loop over several ranks: rank 0 schedules, every rank executes the same plan.

Under a launch with several ranks (``torchrun``), rank 0's :class:`~dsr1.engine.engine.Engine`
runs the scheduler as it would alone; :func:`lead` gives it a :class:`Leader`, which broadcasts each
step's plan before the runner executes it. Every other rank builds the same engine (same model
shards, same KV pool size) and runs :class:`Follower`: it receives the plan, mirrors the request
state and calls the same ``runner.execute``, so the model's collectives line up step by step.

What moves is plain data, never pickle: one JSON object per step, as bytes in a uint8 tensor whose
first 8 bytes hold its length (:class:`Channel`). A message carries, in the order rank 0 saw them,
the requests added (id, prompt ids, ``max_tokens``, sampling params) and dropped (finished or aborted:
the runner forgets them) since the last step; the tokens rank 0 sampled in the last step; and the
plan, with each block table sent as what changed since it was last sent.

Sampling: the logits are all-gathered, so every rank holds the same logits and its sampler draws the
same token, but the tokens that count are rank 0's. A follower appends rank 0's tokens to its mirror
(it counts any of its own that differ in ``Follower.mismatches``, for the tests), so the ranks' state
is identical by construction, whatever the sampler, logits processors or floating point do.

While idle, rank 0 sends a heartbeat (:meth:`Leader.idle`) well inside ``parallel.timeout_s``, so a
follower waits for the next request as long as it takes; a follower that dies makes rank 0's next
broadcast fail with one line (:func:`dsr1.parallel.topology.lost`). :meth:`Leader.stop` ends the
followers; they ignore SIGINT/SIGTERM meanwhile (``torchrun`` forwards a Ctrl-C to every rank, and
rank 0 decides when the ranks stop).
"""
from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from dsr1.engine.plan import ScheduledRequest, SchedulerOutput
from dsr1.engine.request import Request
from dsr1.errors import Dsr1Error
from dsr1.interfaces import SamplingParams
from dsr1.parallel.topology import TensorGroup, World, broadcast_, is_launched, lost

#: bytes every step's broadcast carries (a longer message takes a second broadcast of the rest).
CAPACITY = 1 << 16
#: the heartbeat interval: this share of ``parallel.timeout_s``, at most ``HEARTBEAT_MAX_S`` (a dead
#: follower is then noticed soon even while idle; a heartbeat costs one small broadcast).
HEARTBEAT_SHARE, HEARTBEAT_MAX_S = 0.25, 2.0


def world_group(engine: Any) -> TensorGroup | None:
    """Every rank of this launch as one group (the default process group), or None when this process
    is alone (no process group, or a world of one). ``engine``: an engine or a model (its config's
    ``parallel.timeout_s`` bounds the group's collectives)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    parallel = getattr(engine.pipeline.config, "parallel", None)
    timeout = parallel.timeout_s if parallel is not None else 300.0
    return TensorGroup(dist.get_rank(), dist.get_world_size(), timeout)


def agree_min(value: int, group: TensorGroup, device: torch.device) -> int:
    """The smallest of every rank's ``value`` (a KV pool sized from each rank's free memory)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group.group)
    except RuntimeError as err:
        raise lost(group, "all_reduce", err) from None
    return int(t.item())


def gather_json(value: Any, group: TensorGroup, device: torch.device) -> list[Any]:
    """Every rank's ``value`` (plain data), in rank order, on every rank: JSON bytes padded to the
    longest and all-gathered (lengths first)."""
    device = device if device.type == "cuda" else torch.device("cpu")
    data = json.dumps(value, separators=(",", ":")).encode()
    n = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(group.size)]
    try:
        dist.all_gather(sizes, n, group=group.group)
        longest = max(int(t.item()) for t in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8, device=device)
        mine[: len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        parts = [torch.empty_like(mine) for _ in range(group.size)]
        dist.all_gather(parts, mine, group=group.group)
    except RuntimeError as err:
        raise lost(group, "all_gather", err) from None
    return [json.loads(p[: int(k.item())].cpu().numpy().tobytes()) for p, k in zip(parts, sizes)]


class Channel:
    """JSON objects from rank 0 to every rank, through broadcasts of one uint8 buffer."""

    def __init__(self, group: TensorGroup, device: torch.device) -> None:
        self.group = group
        # nccl moves only device tensors; gloo only host ones
        self.device = device if device.type == "cuda" else torch.device("cpu")
        self.buf = torch.zeros(CAPACITY, dtype=torch.uint8, device=self.device)

    def send(self, message: Mapping[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode()
        head = len(data).to_bytes(8, "little") + data[: CAPACITY - 8]
        self.buf[: len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        broadcast_(self.buf, self.group)
        if len(data) > CAPACITY - 8:
            rest = torch.frombuffer(bytearray(data[CAPACITY - 8 :]), dtype=torch.uint8).to(self.device)
            broadcast_(rest, self.group)

    def receive(self) -> dict[str, Any]:
        broadcast_(self.buf, self.group)
        head = self.buf.cpu().numpy().tobytes()
        n = int.from_bytes(head[:8], "little")
        data = head[8 : 8 + n]
        if n > CAPACITY - 8:
            rest = torch.empty(n - (CAPACITY - 8), dtype=torch.uint8, device=self.device)
            broadcast_(rest, self.group)
            data += rest.cpu().numpy().tobytes()
        return dict(json.loads(data))


def params_to_json(params: SamplingParams) -> dict[str, Any]:
    return params.model_dump(mode="json", exclude_defaults=True)


class Leader:
    """Rank 0's side: collects what followers must mirror and broadcasts it with each plan."""

    def __init__(self, group: TensorGroup, device: torch.device) -> None:
        self.channel = Channel(group, device)
        self.heartbeat_s = min(group.timeout_s * HEARTBEAT_SHARE, HEARTBEAT_MAX_S)
        self.events: list[list[Any]] = []  # ["add", id, prompt, max_tokens, params] | ["drop", ids]
        self.tokens: dict[str, int] = {}
        self.tables: dict[str, list[int]] = {}  # the block tables as last sent
        self.last_sent = time.monotonic()
        self.stopped = False

    def added(self, request: Request, params: SamplingParams) -> None:
        self.events.append(["add", request.request_id, request.prompt_ids, request.max_tokens,
                            params_to_json(params)])

    def dropped(self, request_ids: Sequence[str]) -> None:
        if request_ids:
            self.events.append(["drop", list(request_ids)])
            for rid in request_ids:
                self.tables.pop(rid, None)

    def sampled(self, tokens: Mapping[str, int]) -> None:
        self.tokens.update(tokens)

    def publish(self, plan: SchedulerOutput) -> None:
        """Send ``plan`` with everything since the last message (before rank 0 executes it)."""
        rows = []
        for s in plan.scheduled:
            table, last = list(s.block_ids), self.tables.get(s.request_id, [])
            keep = 0
            while keep < min(len(table), len(last)) and table[keep] == last[keep]:
                keep += 1
            self.tables[s.request_id] = table
            rows.append([s.request_id, list(s.token_ids), s.start, keep, table[keep:], s.sample])
        self._send({"plan": {"rows": rows, "preempted": list(plan.preempted), "finished": list(plan.finished),
                             "swap_out": [list(p) for p in plan.swap_out], "swap_in": [list(p) for p in plan.swap_in],
                             "swapped": list(plan.swapped)}})

    def idle(self) -> None:
        """A heartbeat, when nothing was sent for a while (rank 0 has no step to run)."""
        if not self.stopped and time.monotonic() - self.last_sent >= self.heartbeat_s:
            self._send({})

    def stop(self) -> None:
        """End the followers' loops (once; later calls do nothing)."""
        if not self.stopped:
            self._send({"stop": True})
            self.stopped = True

    def _send(self, message: dict[str, Any]) -> None:
        if self.stopped:
            raise Dsr1Error("the followers were stopped; this engine cannot run another step under the launch")
        message = {**message, "tokens": self.tokens, "events": self.events}
        self.tokens, self.events = {}, []
        self.channel.send(message)
        self.last_sent = time.monotonic()


class Follower:
    """Every other rank's side: mirrors rank 0's requests and executes each plan it receives."""

    def __init__(self, engine: Any, group: TensorGroup) -> None:
        self.engine, self.runner = engine, engine.runner
        self.channel = Channel(group, engine.model.device)
        self.requests: dict[str, Request] = {}
        self.params: dict[str, SamplingParams] = {}
        self.tables: dict[str, list[int]] = {}
        self.own: dict[str, int] = {}  # this rank's tokens of the last step, to compare with rank 0's
        #: steps executed, and sampled tokens of this rank that differed from rank 0's
        self.steps = 0
        self.mismatches = 0

    def run(self) -> int:
        """Follow until rank 0 says stop; the number of steps executed."""
        with _ignore_signals():
            while self.apply(self.channel.receive()):
                pass
        return self.steps

    def apply(self, message: Mapping[str, Any]) -> bool:
        """Mirror one message and execute its plan; False once it says stop."""
        for rid, token in message.get("tokens", {}).items():
            if rid in self.own and self.own[rid] != token:
                self.mismatches += 1
            self.requests[rid].output_ids.append(int(token))
        self.own = {}
        for event in message.get("events", []):
            if event[0] == "add":
                _, rid, prompt, max_tokens, params = event
                self.requests[rid] = Request(request_id=rid, prompt_ids=list(prompt), max_tokens=int(max_tokens))
                self.params[rid] = SamplingParams.model_validate(params)
            else:
                for rid in event[1]:
                    self.requests.pop(rid, None)
                    self.params.pop(rid, None)
                    self.tables.pop(rid, None)
                self.runner.forget(event[1])
        if message.get("stop"):
            return False
        plan = message.get("plan")
        if plan is not None:
            self._execute(plan)
        return True

    def _execute(self, p: Mapping[str, Any]) -> None:
        scheduled = []
        for rid, tokens, start, keep, new, sample in p["rows"]:
            table = self.tables[rid] = self.tables.get(rid, [])[:keep] + list(new)
            scheduled.append(ScheduledRequest(rid, tuple(tokens), int(start), tuple(table), bool(sample)))
        plan = SchedulerOutput(tuple(scheduled), preempted=tuple(p["preempted"]), finished=tuple(p["finished"]),
                               swap_out=tuple(tuple(x) for x in p["swap_out"]),
                               swap_in=tuple(tuple(x) for x in p["swap_in"]), swapped=tuple(p["swapped"]))
        params = {s.request_id: self.params[s.request_id] for s in plan.scheduled}
        with self.engine.model.run_lock.hold("engine step", nested_ok=True):
            sampled = self.runner.execute(plan, self.requests, params)
        self.own = {rid: s.token for rid, s in sampled.items()}
        self.steps += 1


@contextmanager
def _ignore_signals() -> Iterator[None]:
    """SIGINT/SIGTERM ignored while following: rank 0 stops the ranks (``torchrun`` signals all of them)."""
    saved = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            saved[sig] = signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread: signals are not this loop's to handle
            pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _unjoined() -> Dsr1Error:
    size = World.from_env().size
    return Dsr1Error(f"this launch has {size} ranks but the model joined none: set parallel.tensor (times "
                     f"parallel.pipeline) to {size} in --config, or run one process without torchrun")


def lead(engine: Any) -> Leader | None:
    """Make ``engine`` (rank 0's) broadcast its plans to the other ranks; None when this process is alone."""
    group = world_group(engine)
    if group is None:
        if is_launched():
            raise _unjoined()
        return None
    if group.rank != 0:
        raise Dsr1Error(f"rank {group.rank} cannot lead the engine loop; rank 0 schedules, the others follow")
    engine.lockstep = Leader(group, engine.model.device)
    return engine.lockstep


def follow(engine: Any) -> Follower:
    """Run ``engine``'s runner on the plans rank 0 broadcasts until it stops the ranks."""
    group = world_group(engine)
    if group is None and is_launched():
        raise _unjoined()
    if group is None or group.rank == 0:
        raise Dsr1Error("follow() runs on ranks 1..N-1 of a launch with several ranks (torchrun)")
    follower = Follower(engine, group)
    follower.run()
    return follower


__all__ = ["CAPACITY", "Channel", "Follower", "Leader", "agree_min", "follow", "gather_json", "lead", "world_group"]
