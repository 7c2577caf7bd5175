"""Streaming execution of offloaded units: each is copied into a device buffer just before it runs.

Every streamed unit's tensors are rebound, once, to views into one of a few device buffers
(*slots*), so their addresses never change; unit ``j`` uses slot ``slot[j]``. A unit's bytes
live packed in one host block (pinned memory, ``cpu`` tier) or in a safetensors file (``disk``
tier). The forward hooks keep the copies one unit ahead:

* after unit ``j`` has run, its slot is free: the next unit that uses the slot (in the cyclic
  order of a step, so the last units prefetch the first ones of the next step) is copied in on
  a side stream, which first waits for ``j``'s compute to finish;
* before unit ``j`` runs, the compute stream waits for its copy.

Disk units are safetensors files of one packed block each (:func:`write_unit`), read on a worker
thread with one sequential read into a pinned staging block and copied from there (on a CPU-only
machine straight into the slot); their pages are dropped from the page cache after each read. The hooks are plain Python and never go through pluggy.
A step that is cut short (an exception) leaves nothing stale: the slot table says what each slot
holds, and a unit found missing is copied in on the spot.
"""
from __future__ import annotations

import concurrent.futures
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsr1.errors import Dsr1Error

#: byte alignment of every tensor inside a packed block (any dtype's view stays aligned).
ALIGN = 64


@dataclass
class _Slot:
    """One tensor of a unit inside its packed block: where it is and how to view it."""

    owner: nn.Module
    attr: str
    is_param: bool
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _dense(t: torch.Tensor) -> bool:
    """A tensor whose elements fill ``numel`` consecutive places in some order (a transposed
    contiguous tensor qualifies), so it packs into ``numel`` elements with its strides kept."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expect = 1
    for s, n in dims:
        if s != expect:
            return False
        expect *= n
    return True


def layout(unit: nn.Module, name: str) -> tuple[list[_Slot], int]:
    """The tensors of ``unit`` (parameters and buffers, shared ones once) packed back to back."""
    seen: dict[tuple[int, int], int] = {}
    slots: list[_Slot] = []
    offset = 0
    for mod_name, mod in unit.named_modules():
        tensors = [(n, t, True) for n, t in mod._parameters.items() if t is not None]
        tensors += [(n, t, False) for n, t in mod._buffers.items() if t is not None]
        for attr, value in vars(mod).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.numel() > 1:
                raise Dsr1Error(f"pool tiered cannot stream {name}: {mod_name or 'it'}.{attr} is a tensor that is "
                                f"neither a parameter nor a buffer; keep the unit resident (a larger budget)")
        for attr, t, is_param in tensors:
            if type(t) not in (torch.Tensor, nn.Parameter):
                raise Dsr1Error(f"pool tiered cannot stream {name}: {mod_name}.{attr} is a {type(t).__name__}, "
                                f"not a plain tensor")
            if not _dense(t):
                raise Dsr1Error(f"pool tiered cannot stream {name}: {mod_name}.{attr} is a strided view")
            key = (t.data_ptr(), t.numel())
            nbytes = t.numel() * t.element_size()
            if key in seen and t.data_ptr() != 0:
                off = seen[key]
            else:
                off = offset
                seen[key] = off
                offset += -(-nbytes // ALIGN) * ALIGN
            slots.append(_Slot(mod, attr, is_param, off, nbytes, t.dtype, tuple(t.shape), tuple(t.stride())))
    return slots, offset


def _view(block: torch.Tensor, s: _Slot) -> torch.Tensor:
    flat = block[s.offset:s.offset + s.nbytes].view(s.dtype)
    return flat.as_strided(s.shape, s.stride) if s.shape else flat.reshape(())


def _current(s: _Slot) -> torch.Tensor:
    return getattr(s.owner, s.attr)


def _rebind(s: _Slot, t: torch.Tensor) -> None:
    if s.is_param:
        s.owner._parameters[s.attr].data = t  # type: ignore[union-attr]
    else:
        s.owner._buffers[s.attr] = t


class UnitStreamer:
    """Runs the streamed units of a model out of ``slots`` device buffers (see the module doc).

    ``units``: ``(name, module, tier)`` in execution order, tier ``cpu`` or ``disk``;
    ``files``: where each disk unit's safetensors file is written (:func:`write_unit`), unit by
    unit, each unit's own tensors dropped as soon as its bytes are packed or written.
    """

    def __init__(self, units: list[tuple[str, nn.Module, str]], device: torch.device, files: dict[str, Path],
                 num_slots: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.names = [n for n, _, _ in units]
        self.tiers = [t for _, _, t in units]
        self.files = files
        self.layouts: list[list[_Slot]] = []
        sizes = []
        for name, module, _ in units:
            lay, size = layout(module, name)
            self.layouts.append(lay)
            sizes.append(size)
        n = len(units)
        # unit j's slot: j % num_slots. With an odd count the last unit and the first share a slot:
        # the first's copy for the next step then waits for the last to finish (the done event)
        self.slot_of = [j % num_slots for j in range(n)]
        # the unit each slot serves after unit j, cyclically
        self.next_user = []
        for j in range(n):
            later = [(j + d) % n for d in range(1, n + 1) if self.slot_of[(j + d) % n] == self.slot_of[j]]
            self.next_user.append(later[0])
        width = max(sizes)
        self.slots = [torch.empty(width, dtype=torch.uint8, device=device) for _ in range(num_slots)]
        self.holds: list[int | None] = [None] * num_slots  # the unit each slot holds or is receiving
        self.last_ran: list[int | None] = [None] * num_slots  # the unit that last computed out of each slot
        self.host: list[torch.Tensor | None] = []
        for j, (name, module, tier) in enumerate(units):
            # one unit at a time: its bytes go to their tier, then its own tensors are dropped
            block = None
            if tier == "cpu":
                block = torch.empty(sizes[j], dtype=torch.uint8, pin_memory=self.cuda)
                for s in self.layouts[j]:
                    _view(block, s).copy_(_current(s))
            else:
                write_unit(files[name], module, name)
            self.host.append(block)
            for s in self.layouts[j]:
                _rebind(s, _view(self.slots[self.slot_of[j]], s))
        self.staging = [torch.empty(width, dtype=torch.uint8, pin_memory=True) for _ in range(num_slots)] \
            if self.cuda and "disk" in self.tiers else []
        self.staged: list[int | None] = [None] * num_slots  # the unit whose bytes each staging block holds
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.copied: list[Any] = [torch.cuda.Event() if self.cuda else None for _ in range(n)]
        self.done: list[Any] = [torch.cuda.Event() if self.cuda else None for _ in range(n)]
        self.pending: list[concurrent.futures.Future[None] | None] = [None] * n
        self.reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dsr1-tiered") \
            if "disk" in self.tiers else None
        if self.reader is not None:
            weakref.finalize(self, self.reader.shutdown, wait=False)
        self.handles = []
        for j, (_, module, _) in enumerate(units):
            self.handles.append(module.register_forward_pre_hook(self._pre_hook(j)))
            self.handles.append(module.register_forward_hook(self._post_hook(j)))
        for j in range(n):  # each slot's first user, so the first step starts with its copies in flight
            if self.holds[self.slot_of[j]] is None:
                self._load(j, after=None)

    # --- copies ------------------------------------------------------------------------------

    def _load(self, j: int, after: int | None) -> None:
        """Start bringing unit ``j`` into its slot, once unit ``after`` (the slot's last user) has run."""
        s = self.slot_of[j]
        self.holds[s] = j
        if self.tiers[j] == "cpu":
            self._copy(j, self.host[j], after)  # type: ignore[arg-type]
        else:
            assert self.reader is not None
            self.pending[j] = self.reader.submit(self._read, j, after)

    def _copy(self, j: int, source: torch.Tensor, after: int | None) -> None:
        dest = self.slots[self.slot_of[j]][: source.numel()]
        if self.side is None:
            dest.copy_(source)
            return
        if after is not None:
            self.side.wait_event(self.done[after])
        with torch.cuda.stream(self.side):
            dest.copy_(source, non_blocking=True)
            self.copied[j].record(self.side)

    def _read(self, j: int, after: int | None) -> None:
        """Worker thread: unit ``j`` from its file into the slot (through a pinned staging block on CUDA)."""
        s = self.slot_of[j]
        if self.cuda:
            prev = self.staged[s]
            if prev is not None:
                self.copied[prev].synchronize()  # the staging block's last copy has left it
            target = self.staging[s]
        else:
            target = self.slots[s]
        size = read_unit(self.files[self.names[j]], target)
        if self.cuda:
            self.staged[s] = j
            self._copy(j, target[:size], after)

    # --- hooks -------------------------------------------------------------------------------

    def _pre_hook(self, j: int) -> Any:
        def pre(module: nn.Module, args: Any) -> None:
            if self.holds[self.slot_of[j]] != j:  # a step cut short: fetch it now
                self._load(j, after=self.last_ran[self.slot_of[j]])
            fut = self.pending[j]
            if fut is not None:
                self.pending[j] = None
                fut.result()
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self.copied[j])
        return pre

    def _post_hook(self, j: int) -> Any:
        def post(module: nn.Module, args: Any, output: Any) -> None:
            if self.cuda:
                self.done[j].record(torch.cuda.current_stream(self.device))
            self.last_ran[self.slot_of[j]] = j
            nxt = self.next_user[j]
            if nxt != j or len(self.names) == 1:
                self._load(nxt, after=j)
        return post

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self.reader is not None:
            self.reader.shutdown(wait=True)


