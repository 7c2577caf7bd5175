"""GEMV on the CPU for decode-sized calls, and a streaming read (``cpu_gemv.cpp``, ``cpu_gemv_w8a8.cpp``).

:func:`gemv` computes ``y (M, N) = x (M, K) · W (N, K)ᵀ`` in fp32 with ``W`` in one of :data:`FORMATS`:

* ``int8``: ``weight`` int8 ``(N, K)``, ``scales`` ``(N,)``; ``W = q · s`` (the int8 plugin's layout);
* ``bf16``, ``fp16``, ``fp32``: ``weight`` of that dtype, no scales;
* ``w8a8``: as ``int8``, but ``x`` is quantized too, per row (``s_x = max|x_row| / 127``), and multiplied in
  integers: the w8a8 plugin's product, equal to its torch formulation bit for bit. Its AVX-512 path needs
  VNNI (int8 dot products, four times the weights per instruction of the fp32 conversion); :func:`paths`
  ``("w8a8")`` lists where it runs.

At decode a linear layer costs the read of its weight, so the kernel reads every weight byte once per call
(all ``M`` rows of ``x`` against each block of weight rows), converts it to fp32 in registers and accumulates
with FMA, in parallel over the output channels on torch's intra-op threads. It dispatches at run time on the
CPU's features: ``avx512`` (F/BW/VL/DQ), ``avx2`` (with FMA and F16C) or ``scalar`` (plain C++);
``path=`` or ``$DSR1_CPU_GEMV_PATH`` forces one (the tests run every path on one machine). Up to
:data:`MAX_ROWS` rows take one pass over the weight; more rows take one pass per 8, which is why callers stop
there and use a GEMM. ``x`` and ``scales`` of another float dtype (bf16, fp16) are converted to fp32 in the
op (a few KB per call), and the result is returned in ``x``'s dtype. The op is ``torch.ops.dsr1_sdk.cpu_gemv``
(a C++ ``torch.library`` op with a meta kernel), so ``torch.compile`` keeps it as one opaque call.

:func:`stream_read` reads a buffer with plain vector loads (and software prefetch) on all threads: the
fastest plain read, which the benchmarks' bandwidth floor includes.

The kernel is compiled at first use with ``torch.utils.cpp_extension.load`` (one line on stderr says so;
``python -m dsr1_sdk.kernels.cpu`` builds it ahead) and cached in :func:`build_directory`: one directory per
torch build (version, git commit, C++ ABI), Python ABI and torch installation (:func:`build_key`), under
``$TORCH_EXTENSIONS_DIR`` when set, else ``$DSR1_HOME/kernels``. It is compiled without ``-march=native`` (each
vector function names its own target), so a cache shared by machines of one installation serves them all. It
needs a C++ compiler and ninja; :func:`unavailable` says in one line why it cannot run here (callers then keep
their torch path).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dsr1_sdk import Dsr1Error

__all__ = ["FORMATS", "MAX_ROWS", "PATHS", "W8A8_MAX_K", "build", "build_directory", "build_key", "build_main",
           "decode_attention", "gemv", "load_extension", "paths", "rms_norm", "stream_read", "unavailable", "usable"]

#: the extension's files: its sources and the header they share.
SOURCES = tuple(Path(__file__).with_name(f)
                for f in ("cpu_gemv.cpp", "cpu_gemv_w8a8.cpp", "cpu_attention.cpp", "cpu_rms_norm.cpp", "cpu_gemv.h"))
#: the extension's module name (the cache directory is named after it).
NAME = "dsr1_sdk_cpu_gemv"
#: the weight formats and the weight dtype each takes.
FORMATS: dict[str, torch.dtype] = {"int8": torch.int8, "bf16": torch.bfloat16, "fp16": torch.float16,
                                   "fp32": torch.float32, "w8a8": torch.int8}
#: most rows read the weight once (one pass of the kernel); callers send larger calls to a GEMM.
MAX_ROWS = 8
#: largest K of format ``w8a8`` (its sums are int32: 255 · 127 · K must fit).
W8A8_MAX_K = 65536
#: dispatch paths, fastest first; ``auto`` picks the first this CPU runs.
PATHS = ("auto", "avx512", "avx2", "scalar")
#: environment variable that forces a path for every call that names none.
PATH_ENV = "DSR1_CPU_GEMV_PATH"


def build_key() -> str:
    """What a compiled kernel is valid for: torch's version, commit and C++ ABI, Python's ABI, the machine, and
    where torch is installed. The build commands name torch's include directories, so two environments of one
    torch build that shared a directory rebuilt each other's kernel, in place, under the processes that had it
    loaded."""
    commit = (torch.version.git_version or "unknown")[:12]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    where = hashlib.sha256(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    return (f"torch-{torch.__version__}-{commit}-cxx11abi{abi}-{sys.implementation.cache_tag}-{platform.machine()}"
            f"-{where}")


def build_directory(name: str = NAME) -> Path:
    """Where extension ``name`` is built and cached (see the module docstring)."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    # $DSR1_HOME as dsr1.models.loading.dsr1_home reads it (the SDK imports no core internals for it)
    root = Path(base).expanduser() if base else Path(os.environ.get("DSR1_HOME") or Path.home() / ".cache" / "dsr1"
                                                     ).expanduser() / "kernels"
    return root / name / build_key()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _notice(message: str) -> None:
    """``message`` on a line of its own on stderr (stdout flushed first, so nothing half-written joins it)."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ``ninja`` package installs it beside this Python, which is not on
    PATH when the environment is used without activating it."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # the binary's directory, only when PATH lacks it

        where = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        where = str(Path(sys.executable).parent)
    os.environ["PATH"] = where + os.pathsep + os.environ.get("PATH", "")


def load_extension(name: str, source: Path | Sequence[Path], what: str, took: str = "", advice: str = "") -> Any:
    """Compile (once per torch build, in :func:`build_directory`) and import the C++ extension ``name`` from
    ``source`` (one file, or several: the ``.cpp`` files are compiled, the headers they include staged beside
    them). ``what`` names it in the stderr line every build prints (with ``took``, how long a build takes) and
    in errors; a missing compiler or ninja is a one-line :class:`Dsr1Error` ending in ``advice`` (what else the
    user can do). The cpu device's panel kernel is built here too."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise Dsr1Error(f"building {what} needs ninja (pip install ninja) and a C++ compiler{advice}")
    where = build_directory(name)
    try:
        where.mkdir(parents=True, exist_ok=True)
        staged = [_stage(file, where) for file in ([source] if isinstance(source, Path) else source)]
    except OSError as err:
        raise Dsr1Error(f"the build directory {where} of {what} is not writable ({err.strerror}); set "
                        "TORCH_EXTENSIONS_DIR or DSR1_HOME to a writable directory") from None
    built = where / f"{name}.so"
    before = _mtime(built)
    announced = before is None or max(_mtime(file) or 0.0 for file in staged) > before  # what makes ninja build
    if announced:  # a pause deserves a word
        _notice(f"dsr1: building {what} (once per torch build{', ' + took if took else ''}) in {where}")
    try:
        # -fopenmp: at::parallel_for is an OpenMP region compiled into this module; at run time it binds to the
        # libgomp torch already loaded, so torch.set_num_threads governs it
        module = cpp_extension.load(name=name, sources=[str(f) for f in staged if f.suffix == ".cpp"],
                                    build_directory=str(where),
                                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError) as err:  # compiler missing or failing
        last = (str(err).strip().splitlines() or ["unknown error"])[-1]
        raise Dsr1Error(f"building {what} failed ({last}); install a C++ compiler (g++){advice}") from None
    if not announced and _mtime(built) != before:  # ninja rebuilt for a reason not foreseen: still say so
        _notice(f"dsr1: rebuilt {what} in {where}")
    return module


