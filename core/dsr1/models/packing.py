"""oneDNN-packed ``nn.Linear`` weights for batched decode on the CPU.

At a few rows per matmul (decode at batch 2-32) MKL's ``sgemm`` repacks the weight on every
call and stays compute-bound; oneDNN's matmul on a weight reordered once into its blocked
layout does not. At one row MKL's matrix-vector product already streams at DRAM bandwidth
and oneDNN's is slower. The 49 matmuls of one tiny-125m decode step (fp32, 12 layers + lm_head,
weights streamed from DRAM), 2-core Xeon, torch 2.13, MKL 2024.2, oneDNN 3.12:

=========  ==========================  =================
rows (M)   MKL on the ``kn`` layout    oneDNN packed
=========  ==========================  =================
1          13.5 ms (≈ 30 GB/s)         17.7 ms
8          27.4 ms                     20.6 ms
=========  ==========================  =================

So the CPU ``auto`` layout follows the batch (``LlamaForCausalLM.prepare_batch``): the decoder
layers are packed before a generate of 2 or more rows and go back to ``kn`` before one of a
single row; each switch reorders their weights once (≈ 0.3 s for 400 MB), one tensor at a
time. The output head (32000 × 768 on tiny-125m) stays ``kn``: packing it would gain 1.9 ms per
batch-8 step, but reordering it after load needs ≈ 170 MB on top of the model (over the
transformers peak the benchmark holds us to), and packing it at load (when little else is
loaded) leaves a freshly loaded model with an opaque weight that tools reading
``linear.weight`` (``dsr1.quantization.evaluate``) and ``torch.compile`` refuse, and costs
1.4 ms per batch-1 step. A packed
weight is an opaque ``torch._mkldnn`` tensor: ops other than this module's forward refuse it
loudly; ``to_dense()`` gives the ``(out, in)`` values back.
"""
from __future__ import annotations

import torch
from torch import nn

#: the row count oneDNN chooses the blocked layout for (any row count computes correctly).
PACK_ROWS = 8


class OnednnLinear(nn.Linear):
    """``nn.Linear`` whose ``weight`` is oneDNN-packed (made by :func:`pack_linears_`, never built directly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")  # (..., out)


def packable(model: nn.Module) -> list[nn.Linear]:
    """The plain fp32 CPU ``nn.Linear`` layers of ``model`` whose weight no other module shares."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [
        m for m in model.modules()
        if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
        and id(m.weight) not in shared
    ]


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` ``(out, in)`` fp32 reordered into oneDNN's blocked layout (an opaque tensor, same shape)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)


@torch.no_grad()
def pack_linears_(model: nn.Module) -> int:
    """Reorder every :func:`packable` layer's weight into oneDNN's layout, in place; returns how many."""
    layers = packable(model)
    for m in layers:
        m.weight = nn.Parameter(pack_weight(m.weight), requires_grad=False)
        m.__class__ = OnednnLinear
    return len(layers)


@torch.no_grad()
def unpack_linears_(model: nn.Module) -> int:
    """Turn every :class:`OnednnLinear` back into an ``nn.Linear`` with a ``kn`` weight; returns how many."""
    layers = [m for m in model.modules() if type(m) is OnednnLinear]
    for m in layers:
        dense = m.weight.to_dense()  # (out, in) contiguous
        m.weight = nn.Parameter(dense.t().contiguous().t(), requires_grad=False)  # (in, out) storage
        del dense
        m.__class__ = nn.Linear
    return len(layers)


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t``, or its plain values if it is a packed weight."""
    return t.to_dense() if t.is_mkldnn else t