def _drop_cached(path: Path) -> None:
    """Evict ``path``'s pages from the page cache: the disk tier is there because host memory is to
    be kept free, and the page cache is host memory (the next read of the unit goes to the disk)."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_unit(path: Path, module: nn.Module, name: str) -> None:
    """Write ``module``'s packed block (its tensors at their :func:`layout` offsets, as one uint8
    tensor named ``block``) as a safetensors file, atomically: a temporary file, fsync, rename."""
    from safetensors.torch import save_file

    lay, size = layout(module, name)
    block = torch.zeros(size, dtype=torch.uint8)
    for s in lay:
        _view(block, s).copy_(_current(s))
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"block": block}, str(tmp), metadata={"unit": name})
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages can be evicted (_drop_cached); dirty ones could not
    finally:
        os.close(fd)
    tmp.replace(path)
    _drop_cached(path)


def read_unit(path: Path, target: torch.Tensor) -> int:
    """Read the packed block of a file :func:`write_unit` wrote into the start of ``target`` (a CPU
    uint8 tensor, pinned or not) with one sequential read; returns its size. Page-faulting a memory
    map in would read a cold file in readahead-sized pieces, at a fraction of the disk's speed."""
    from dsr1.models.checkpoint import read_safetensors_header

    entry = read_safetensors_header(path)["block"]
    size = entry.end - entry.begin
    with open(path, "rb", buffering=0) as f:
        f.seek(entry.begin)
        got = f.readinto(memoryview(target[:size].numpy()))
    if got != size:
        raise Dsr1Error(f"pool tiered: {str(path)!r} is truncated ({got} of {size} bytes); it was written by "
                        f"this process, so the disk under disk_dir lost it")
    _drop_cached(path)
    return size
