"""The KV tier: a preempted request's KV blocks go to host memory and come back, instead of
being recomputed, when the pool's cost model says copying is cheaper (:meth:`Pool.kv_swap`).

Two halves, split the way the engine splits everything:

* :class:`~dsr1.engine.swap_space.SwapSpace` is plain data on the scheduler's side (the
  :class:`BlockManager` holds it): host block accounting, the swap-out/in copies queued for the
  next plan, and which request holds which host blocks. It never touches a tensor, and lives in a
  module of its own that imports no torch.
* :class:`HostKV` is the runner's: the host tensors and the copies a plan asks for.

Within one plan the device→host copies run before the host→device ones, so a device block freed
by a swap-out may be refilled by a swap-in of the same step. Host blocks freed by a swap-in become
free only once the plan that reads them is out (:meth:`SwapSpace.take`), so a swap-out of the
same step never overwrites what that swap-in still has to read.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dsr1.engine.paged import PagedKV
from dsr1.engine.swap_space import SwapSpace
from dsr1.interfaces import SwapPolicy

__all__ = ["STAGE_BLOCKS", "HostKV", "SwapSpace", "swap_policy"]  # SwapSpace: re-exported for callers

#: host blocks moved per staging copy: bounds the device memory a swap borrows while it runs.
STAGE_BLOCKS = 64


def swap_policy(pool: Any, kv_bytes_per_token: int, device: torch.device) -> SwapPolicy | None:
    """The pool's answer to :meth:`Pool.kv_swap`, or ``None`` (always recompute)."""
    # Pool plugins written before the KV tier have no kv_swap; for them the answer is "recompute",
    # the default the Pool base class gives every newer plugin.
    ask = getattr(pool, "kv_swap", None)
    return ask(kv_bytes_per_token, device) if ask is not None else None


class HostKV:
    """Host copies of device KV blocks: one host block holds one device block of every layer,
    keys and values, so a block moves in one contiguous copy."""

    def __init__(self, kv: PagedKV, num_blocks: int, pin: bool) -> None:
        # pinning pays only for copies to and from an accelerator (and needs one to exist)
        self.kv, self.pin = kv, pin and kv.k[0].device.type != "cpu"
        pools = kv.k if kv.shared else [*kv.k, *kv.v]
        self.pools = pools  # the device tensors a block spans, in host-block order
        first = pools[0]
        self.shape = (num_blocks, len(pools), kv.block_size, kv.n_kv_heads, kv.head_dim)
        self.dtype = first.dtype
        self._blocks: torch.Tensor | None = None

    @property
    def blocks(self) -> torch.Tensor:
        """The host blocks, allocated at the first swap: an engine that never preempts never pins
        its swap space (pinned memory is locked away from the rest of the machine)."""
        if self._blocks is None:
            # empty, not zeros: a host block is read only after a device block was copied into it
            self._blocks = torch.empty(self.shape, dtype=self.dtype, device="cpu", pin_memory=self.pin)
        return self._blocks

    @property
    def allocated(self) -> bool:
        return self._blocks is not None

    def apply(self, out: Sequence[tuple[int, int]], into: Sequence[tuple[int, int]]) -> None:
        """Run a plan's copies on the device's stream: device→host first, then host→device."""
        for i in range(0, len(out), STAGE_BLOCKS):
            self._to_host(out[i : i + STAGE_BLOCKS])
        for i in range(0, len(into), STAGE_BLOCKS):
            self._to_device(into[i : i + STAGE_BLOCKS])

    def _to_host(self, pairs: Sequence[tuple[int, int]]) -> None:
        device = self.pools[0].device
        idx = torch.tensor([d for d, _ in pairs], dtype=torch.long).to(device)
        stage = torch.stack([p.index_select(0, idx) for p in self.pools], 1)  # (n, pools, bs, Hkv, D)
        for (start, length), rows in _runs([h for _, h in pairs]):
            self.blocks[start : start + length].copy_(stage[rows : rows + length], non_blocking=self.pin)

    def _to_device(self, pairs: Sequence[tuple[int, int]]) -> None:
        device = self.pools[0].device
        stage = torch.empty((len(pairs), *self.shape[1:]), dtype=self.dtype, device=device)  # (n, pools, ...)
        for (start, length), rows in _runs([h for h, _ in pairs]):
            stage[rows : rows + length].copy_(self.blocks[start : start + length], non_blocking=self.pin)
        idx = torch.tensor([d for _, d in pairs], dtype=torch.long).to(device)
        for j, pool in enumerate(self.pools):
            pool.index_copy_(0, idx, stage[:, j])


def _runs(host: Sequence[int]) -> list[tuple[tuple[int, int], int]]:
    """Consecutive host block ids as ``((first id, length), index of the first in host)``: one copy each."""
    runs: list[tuple[tuple[int, int], int]] = []
    for i, h in enumerate(host):
        if runs and runs[-1][0][0] + runs[-1][0][1] == h:
            (start, length), at = runs[-1]
            runs[-1] = ((start, length + 1), at)
        else:
            runs.append(((h, 1), i))
    return runs