def _stage(source: Path, where: Path) -> Path:
    """``source`` copied into the build directory ``where``, rewritten only when its text changed: ninja
    rebuilds on a newer file, and a reinstalled package's file is newer without being different."""
    staged = where / source.name
    text = source.read_bytes()
    if not staged.is_file() or staged.read_bytes() != text:
        tmp = staged.with_suffix(".tmp")
        tmp.write_bytes(text)
        tmp.replace(staged)
    return staged


#: the loaded extension and the path calls default to, once :func:`_module` ran (plain globals, which
#: ``torch.compile`` reads without tracing into a cache).
_loaded: dict[str, Any] = {}


def _module() -> Any:
    if "module" not in _loaded:
        if "error" in _loaded:  # a failed build is not retried on every call
            raise Dsr1Error(_loaded["error"])
        try:
            if platform.machine().lower() not in ("x86_64", "amd64"):
                raise Dsr1Error(f"the CPU GEMV kernel is written for x86-64, not {platform.machine()}")
            module = load_extension(NAME, SOURCES, "the SDK's CPU GEMV kernel")
            _loaded["paths"] = tuple(module.paths())
            path = os.environ.get(PATH_ENV) or "auto"
            _check_path(path, f"${PATH_ENV}")  # before the module is kept: a wrong setting fails every call alike
        except Dsr1Error as err:
            _loaded["error"] = str(err)
            raise
        _loaded["module"], _loaded["op"], _loaded["default"] = module, torch.ops.dsr1_sdk.cpu_gemv.default, path
        _loaded["attention"] = torch.ops.dsr1_sdk.cpu_decode_attention.default
        _loaded["rms_norm"] = torch.ops.dsr1_sdk.cpu_rms_norm.default
    return _loaded["module"]


def unavailable() -> str | None:
    """Why the kernel cannot run here, in one line (``None``: it can). Builds it on first call."""
    try:
        _module()
    except Dsr1Error as err:
        return str(err)
    return None


def usable(owner: str, fallback: str) -> bool:
    """Whether ``owner`` (``"int8"``...) can call :func:`gemv` here; when not, one warning (per owner) says that
    it keeps ``fallback`` and why. Builds the kernel on first call; later calls read a dict (cheap, and
    ``torch.compile`` traces them without a cache wrapper to warn about)."""
    if "module" in _loaded:
        return True
    reason = unavailable()
    if reason is not None and owner not in _warned:
        _warned.add(owner)
        warnings.warn(f"{owner}: CPU decode keeps {fallback}, not the SDK's CPU GEMV: {reason}", stacklevel=3)
    return reason is None


