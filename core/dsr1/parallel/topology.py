"""The torch.distributed world a model runs in: which rank this process is, how many there are,
and the process group their collectives use.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR``/
``MASTER_PORT``) in each process's environment; :func:`join` reads them and creates the default
process group (gloo on the CPU, nccl on CUDA) with a timeout, so a rank that dies or hangs makes
the others fail with a one-line error instead of waiting forever. A process group created before
(a test that spawned its own ranks) is used as it is.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from typing import Any

import torch
import torch.distributed as dist

from dsr1.errors import Dsr1Error

#: the ``model_type`` values the tensor-parallel llama builder shards (Qwen3-MoE: whole experts per rank).
TP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
#: the ``model_type`` values the llama builder splits into pipeline stages (dsr1.parallel.pipeline).
PP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one launch."""

    rank: int
    size: int
    local_rank: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> World:
        """The world ``torchrun`` describes in the environment; one rank of one without it."""
        env = os.environ if environ is None else environ
        try:
            size = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise Dsr1Error(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env.get('RANK')!r}/"
                            f"{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}") from None
        if not 0 <= rank < size:
            raise Dsr1Error(f"RANK {rank} is outside WORLD_SIZE {size}; launch with torchrun, which sets both")
        return cls(rank, size, local)


def is_launched(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one of several ranks (``WORLD_SIZE`` above 1)."""
    return World.from_env(environ).size > 1


def check_tensor(tensor: int, model_type: str, heads: int, kv_heads: int, intermediate: int,
                 experts: int = 0) -> None:
    """The model's shape against ``parallel.tensor``: every rank gets whole heads, an equal MLP slice and
    (``experts`` above 0: a mixture-of-experts model) the same number of whole experts."""
    if model_type not in TP_MODEL_TYPES:
        raise Dsr1Error(f"parallel.tensor {tensor}: tensor parallelism supports {', '.join(TP_MODEL_TYPES)} "
                        f"(got {model_type})")
    if heads % tensor:
        raise Dsr1Error(f"parallel.tensor {tensor} must divide num_attention_heads {heads} (config.json); "
                        f"pick a divisor of {heads}")
    if kv_heads % tensor and tensor % kv_heads:
        raise Dsr1Error(f"parallel.tensor {tensor} and num_key_value_heads {kv_heads} (config.json): one must "
                        f"divide the other (KV heads are split across ranks, or replicated when fewer)")
    if intermediate % tensor:
        raise Dsr1Error(f"parallel.tensor {tensor} must divide intermediate_size {intermediate} (config.json)")
    if experts % tensor:
        fits = [t for t in range(1, experts + 1) if experts % t == 0 and heads % t == 0]
        raise Dsr1Error(f"parallel.tensor {tensor} must divide num_experts {experts} (config.json): each rank "
                        f"holds whole experts; pick one of {', '.join(map(str, fits))}")


def refuse_tensor_parallel(pipeline: Any, model_type: str) -> None:
    """For the builders that neither shard nor split into stages: ``parallel.tensor`` or
    ``parallel.pipeline`` above 1 is a one-line error, never ignored."""
    parallel = getattr(pipeline.config, "parallel", None)
    if parallel is not None and parallel.tensor > 1:
        check_tensor(parallel.tensor, model_type, 1, 1, 1)  # raises: the type is not one that shards
    if parallel is not None and parallel.pipeline > 1:
        raise Dsr1Error(f"parallel.pipeline {parallel.pipeline}: pipeline parallelism supports "
                        f"{', '.join(PP_MODEL_TYPES)} (got {model_type})")


@dataclass(frozen=True)
class TensorGroup:
    """The ranks one model's tensor-parallel layers span: this rank's index and their count."""

    rank: int
    size: int
    timeout_s: float
    group: dist.ProcessGroup | None = None  # None: the default group


#: the stages' tensor groups of a pipelined launch by (tensor, pipeline), made once per process:
#: ``dist.new_group`` is a collective that every rank calls in the same order (and an NCCL
#: communicator per model load would pile up), with the world they were made in. :func:`shutdown`
#: drops them with the world.
_STAGE_GROUPS: dict[tuple[int, int], tuple[Any, TensorGroup]] = {}
#: while a pipelined model is built (:func:`stage_tensor_group`): this stage's tensor group
_BUILDING: list[TensorGroup] = []


@contextmanager
def stage_tensor_group(group: TensorGroup) -> Iterator[None]:
    """While a pipelined model builds its tensor-parallel layers: a :func:`join` of the tensor
    degree alone (what :meth:`dsr1.parallel.tensor.TensorPlan.create` calls) returns this stage's
    tensor group instead of refusing a world of ``tensor * pipeline`` ranks."""
    _BUILDING.append(group)
    try:
        yield
    finally:
        _BUILDING.pop()


def join(tensor: int, timeout_s: float, device: torch.device, pipeline: int = 1) -> TensorGroup:
    """This process's :class:`TensorGroup` of ``tensor`` ranks, creating the default process group
    of ``tensor * pipeline`` ranks when none exists (gloo on the CPU, nccl on CUDA; ``timeout_s``
    bounds the rendezvous and every collective). With ``pipeline`` stages, rank ``r`` is tensor rank
    ``r % tensor`` of stage ``r // tensor``, and each stage's ranks get a process group of their own.
    Also seeds torch's global generator with one seed drawn by rank 0, so sampling without a seed
    draws the same numbers on every rank (the ranks run in lockstep)."""
    ranks = tensor * pipeline
    what = f"parallel.tensor {tensor}" if pipeline == 1 else \
        f"parallel.tensor {tensor} x parallel.pipeline {pipeline} ({ranks} ranks)"
    if not dist.is_available():
        raise Dsr1Error(f"{what} needs torch.distributed, which this torch build lacks")
    if pipeline == 1 and _BUILDING and _BUILDING[-1].size == tensor:
        return _BUILDING[-1]  # the stage's group; the pipelined join seeded already
    if not dist.is_initialized():
        world = World.from_env()
        if world.size != ranks:
            how = (f"launch with torchrun --nproc-per-node {ranks}" if world.size == 1
                   else f"set parallel.tensor {world.size} or launch {tensor} processes" if pipeline == 1
                   else f"make tensor x pipeline {world.size} or launch {ranks} processes")
            raise Dsr1Error(f"{what} must equal the world size {world.size}; {how}")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as err:  # the rendezvous failed or timed out
            raise Dsr1Error(f"rank {world.rank}: joining the {world.size} ranks failed within parallel.timeout_s "
                            f"{timeout_s:g}: {first_line(err)}") from None
    size, rank = dist.get_world_size(), dist.get_rank()
    if size != ranks:
        how = f"set parallel.tensor {size}" if pipeline == 1 else f"make tensor x pipeline {size}"
        raise Dsr1Error(f"{what} must equal the world size {size}; {how} or launch {ranks} processes")
    world = TensorGroup(rank, size, timeout_s)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64) if rank == 0 else torch.zeros(1, dtype=torch.int64)
    if device.type == "cuda":
        seed = seed.to(device)  # nccl moves device tensors only
    broadcast_(seed, world)  # over the world: every stage samples alike too
    torch.manual_seed(int(seed.item()))
    if pipeline == 1:
        return world
    made_in, group = _STAGE_GROUPS.get((tensor, pipeline), (None, None))
    if group is None or made_in is not dist.group.WORLD:  # none yet, or made in a world since destroyed
        for stage in range(pipeline):  # every rank makes every stage's group, in the same order
            made = dist.new_group(list(range(stage * tensor, (stage + 1) * tensor)),
                                  timeout=timedelta(seconds=timeout_s))
            if stage == rank // tensor:
                group = TensorGroup(rank % tensor, tensor, timeout_s, made)
                _STAGE_GROUPS[(tensor, pipeline)] = (dist.group.WORLD, group)
    assert group is not None
    return dataclasses.replace(group, timeout_s=timeout_s)


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def lost(group: TensorGroup, op: str, err: BaseException) -> Dsr1Error:
    """The one-line error of a collective that failed: a peer died, or hung past the timeout."""
    return Dsr1Error(f"rank {group.rank} of {group.size}: {op} failed (another rank died or hung; "
                     f"parallel.timeout_s {group.timeout_s:g}): {first_line(err)}")


def broadcast_(t: torch.Tensor, group: TensorGroup, src: int = 0) -> torch.Tensor:
    """``t`` replaced by rank ``src``'s value (``src``: a rank of ``group``) on every rank of ``group``."""
    try:
        # torch.distributed names the source by its rank in the world, also within a smaller group
        dist.broadcast(t, src if group.group is None else dist.get_global_rank(group.group, src), group=group.group)
    except RuntimeError as err:
        raise lost(group, "broadcast", err) from None
    return t


def shutdown() -> None:
    """Destroy the default process group, if this process made one (end of a launched command)."""
    if dist.is_available() and dist.is_initialized():
        try:
            # every rank is done with the group before any closes its sockets: a gloo thread that reads
            # a socket its peer closed mid-exit aborts its process (SIGABRT), failing a run that succeeded
            dist.barrier()
        except RuntimeError:
            pass  # a peer is gone already: nothing to wait for
        _STAGE_GROUPS.clear()  # destroyed with the world
        dist.destroy_process_group()
