"""Device layouts of the linear layers, and oneDNN-packed weights for batched decode on the CPU.

First choice: the device's own layout and kernel (:func:`pack_for_device_`, ``Device.pack_linear``;
the cpu device's AVX-512 panel kernel, ``dsr1_device_cpu.panels``), which serves every batch size
from one layout. Where the device declines (``linear_kernel: none``, no AVX-512, no compiler), the
oneDNN/``kn`` switching below applies.

Both are chosen at the first generate, after the quant policy and pruning ran at load, whatever the
policy: :func:`packable` offers the layers it left plain fp32 ``nn.Linear`` (every one with quant unset
or ``fp32``; those in an ``int8``/``int4`` policy's ``skip`` when its ``compute_dtype`` is fp32; none
under ``bf16``). Deciding it at build, before the policy, once made ``quant: fp32`` lose the fast path.

At a few rows per matmul (decode at batch 2-32) MKL's ``sgemm`` repacks the weight on every
call and stays compute-bound; oneDNN's matmul on a weight reordered once into its blocked
layout does not. At one row MKL's matrix-vector product already streams at DRAM bandwidth
and oneDNN's is slower (the measured per-step times of both on tiny-125m are in
``bench/results/cpu-linear-kernels.json``, made by ``python -m dsr1.benchmarks.cpu_linear_kernels``).

So the CPU ``auto`` layout follows the batch (``LlamaForCausalLM.prepare_batch``): every fp32
linear layer is packed before a generate of 2 or more rows and goes back to ``kn`` before one
of a single row. Eager only: a compiled decode step keeps the layout it was first traced on, so
it gets the device's layout (taken at the first generate, before any trace) or none. A switch
reorders the weights once (≈ 0.3 s for 500 MB), one layer at a time, and a wide layer (the
output head) in row blocks of at most :data:`BLOCK_BYTES`: the old layout of one layer, its new
layout and one block are all the switch holds beyond the model (a whole-matrix reorder of the
head would add two 98 MB copies: oneDNN copies a ``kn`` view to contiguous first).

A packed layer (:class:`OnednnLinear`, a :class:`PackedLinear`) is CPU inference only: its blocks
are opaque ``torch._mkldnn`` tensors that other ops refuse loudly. ``state_dict()`` (and so
``save_pretrained``) gives its plain ``(out, in)`` weight; :meth:`PackedLinear.dense_weight` does too.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsr1.errors import Dsr1Error

#: the row count oneDNN chooses the blocked layout for (any row count computes correctly).
PACK_ROWS = 8
#: a packed weight is split into row blocks of at most this many bytes (see the module docstring).
BLOCK_BYTES = 16 * 2**20
#: block heights are multiples of this (oneDNN's output-channel blocking).
ROW_ALIGN = 64


def block_rows(out_features: int, in_features: int, element_size: int) -> int:
    """Rows per block for an ``(out, in)`` weight: the whole matrix when it fits in :data:`BLOCK_BYTES`."""
    rows = max(BLOCK_BYTES // (in_features * element_size), 1)
    if rows >= out_features:
        return out_features
    return min(max(rows // ROW_ALIGN, 1) * ROW_ALIGN, out_features)


class PackedLinear(nn.Module):
    """Base of a linear layer whose ``(out, in)`` weight is held in a kernel's own layout for
    inference (:class:`OnednnLinear`, the cpu device's ``PanelLinear``).

    Subclasses set ``in_features``, ``out_features`` and ``bias`` (a plain parameter or ``None``)
    and give :meth:`dense_weight`. The state is that of the ``nn.Linear`` the layer stands for, so
    ``state_dict()`` and ``save_pretrained`` give plain weights; tools that rewrite ``nn.Linear``
    layers refuse a model holding one (:func:`refuse_packed`).
    """

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def dense_weight(self) -> torch.Tensor:
        """The plain ``(out, in)`` weight (a new contiguous tensor)."""
        raise NotImplementedError

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


class OnednnLinear(PackedLinear):
    """A linear layer whose ``(out, in)`` weight is held oneDNN-packed, in row blocks.

    Made by :func:`pack_linears_` from an ``nn.Linear`` (never built directly); ``block{i}`` are
    the packed blocks (parameters, so ``parameters()`` still counts the weights), ``bias`` the
    plain bias. :func:`unpack_linears_` turns it back into an ``nn.Linear``.
    """

    def __init__(self, blocks: list[torch.Tensor], bias: torch.Tensor | None, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = sum(int(b.shape[0]) for b in blocks)
        self.n_blocks = len(blocks)
        for i, block in enumerate(blocks):
            self.register_parameter(f"block{i}", nn.Parameter(block, requires_grad=False))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        rows = [int(b.shape[0]) for b in blocks]
        self._bias_blocks = [None] * len(blocks) if bias is None else list(self.bias.detach().split(rows))

    def blocks(self) -> list[torch.Tensor]:
        return [getattr(self, f"block{i}") for i in range(self.n_blocks)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [
            torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")  # (..., rows of the block)
            for w, b in zip(self.blocks(), self._bias_blocks)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)  # (..., out)

    def dense_weight(self) -> torch.Tensor:
        return torch.cat([b.to_dense() for b in self.blocks()], dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={self.n_blocks}, oneDNN-packed"


def refuse_packed(model: nn.Module, what: str) -> None:
    """Raise if ``model`` holds linear layers packed for CPU decode: tools that rewrite or read
    ``nn.Linear`` weights (quantization, pruning) would silently pass them by."""
    packed = [name for name, m in model.named_modules() if isinstance(m, PackedLinear)]
    if packed:
        raise Dsr1Error(f"{what}: {len(packed)} linear layers (first {packed[0]!r}) are packed for CPU decode, "
                        f"which a generate call does on the CPU 'auto' layout; load the model again and {what} "
                        "before generating")


def packable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(parent, name)`` of every plain fp32 CPU ``nn.Linear`` whose weight no embedding shares (no
    reference to the layers themselves: each old weight is freed as soon as its layer is replaced)."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        (parent, name)
        for parent in model.modules()
        for name, m in parent.named_children()
        if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
        and id(m.weight) not in shared
    ]


def pack_weight(weight: torch.Tensor) -> list[torch.Tensor]:
    """``weight`` ``(out, in)`` fp32 reordered into oneDNN's blocked layout, in row blocks (opaque tensors)."""
    rows = block_rows(weight.shape[0], weight.shape[1], weight.element_size())
    return [torch.ops.mkldnn._reorder_linear_weight(part.detach(), PACK_ROWS) for part in weight.split(rows)]


@torch.no_grad()
def pack_for_device_(model: nn.Module, device: Any) -> int:
    """Replace each :func:`packable` layer by the module ``device.pack_linear`` makes of it, where it
    makes one (one layer at a time: each old weight is freed before the next is packed)."""
    done = 0
    for parent, name in packable(model):
        packed = device.pack_linear(getattr(parent, name))
        if packed is not None:
            setattr(parent, name, packed)
            done += 1
        del packed
    return done


@torch.no_grad()
def pack_linears_(model: nn.Module) -> int:
    """Replace every :func:`packable` layer of ``model`` by an :class:`OnednnLinear`; returns how many."""
    places = packable(model)
    for parent, name in places:
        m = getattr(parent, name)
        setattr(parent, name, OnednnLinear(pack_weight(m.weight), m.bias, m.in_features))
        del m
    return len(places)


@torch.no_grad()
def unpack_linears_(model: nn.Module) -> int:
    """Turn every :class:`OnednnLinear` of ``model`` back into an ``nn.Linear`` with a ``kn`` weight."""
    places = [(parent, name) for parent in model.modules() for name, m in parent.named_children()
              if type(m) is OnednnLinear]
    for parent, name in places:
        m = getattr(parent, name)
        kn = torch.empty(m.in_features, m.out_features)  # (in, out) storage; the weight is its (out, in) view
        row = 0
        for i in range(m.n_blocks):
            block = getattr(m, f"block{i}")
            rows = int(block.shape[0])
            kn[:, row : row + rows] = block.to_dense().t()  # (in, rows)
            delattr(m, f"block{i}")  # free each packed block as soon as it is copied
            row += rows
        with torch.device("meta"):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        linear.weight = nn.Parameter(kn.t(), requires_grad=False)
        if m.bias is not None:
            linear.bias = m.bias
        setattr(parent, name, linear)
        del m
    return len(places)