_warned: set[str] = set()


def paths(fmt: str = "") -> tuple[str, ...]:
    """The dispatch paths this CPU runs (for ``fmt``: ``w8a8``'s AVX-512 needs VNNI), fastest first (``scalar``
    always)."""
    return tuple(_module().paths(fmt))


def _check_path(path: str, where: str) -> None:
    if path not in PATHS:
        raise Dsr1Error(f"{where} {path!r} is not a CPU GEMV path; use one of {', '.join(PATHS)}")
    if path != "auto" and path not in _loaded["paths"]:
        raise Dsr1Error(f"{where} {path!r} cannot run on this CPU; it runs {', '.join(_loaded['paths'])}")


def gemv(x: torch.Tensor, fmt: str, weight: torch.Tensor, scales: torch.Tensor | None = None,
         path: str | None = None) -> torch.Tensor:
    """``x (M, K) · W (N, K)ᵀ`` → ``(M, N)`` in ``x.dtype`` (see the module docstring); bad input is one line.

    The op checks its arguments itself (this runs per layer per token: no checks twice in Python)."""
    return _call("op", "CPU GEMV", x, fmt, weight, scales, _path(path))  # (M, N)


def _path(path: str | None) -> str:
    """The path a call runs: its own, else the default (``$DSR1_CPU_GEMV_PATH`` or ``auto``); loads the kernel."""
    if "default" not in _loaded:
        _module()  # first call: build or load the kernel, read $DSR1_CPU_GEMV_PATH
    return _loaded["default"] if path is None else path


def _call(op: str, what: str, *args: Any) -> torch.Tensor:
    """The loaded op ``op`` on ``args``; its error is one line (the op's message, or the dispatcher's for a
    tensor on another device) as a :class:`Dsr1Error`."""
    if op not in _loaded:
        _module()
    try:
        return _loaded[op](*args)
    except RuntimeError as err:
        raise Dsr1Error((str(err).strip().splitlines() or [f"{what} failed"])[0]) from None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     path: str | None = None) -> torch.Tensor:
    """One query per head against a key/value cache: ``softmax(scale · q · kᵀ) · v`` for ``q (B, Hkv, G, D)``
    (the ``G`` query heads that share each key/value head) and ``k, v (B, Hkv, S, D)``, one float dtype, computed
    in fp32, returned ``(B, Hkv, G, D)`` in that dtype. ``k`` and ``v`` may be views of a larger cache (their last
    dimension contiguous); no mask. ``torch.ops.dsr1_sdk.cpu_decode_attention``: one opaque call under
    ``torch.compile``, as :func:`gemv`. Bad input is one line."""
    return _call("attention", "CPU decode attention", q, k, v, scale, _path(path))  # (B, Hkv, G, D)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · (x · rsqrt(mean(x²) + eps)).to(x.dtype)`` over the last dimension, as transformers' Llama
    RMSNorm (the sum in fp32; the result in the dtype ``weight`` and ``x`` promote to). One thread, for a few
    rows (decode): a plain loop where torch's CPU ``rms_norm`` is a handful of dispatcher ops.
    ``torch.ops.dsr1_sdk.cpu_rms_norm``. Bad input is one line."""
    return _call("rms_norm", "CPU rms_norm", x, weight, eps)  # (..., C)


def stream_read(buffer: torch.Tensor, path: str = "auto") -> int:
    """Read ``buffer``'s bytes with vector loads on all threads; returns a checksum (which keeps the reads): the
    sum of its little-endian 64-bit words and of its last ``nbytes % 8`` bytes, wrapped to int64."""
    if buffer.device.type != "cpu":
        raise Dsr1Error(f"stream_read reads CPU memory, got a tensor on {buffer.device}")
    module = _module()
    if path != "auto":
        _check_path(path, "path")
    return int(module.stream_read(buffer.contiguous(), path))


def build() -> str:
    """Build the kernel now (``python -m dsr1_sdk.kernels.cpu``) so no decode waits for a compile; what happened."""
    _module()
    return f"CPU GEMV kernel ready in {build_directory()} (paths: {', '.join(paths())})"


def build_main(prog: str, description: str | None, build: Callable[[], str], where: Callable[[], Path],
               argv: list[str] | None = None) -> int:
    """The command that builds a kernel ahead of first use (``prog [--where]``): ``--where`` prints its build
    directory; otherwise it builds and prints what happened (exit 0) or the one-line reason it could not (exit 2).
    The cpu device's panel kernel has the same command."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--where", action="store_true", help="print the build directory and exit")
    args = parser.parse_args(argv)
    if args.where:
        print(where())
        return 0
    try:
        print(build())
    except Dsr1Error as err:
        print(f"dsr1: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dsr1_sdk.kernels.cpu [--where]``: build the CPU GEMV kernel ahead of first use."""
    return build_main("python -m dsr1_sdk.kernels.cpu", main.__doc__, build, build_directory, argv)


if __name__ == "__main__":
    raise SystemExit(main())
