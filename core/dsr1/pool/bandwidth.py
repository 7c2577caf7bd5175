"""The bandwidths the ``tiered`` pool's cost model plans with, measured once per machine.

Five figures, in bytes per second, each measured the way the streamed step uses it:

* ``device_read``: the compute device reading its own memory (a reduction over a buffer far
  larger than any cache: decode reads every resident weight once per step);
* ``host_to_device``: pinned host memory copied to the device (how offloaded layers arrive);
  on a CPU-only machine there is no copy and this equals ``device_read``;
* ``host_read``: every CPU thread streaming host memory (a module run on the CPU reads this way);
* ``disk_read``: a file read cold from ``disk_dir`` (its pages dropped from the page cache first);
* ``cpu_matmul``: weight bytes per second a batch-1 matrix product on the CPU gets through, in the
  model's dtype (a layer run on the CPU is its projections; what the CPU's kernels reach for that
  dtype, not the raw memory bandwidth, is what it costs).

They are cached as JSON under ``$DSR1_HOME/bandwidth.json``, keyed by host, device and the
filesystem of ``disk_dir`` (``cpu_matmul`` per dtype), so the second start skips the measurement. A figure given in the
pool's ``bandwidth_gbps`` option replaces the measured one.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from dsr1.models.loading import dsr1_home

#: the figures, in the order they are reported.
NAMES = ("device_read", "host_to_device", "host_read", "disk_read", "cpu_matmul")
#: the figures that do not depend on the dtype.
_PLAIN = NAMES[:4]
#: bytes each measurement moves: large enough to defeat caches, small enough to take well under a second.
_BUFFER_BYTES = 256 << 20
_FILE_BYTES = 128 << 20


def _best_of(fn: Callable[[], float], rounds: int = 3) -> float:
    return min(fn() for _ in range(rounds))


def _device_read(device: torch.device) -> float:
    x = torch.ones(_BUFFER_BYTES // 4, dtype=torch.float32, device=device)
    x.sum()  # warm-up: kernels loaded, pages touched

    def once() -> float:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            x.sum()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        x.sum()
        return time.perf_counter() - t0

    return _BUFFER_BYTES / _best_of(once)


def _host_to_device(device: torch.device) -> float:
    src = torch.ones(_BUFFER_BYTES, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)

    def once() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return _BUFFER_BYTES / _best_of(once)


def _disk_read(directory: Path) -> float:
    """A cold read of a file written in ``directory`` (its pages evicted with ``posix_fadvise``)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".dsr1-bw-", dir=directory)
    try:
        block = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as f:
            for _ in range(_FILE_BYTES >> 20):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        buf = bytearray(_FILE_BYTES)

        def once() -> float:
            with open(name, "rb", buffering=0) as f:
                if hasattr(os, "posix_fadvise"):  # clean pages: DONTNEED evicts them, so the read is cold
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.perf_counter()
                f.readinto(memoryview(buf))
                return time.perf_counter() - t0

        return _FILE_BYTES / _best_of(once, rounds=2)
    finally:
        os.unlink(name)


def _cpu_matmul(dtype: torch.dtype) -> float:
    """Weight bytes per second of ``x @ W.T`` on the CPU with one row of ``x``: a decode step's projection."""
    rows, cols = 4096, _BUFFER_BYTES // (4096 * dtype.itemsize)
    w = torch.ones(rows, cols, dtype=dtype)
    x = torch.ones(1, cols, dtype=dtype)
    torch.nn.functional.linear(x, w)  # warm-up: kernels picked, pages touched

    def once() -> float:
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        return time.perf_counter() - t0

    return w.numel() * dtype.itemsize / _best_of(once)


def _key(device: torch.device, disk_dir: Path) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    disk_dir.mkdir(parents=True, exist_ok=True)
    return f"{platform.node()}|{device.type}|{name}|dev{os.stat(disk_dir).st_dev}|threads{torch.get_num_threads()}"


def measure(device: torch.device, disk_dir: Path) -> dict[str, float]:
    """The four figures that do not depend on the dtype, measured now (bytes/s)."""
    host = _device_read(torch.device("cpu"))
    on_device = _device_read(device) if device.type != "cpu" else host
    h2d = _host_to_device(device) if device.type == "cuda" else on_device
    return {"device_read": on_device, "host_to_device": h2d, "host_read": host, "disk_read": _disk_read(disk_dir)}


def bandwidths(device: torch.device, disk_dir: Path, given: Mapping[str, float] | None = None,
               cache: Path | None = None, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The figures for ``device``, ``disk_dir`` and (``cpu_matmul``) ``dtype`` in bytes/s: ``given``
    (GB/s) first, then the cache, then a measurement, which is cached. A cache that cannot be
    read is measured again."""
    given_bps = {k: float(v) * 1e9 for k, v in (given or {}).items()}
    if all(k in given_bps for k in NAMES):
        return {k: given_bps[k] for k in NAMES}
    cache = cache or dsr1_home() / "bandwidth.json"
    key = _key(device, disk_dir)
    matmul = f"cpu_matmul.{str(dtype).removeprefix('torch.')}"
    try:
        table = json.loads(cache.read_text())
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    found = table.get(key)
    if not isinstance(found, dict):
        found = {}

    def known(name: str) -> bool:
        return isinstance(found.get(name), (int, float)) and found[name] > 0

    changed = False
    if not all(known(k) for k in _PLAIN if k not in given_bps):
        found.update(measure(device, disk_dir))
        changed = True
    if "cpu_matmul" not in given_bps and not known(matmul):
        found[matmul] = _cpu_matmul(dtype)
        changed = True
    if changed:
        table[key] = found
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        os.replace(tmp, cache)  # our own file, whole or not at all
    out = {k: given_bps.get(k, float(found.get(k, 0.0))) for k in _PLAIN}
    out["cpu_matmul"] = given_bps.get("cpu_matmul", float(found.get(matmul, 0.0)))
    return out
