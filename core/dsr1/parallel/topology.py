"""The torch.distributed world a model runs in: which rank this process is, how many there are,
and the process group their collectives use.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR``/
``MASTER_PORT``) in each process's environment; :func:`join` reads them and creates the default
process group (gloo on the CPU, nccl on CUDA) with a timeout, so a rank that dies or hangs makes
the others fail with a one-line error instead of waiting forever. A process group created before
(a test that spawned its own ranks) is used as it is.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from typing import Any

import torch
import torch.distributed as dist

from dsr1.errors import Dsr1Error

#: the ``model_type`` values the tensor-parallel llama builder shards (MoE experts are not split yet).
TP_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


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


def check_tensor(tensor: int, model_type: str, heads: int, kv_heads: int, intermediate: int) -> None:
    """The model's shape against ``parallel.tensor``: every rank gets whole heads and an equal MLP slice."""
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


def refuse_tensor_parallel(pipeline: Any, model_type: str) -> None:
    """For the builders that do not shard: ``parallel.tensor`` above 1 is a one-line error, never ignored."""
    parallel = getattr(pipeline.config, "parallel", None)
    if parallel is not None and parallel.tensor > 1:
        check_tensor(parallel.tensor, model_type, 1, 1, 1)  # raises: the type is not one that shards


@dataclass(frozen=True)
class TensorGroup:
    """The ranks one model's tensor-parallel layers span: this rank's index and their count."""

    rank: int
    size: int
    timeout_s: float
    group: dist.ProcessGroup | None = None  # None: the default group


def join(tensor: int, timeout_s: float, device: torch.device) -> TensorGroup:
    """This process's :class:`TensorGroup` of ``tensor`` ranks, creating the default process group
    when none exists (gloo on the CPU, nccl on CUDA; ``timeout_s`` bounds the rendezvous and every
    collective). Also seeds torch's global generator with one seed drawn by rank 0, so sampling
    without a seed draws the same numbers on every rank (the ranks run in lockstep)."""
    if not dist.is_available():
        raise Dsr1Error(f"parallel.tensor {tensor} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        world = World.from_env()
        if world.size != tensor:
            how = (f"launch with torchrun --nproc-per-node {tensor}" if world.size == 1
                   else f"set parallel.tensor {world.size} or launch {tensor} processes")
            raise Dsr1Error(f"parallel.tensor {tensor} must equal the world size {world.size}; {how}")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as err:  # the rendezvous failed or timed out
            raise Dsr1Error(f"rank {world.rank}: joining the {world.size} ranks failed within parallel.timeout_s "
                            f"{timeout_s:g}: {first_line(err)}") from None
    size, rank = dist.get_world_size(), dist.get_rank()
    if size != tensor:
        raise Dsr1Error(f"parallel.tensor {tensor} must equal the world size {size}; set parallel.tensor {size} "
                        f"or launch {tensor} processes")
    group = TensorGroup(rank, size, timeout_s)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64) if rank == 0 else torch.zeros(1, dtype=torch.int64)
    broadcast_(seed, group)
    torch.manual_seed(int(seed.item()))
    return group


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def lost(group: TensorGroup, op: str, err: BaseException) -> Dsr1Error:
    """The one-line error of a collective that failed: a peer died, or hung past the timeout."""
    return Dsr1Error(f"rank {group.rank} of {group.size}: {op} failed (another rank died or hung; "
                     f"parallel.timeout_s {group.timeout_s:g}): {first_line(err)}")


def broadcast_(t: torch.Tensor, group: TensorGroup, src: int = 0) -> torch.Tensor:
    """``t`` replaced by rank ``src``'s value on every rank."""
    try:
        dist.broadcast(t, src, group=group.group)
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
        dist.destroy_process_group()
