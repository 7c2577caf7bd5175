"""What every benchmark report shares: the machine, versions and date, list options, plugin
names that may not be installed yet, peak-memory probes and the streaming bandwidth (the decode floor).

Peak memory on CPU is the process's resident-set high-water mark (``VmHWM`` of
``/proc/self/status``), reset just before the measured call by writing ``5`` to
``/proc/self/clear_refs`` (Linux ≥ 4.0); the figure is ``VmHWM − VmRSS`` at the reset, i.e.
the bytes the call itself touched at its peak, whoever allocated them (torch, MKL, oneDNN).
On CUDA it is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` minus
``memory_allocated`` before the call (torch's caching allocator; workspace that cuBLAS/cuDNN
take outside it is not counted).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dsr1.errors import Dsr1Error, did_you_mean


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str | None:
    try:
        from importlib.metadata import version as _v

        return _v(dist)
    except Exception:  # noqa: BLE001 - not installed
        return None


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), where Linux says."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return next((w[1:-1] for w in text.split() if w.startswith("[")), None)


def maxrss_mb() -> float:
    """This process's resident-set high-water mark in MiB (``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def bandwidth_probe(device: str) -> dict[str, float]:
    """Weight-read bandwidth (GB/s) of each way a decode step reads its weights, over 480 MiB of
    random fp32 (far larger than any last-level cache), best of 5, on all threads:

    * ``gemv_nk``: ``W @ x`` with ``W`` stored (out, in), as transformers and CUDA kernels read it;
    * ``gemv_kn``: ``x @ W`` with ``W`` stored (in, out), the layout dsr1 keeps on the CPU at small
      batches (on some CPUs it streams twice as fast as ``gemv_nk``);
    * ``sum``: a reduction over the whole buffer, the plain streaming read;
    * ``stream`` (CPU, where the SDK's CPU kernels build): :func:`dsr1_sdk.kernels.cpu.stream_read`,
      plain vector loads on all threads, which on some CPUs reads faster than any torch op (a floor
      from torch's reads alone was one llama.cpp beat).
    """
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(163_840, 768, device=device, generator=g)  # 480 MiB, not zeros
    x = torch.randn(768, device=device, generator=g)
    wt = w.view(768, 163_840)  # the same bytes read as (in, out): the access pattern, not the values, matters
    xt = x.view(1, 768)
    ways: dict[str, Any] = {"gemv_nk": lambda: torch.mv(w, x), "gemv_kn": lambda: xt @ wt, "sum": lambda: w.sum()}
    if device == "cpu":
        try:  # the SDK ships with dsr1 but sits above it: imported only here, and only if installed
            from dsr1_sdk.kernels import cpu as cpu_kernels
        except ImportError:
            cpu_kernels = None
        if cpu_kernels is not None and cpu_kernels.unavailable() is None:
            ways["stream"] = lambda: cpu_kernels.stream_read(w)
    out: dict[str, float] = {}
    for name, fn in ways.items():
        fn()  # warm-up: kernels picked, pages touched
        best = float("inf")
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        out[name] = round(w.nbytes / best / 1e9, 2)
    return out


def bandwidth_gbs(device: str) -> float:
    """Weight-streaming bandwidth (GB/s) for decode floors: the fastest of :func:`bandwidth_probe`'s
    reads (on the CPU its ``stream`` read, where the SDK's kernels build). A floor from a slower read
    than the engine's own would be one an engine beats."""
    return max(bandwidth_probe(device).values())


def above_floor(rate_tok_s: float, batch_size: int, bytes_per_step: int, bandwidth: float) -> float:
    """The weight-read bandwidth (GB/s) a decode of ``rate_tok_s`` at ``batch_size`` rows implies
    (each step reads ``bytes_per_step`` once), when it is above ``bandwidth``; 0.0 otherwise."""
    achieved = rate_tok_s / batch_size * bytes_per_step / 1e9
    return round(achieved, 2) if achieved > bandwidth * 1.02 else 0.0


def environment(device: str, threads: int | None = None) -> dict[str, Any]:
    """``date``, ``machine`` and ``versions`` entries of a report (as ``dsr1 bench`` writes them)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads or torch.get_num_threads(),
                    "gpu": gpu, "memory_gb": round(_mem_total() / 2**30, 1), "load_avg_1m": os.getloadavg()[0]},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                     "dsr1": version("dsr1")},
    }


def read_report(path: str, form: str | None = None) -> dict[str, Any]:
    """A report an earlier run wrote with ``--output``, for ``--from-json``; with ``form`` (``"attention"``), one
    of ``dsr1 bench FORM``'s (its ``command`` says so). Unreadable or another command's: a one-line error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise Dsr1Error(f"--from-json {path}: {err}") from None
    want = f"dsr1 bench {form} "
    if not isinstance(data, dict) or (form and not str(data.get("command", "")).startswith(want)) \
            or not isinstance(data.get("results"), list):
        raise Dsr1Error(f"--from-json {path} is not a report of dsr1 bench {form or ''} (no command "
                        f"'{want.strip()} ...' and results list); pass a file that its --output wrote")
    return data


