"""fp32 linear layers from a "panel" weight layout, on AVX-512 CPUs (``panel_gemm.cpp``).

An ``(N, K)`` weight is kept as ``ceil(N / 64)`` contiguous ``(K, 64)`` panels; the kernel streams
each panel once per call, takes up to 8 input rows in one pass over it (two panels at a time for
1-2 rows, 6-row tiles past 8 while the panel sits in L2), and prefetches 2 KiB ahead. At decode
sizes that overlaps the weight stream with the multiply-adds, which neither MKL (the ``kn``
layout) nor oneDNN (its packed layout) does at a few rows. tiny-125m's 49 matmuls of one forward
(400 MB of fp32 weights, from DRAM up to 16 rows), 2-core Xeon with AVX-512, torch 2.13,
huge-page allocations on, medians in ms (``python -m dsr1.benchmarks.cpu_linear_kernels``,
``bench/results/cpu-linear-kernels.json``):

=========  ===============  ===============  ==================
rows       MKL, ``kn``      oneDNN packed    panels (this file)
=========  ===============  ===============  ==================
1          15.2             18.4             14.8
8          30.2             23.1             20.8
16         35.1             26.5             25.8
512        397              334              313
=========  ===============  ===============  ==================

So one layout serves every batch size, prefill included, and a model never switches layouts
between generate calls. The numerics are fp32 with fp32 accumulation in ``k`` order, like any
BLAS (not bit-identical to MKL's).

The kernel is compiled at first use with ``torch.utils.cpp_extension.load`` (about 25 s on 2
cores; ``make demo`` and ``python -m dsr1_device_cpu.panels`` build it ahead) and cached in
:func:`build_directory`: one directory per torch build (version, git commit, C++ ABI) and Python
ABI, under ``$TORCH_EXTENSIONS_DIR`` when it is set, else ``$DSR1_HOME/kernels``. torch's own
default cache is shared by every environment and keyed by neither, so two environments with
different torch builds rebuilt it in turn. Every build says so on its own line on stderr. That
needs a C++ compiler and ninja. :func:`unavailable` says why it cannot run here, or ``None``.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsr1_sdk import Dsr1Error
from dsr1_sdk.layers import PackedLinear

SOURCE = Path(__file__).with_name("panel_gemm.cpp")
#: the extension's module name (torch caches the build under it).
NAME = "dsr1_cpu_panel_gemm"
#: output columns per panel (the kernel's register tile).
PANEL = 64


def unavailable() -> str | None:
    """Why the panel kernel cannot run here (``None``: it can). Builds it on first call."""
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return f"the panel kernel needs AVX-512 and this CPU offers {capability}"
    try:
        _kernels()
    except Dsr1Error as err:
        return str(err)
    return None


def build_key() -> str:
    """What a compiled kernel is valid for: torch's version, commit and C++ ABI, Python's ABI, the machine."""
    commit = (torch.version.git_version or "unknown")[:12]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return f"torch-{torch.__version__}-{commit}-cxx11abi{abi}-{sys.implementation.cache_tag}-{platform.machine()}"


def build_directory() -> Path:
    """Where the kernel is built and cached (see the module docstring)."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR")
    # $DSR1_HOME as dsr1.models.loading.dsr1_home reads it (a plugin imports no core internals for it)
    root = Path(base).expanduser() if base else Path(os.environ.get("DSR1_HOME") or Path.home() / ".cache" / "dsr1"
                                                     ).expanduser() / "kernels"
    return root / NAME / build_key()


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _stage_source(where: Path) -> Path:
    """The kernel source copied into ``where``, rewritten only when its text changed: ninja rebuilds on a
    newer source, and a reinstalled plugin's file is newer without being different."""
    staged = where / SOURCE.name
    text = SOURCE.read_bytes()
    if not staged.is_file() or staged.read_bytes() != text:
        tmp = staged.with_suffix(".tmp")
        tmp.write_bytes(text)
        tmp.replace(staged)
    return staged


