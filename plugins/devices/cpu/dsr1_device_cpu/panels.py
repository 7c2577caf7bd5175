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

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsr1_sdk import Dsr1Error
from dsr1_sdk.kernels import cpu as cpu_kernels
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


def build_directory() -> Path:
    """Where the kernel is built and cached (see the module docstring)."""
    return cpu_kernels.build_directory(NAME)


@functools.cache
def _kernels() -> Any:
    return cpu_kernels.load_extension(NAME, SOURCE, "the cpu device's panel kernel", took="about 25 s",
                                      advice=" or set the cpu device option linear_kernel: none")


def build() -> str:
    """Build the kernel now where it can run (``make demo`` does, so the first generate is fast); what happened."""
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return f"panel kernel not built: it needs AVX-512 and this CPU offers {capability}"
    _kernels()
    return f"panel kernel ready in {build_directory()}"


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
        _kernels()  # registers the op
        self._mm = torch.ops.dsr1_device_cpu.panel_mm.default  # resolved once: this runs per token

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
    return cpu_kernels.build_main("python -m dsr1_device_cpu.panels", main.__doc__, build, build_directory, argv)


if __name__ == "__main__":
    raise SystemExit(main())