def from_report(path: str, show: Any) -> None:
    """``show()`` on a report read by :func:`read_report`; a report damaged since (a field missing or of another
    type) is a one-line error, not a traceback."""
    try:
        show()
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise Dsr1Error(f"--from-json {path}: the report is damaged ({type(err).__name__}: {err}); run the "
                        f"measurement again with --output") from None


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as its name (``"inf"``, ``"nan"``): strict JSON has no Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_report(report: dict[str, Any], output: str | None, flag: str = "--output") -> str:
    """``report`` as indented strict JSON, marked as dsr1's (``writer``), also written to ``output`` when given
    (:func:`dsr1.output_files.write_json`: never over a file dsr1 did not write, atomically); returns the text."""
    from dsr1.output_files import is_dsr1_report, write_json

    if not is_dsr1_report(report):
        report = {"writer": "dsr1", **report}
    text = json.dumps(_finite(report), indent=2, allow_nan=False)
    if output:
        write_json(output, text, flag)
    return text


def _mem_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    """``"1024,4096"`` → ``[1024, 4096]``; a one-line error otherwise."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise Dsr1Error(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < minimum:
        raise Dsr1Error(f"{flag} needs at least one value, each ≥ {minimum}; got {text!r}")
    return sorted(set(values))


def name_list(text: str, flag: str) -> list[str]:
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise Dsr1Error(f"{flag} needs at least one name, got {text!r}")
    return list(dict.fromkeys(names))


def check_names(family: str, names: Sequence[str], expected: Iterable[str]) -> dict[str, str]:
    """Split ``names`` into installed ones and ones to skip: name → reason it is skipped.

    A name of ``expected`` (the plugins issue 4 builds) that is not installed is skipped with
    that reason; any other unknown name is a typo and a one-line error with the closest names.
    """
    from dsr1.registry import PluginRegistry, pip_hint

    installed = PluginRegistry.from_env().names(family)
    skipped: dict[str, str] = {}
    for name in names:
        if name in installed:
            continue
        if name in expected:
            skipped[name] = f"{family} plugin {name!r} is not installed (`{pip_hint(family, name)}`)"
            continue
        raise Dsr1Error(f"no {family} plugin named {name!r}{did_you_mean(name, [*installed, *expected])} "
                        f"(installed: {', '.join(installed) or 'none'})")
    return skipped


def parse_plugin_options(items: Sequence[str], names: Sequence[str], flag: str) -> dict[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` items → ``{name: {key: value}}`` (values parse as JSON when they can)."""
    from dsr1.config import parse_option_items

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise Dsr1Error(f"{flag} takes NAME.KEY=VALUE (e.g. sliding.window=4096), got {item!r}")
        if name not in names:
            raise Dsr1Error(f"{flag} {item!r} names {name!r}, which is not benchmarked{did_you_mean(name, names)}")
        out.setdefault(name, {}).update(parse_option_items([rest]))
    return out


def cpu_busy() -> tuple[float, float, float]:
    """(wall seconds, busy CPU-seconds of the whole machine, CPU-seconds of this process)."""
    busy = float("nan")
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    own = os.times()
    return time.perf_counter(), busy, own.user + own.system


def others_busy(before: tuple[float, float, float], after: tuple[float, float, float]) -> float | None:
    """Percent of all CPUs other processes kept busy while this worker was timing (None: unknown)."""
    wall = after[0] - before[0]
    other = (after[1] - before[1]) - (after[2] - before[2])
    if wall <= 0 or math.isnan(other):  # no /proc/stat
        return None
    return round(max(0.0, 100 * other / (wall * (os.cpu_count() or 1))), 1)


# --- peak memory ------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes a region allocated on ``device`` (see the module docstring for how)."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.base = 0
        self.method = ("torch.cuda.max_memory_allocated" if self.cuda
                       else "VmHWM - VmRSS after reset via /proc/self/clear_refs")

    def __enter__(self) -> PeakMemory:  # noqa: PYI034 - never subclassed
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def peak(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self.base)
        return max(0, _status_kb("VmHWM") * 1024 - self.base)


def limit_address_space(cap_bytes: int) -> None:
    """Let this (worker) process map at most ``cap_bytes`` more than it has now, so an
    allocation past the cap fails with a catchable error instead of pushing the machine into
    swap or the OOM killer (CPU only; virtual size, so the limit is on the conservative side)."""
    import resource

    now = _status_kb("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (now + cap_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))


def is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return isinstance(err, MemoryError) or "OutOfMemory" in text or "out of memory" in text or \
        "can't allocate memory" in text or "not enough memory" in text


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def random_model(shape: str, config: Any, overrides: dict[str, Any]) -> Any:
    """A model of a built-in ``shape`` (``dsr1 bench --shape``) with random weights, built
    through the plugin pipeline that ``config`` + ``overrides`` select."""
    from dsr1.benchmarks.shapes import SHAPES, build_random, random_weights
    from dsr1.config import load_config
    from dsr1.registry import PluginRegistry

    if shape not in SHAPES:
        raise Dsr1Error(f"unknown shape {shape!r}" + did_you_mean(shape, SHAPES))
    import torch

    pipeline = PluginRegistry.from_env().resolve(load_config(config, **overrides))
    builder = pipeline.model_builder(SHAPES[shape]["model_type"])
    device = pipeline.device.torch_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf, reader = random_weights(shape, dtype, device)
    model = build_random(builder, hf, reader, pipeline)
    pipeline.fire_model_loaded(model)
    return model