def _notice(message: str) -> None:
    """``message`` on a line of its own on stderr (stdout flushed first, so nothing half-written joins it)."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


@functools.cache
def _kernels() -> Any:
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise Dsr1Error("building the panel kernel needs ninja (pip install ninja) and a C++ compiler")
    where = build_directory()
    try:
        where.mkdir(parents=True, exist_ok=True)
        source = _stage_source(where)
    except OSError as err:
        raise Dsr1Error(f"the panel kernel's build directory {where} is not writable ({err.strerror}); set "
                        "TORCH_EXTENSIONS_DIR or DSR1_HOME to a writable directory") from None
    built = where / f"{NAME}.so"
    before = _mtime(built)
    announced = before is None or (_mtime(source) or 0.0) > before  # what makes ninja build
    if announced:  # a pause of half a minute deserves a word
        _notice(f"dsr1: building the cpu device's panel kernel (once per torch build, about 25 s) in {where}")
    try:
        # -fopenmp: at::parallel_for is an OpenMP region compiled into this module; at run time it binds
        # to the libgomp torch already loaded (same soname), so torch.set_num_threads governs it
        module = cpp_extension.load(name=NAME, sources=[str(source)], build_directory=str(where),
                                    extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except (RuntimeError, OSError, ImportError) as err:  # compiler missing or failing
        last = (str(err).strip().splitlines() or ["unknown error"])[-1]
        raise Dsr1Error(f"building the panel kernel failed ({last}); install a C++ compiler (g++) or set the "
                        "cpu device option linear_kernel: none") from None
    if not announced and _mtime(built) != before:  # ninja rebuilt for a reason not foreseen: still say so
        _notice(f"dsr1: rebuilt the cpu device's panel kernel in {where}")
    return module


def build() -> str:
    """Build the kernel now where it can run (``make demo`` does, so the first generate is fast); what happened."""
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return f"panel kernel not built: it needs AVX-512 and this CPU offers {capability}"
    _kernels()
    return f"panel kernel ready in {build_directory()}"


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ``ninja`` package (a dependency) installs it beside this
    Python, which is not on PATH when the environment is used without activating it."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja  # the binary's directory, only when PATH lacks it

        where = str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        where = str(Path(sys.executable).parent)
    os.environ["PATH"] = where + os.pathsep + os.environ.get("PATH", "")


class PanelLinear(PackedLinear):
    """A linear layer whose ``(out, in)`` fp32 weight is held as panels (see the module docstring).

    Made by :func:`pack_linear` from an ``nn.Linear``; like every ``PackedLinear``, its
    ``state_dict()`` is the plain weight and bias, so ``save_pretrained`` writes ordinary checkpoints.
    """

    def __init__(self, panels: torch.Tensor, bias: torch.Tensor | None, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.panels = nn.Parameter(panels, requires_grad=False)  # (P, K, 64)
        self.bias = None if bias is None else nn.Parameter(bias.detach().contiguous(), requires_grad=False)
        self._no_bias = torch.empty(0)
        self._mm = _kernels().mm  # resolved once: this runs per token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise Dsr1Error(f"a panel-packed linear layer computes float32 on the CPU, got {x.dtype} on {x.device}")
        rows = x.reshape(-1, self.in_features).contiguous()  # (M, K); a view when x is contiguous
        out = self._mm(rows, self.panels, self._no_bias if self.bias is None else self.bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)  # (..., N)

    def dense_weight(self) -> torch.Tensor:
        p, k, _ = self.panels.shape
        return self.panels.detach().transpose(1, 2).reshape(p * PANEL, k)[: self.out_features].contiguous()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, panels={self.panels.shape[0]}"


@torch.no_grad()
def pack_linear(linear: nn.Linear) -> PanelLinear:
    """``linear`` (fp32, CPU) as a :class:`PanelLinear`; the caller drops the original."""
    panels = _kernels().pack(linear.weight.detach())  # (P, K, 64)
    return PanelLinear(panels, linear.bias, linear.in_features, linear.out_features)


def main(argv: list[str] | None = None) -> int:
    """``python -m dsr1_device_cpu.panels [--where]``: build the kernel ahead of first use."""
    parser = argparse.ArgumentParser(prog="python -m dsr1_device_cpu.panels", description=main.__doc__)
    parser.add_argument("--where", action="store_true", help="print the build directory and exit")
    args = parser.parse_args(argv)
    if args.where:
        print(build_directory())
        return 0
    try:
        print(build())
    except Dsr1Error as err:
        print(f"dsr1: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
