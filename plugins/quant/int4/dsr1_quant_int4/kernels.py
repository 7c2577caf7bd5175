"""The int4 kernels of each device type, and unpacking their private weight layouts.

Both kernels are torch's tinygemm: ``y = x · ((q - 8) · scale + zero)ᵀ`` with one scale and
zero per ``group`` input columns, ``scales_and_zeros`` laid out ``(in / group, out, 2)``.

* CPU: ``aten._convert_weight_to_int4pack_for_cpu`` (int32 ``(out, in)`` values 0..15 →
  uint8 ``(out, in / 2)`` blocked layout; ``out`` a multiple of 16) and
  ``aten._weight_int4pack_mm_for_cpu`` (bf16, fp16 or fp32 activations).
* CUDA (compute capability ≥ 8.0): ``aten._convert_weight_to_int4pack`` (uint8 ``(out, in / 2)``,
  high nibble first, ``inner_k_tiles`` 2/4/8) and ``aten._weight_int4pack_mm`` (bf16 activations).
  Written, not measured here (no device budget).

A checkpoint must not depend on those layouts, so a layer saves the canonical nibbles
(:func:`dsr1_sdk.quant.pack_nibbles`). Packing is a permutation of 4-bit values;
:func:`unpack` recovers the original order by packing the digits of each element's index
(base 16, one pack per digit) and reading where each digit landed: whatever the layout, and
checked to be a permutation.
"""
from __future__ import annotations

import functools

import torch

#: group sizes the policy offers (the issue's 32/64/128).
GROUP_SIZES = (32, 64, 128)


def cuda_inner_k_tiles(in_features: int) -> int | None:
    """The largest tinygemm ``inner_k_tiles`` whose tile (``tiles · 16`` columns) divides ``in_features``."""
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)


def pack(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 or uint8 ``(out, in)`` values 0..15 on ``device`` → that device's packed weight."""
    q = q.to(device=device, dtype=torch.int32).contiguous()
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # (out, in/2) uint8
    tiles = cuda_inner_k_tiles(q.shape[1])
    u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)  # (out, in/2), high nibble first
    return torch.ops.aten._convert_weight_to_int4pack(u8, tiles)


def matmul(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``x (M, in)`` times the packed int4 weight → ``(M, out)`` in ``x.dtype``."""
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit values of a packed tensor in storage order (low nibble first), uint8 on the CPU."""
    b = packed.contiguous().view(torch.uint8).reshape(-1).cpu()
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1)


@functools.lru_cache(maxsize=4)
def _source_index(out_features: int, in_features: int, device: torch.device) -> torch.Tensor:
    """For each nibble of a packed weight, the flat ``(out, in)`` index it came from (int64)."""
    n = out_features * in_features
    index = torch.arange(n, dtype=torch.int64)
    digits = 1
    while 16**digits < n:
        digits += 1
    source = torch.zeros(n, dtype=torch.int64)
    for d in range(digits):
        plane = ((index >> (4 * d)) & 0xF).to(torch.int32).reshape(out_features, in_features)
        got = _nibbles(pack(plane, device))
        if got.numel() != n:
            raise RuntimeError(f"int4 packer on {device} stores {got.numel()} nibbles for {n} values")
        source |= got.to(torch.int64) << (4 * d)
    if not torch.equal(torch.sort(source).values, index):
        raise RuntimeError(f"int4 packer on {device} is not a permutation of 4-bit values; cannot unpack")
    return source


def unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """A packed weight → uint8 ``(out, in)`` values 0..15 in canonical order (on the CPU)."""
    source = _source_index(out_features, in_features, packed.device)
    q = torch.empty(out_features * in_features, dtype=torch.uint8)
    q[source] = _nibbles(packed)
    return q.reshape(out_features, in_features)
