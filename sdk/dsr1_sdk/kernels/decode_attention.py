"""Decode attention on CUDA: one query per sequence against its KV cache, split over the keys.

``out (B, Hkv, G, D) = softmax(q kᵀ · scale, masked) v`` for ``q (B, Hkv, G, D)``, ``k, v (B, Hkv, S, D)`` and
an optional boolean ``mask`` broadcastable to ``(B, 1, 1, S)`` (``True``: may attend). ``G`` is the query heads
that share a key/value head (grouped-query attention packs them as rows).

At decode a head has one query row (``G`` with GQA) and a cache of ``S`` keys: torch's SDPA kernels give each
head one thread block, so a batch-1 step runs ``Hkv`` blocks on a GPU with a hundred multiprocessors and waits
on one block walking the whole cache. Here the keys are split into chunks, as in flash-decoding, to reach about
two programs per multiprocessor:

* program ``(b·Hkv + h, c)`` runs online softmax over chunk ``c`` of head ``h`` (``tl.dot`` on
  ``(BLOCK_G, D) × (D, BLOCK_S)`` tiles) and stores its running max, sum and unnormalized output in fp32;
* the last chunk of a head to finish (a counter per head, released after the partials are written, as in
  :mod:`dsr1_sdk.kernels.weight_only`'s exact split) merges the chunks' partials in chunk order and stores
  the head's output, then resets the counter. No second kernel, no zeroing kernel: a decode layer's attention
  takes microseconds, and every launch in a captured step costs about as much.

Masked keys are skipped in the softmax (``-inf``), so a static cache with a validity mask (the captured decode
step's) gives the same result as its valid prefix alone. :func:`decode_attention` is a ``torch.library``
custom op: ``torch.compile`` keeps it as one opaque call. fp16 and bf16 only (``tl.dot``); the plugin that calls
it checks that first.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from dsr1_sdk.kernels import patch_interpreter, split_workspace

__all__ = ["decode_attention", "split_plan"]

#: keys per inner step of a program.
BLOCK_S = 64


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, ws_ptr, cnt_ptr, scale, S, CHUNK, NSPLIT,
                   sq_b, sq_h, sq_g, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_s, so_b, so_h, so_g,
                   HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    offs_g = tl.arange(0, BLOCK_G)  # (BLOCK_G,) query rows (the heads of this key/value head)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    g_ok, d_ok = offs_g < G, offs_d < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_g[:, None] * sq_g + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    start = c * CHUNK
    for s0 in range(start, tl.minimum(start + CHUNK, S), BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)  # (BLOCK_S,)
        s_ok = offs_s < tl.minimum(start + CHUNK, S)
        k = tl.load(k_ptr + b * sk_b + h * sk_h + offs_s[:, None] * sk_s + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
        scores = tl.dot(q, tl.trans(k)) * scale  # (BLOCK_G, BLOCK_S) fp32
        keep = s_ok
        if HAS_MASK:
            keep = keep & (tl.load(m_ptr + b * sm_b + offs_s * sm_s, mask=s_ok, other=0) != 0)
        scores = tl.where(keep[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing kept yet: exp(-inf) = 0
        p = tl.exp(scores - m_use[:, None])  # (BLOCK_G, BLOCK_S)
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + offs_s[:, None] * sv_s + offs_d[None, :],
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # partials of this chunk: ws (B·Hkv, NSPLIT, BLOCK_G, BLOCK_D + 2) fp32 (output, then max and sum)
    W: tl.constexpr = BLOCK_D + 2
    base = ws_ptr + (bh * NSPLIT + c) * BLOCK_G * W
    tl.store(base + offs_g[:, None] * W + offs_d[None, :], acc)
    tl.store(base + offs_g * W + BLOCK_D, m_i)
    tl.store(base + offs_g * W + BLOCK_D + 1, l_i)
    tl.debug_barrier()  # every thread's partial is written before the counter's release says so
    done = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
    if done == NSPLIT - 1:  # the last chunk of this head: merge every chunk's partials, in chunk order
        m_all = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        for j in range(0, NSPLIT):
            part = ws_ptr + (bh * NSPLIT + j) * BLOCK_G * W
            m_all = tl.maximum(m_all, tl.load(part + offs_g * W + BLOCK_D, cache_modifier=".cg"))
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        total = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        denom = tl.zeros((BLOCK_G,), tl.float32)
        for j in range(0, NSPLIT):
            part = ws_ptr + (bh * NSPLIT + j) * BLOCK_G * W
            w = tl.exp(tl.load(part + offs_g * W + BLOCK_D, cache_modifier=".cg") - m_all)  # (BLOCK_G,)
            denom += w * tl.load(part + offs_g * W + BLOCK_D + 1, cache_modifier=".cg")
            total += w[:, None] * tl.load(part + offs_g[:, None] * W + offs_d[None, :], cache_modifier=".cg")
        out = total / denom[:, None]
        tl.store(o_ptr + b * so_b + h * so_h + offs_g[:, None] * so_g + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        tl.atomic_xchg(cnt_ptr + bh, 0, sem="relaxed")


def split_plan(heads: int, keys: int, programs: int) -> tuple[int, int]:
    """``(chunk, splits)``: keys per program (a multiple of :data:`BLOCK_S`) and chunks per head, so that
    ``heads × splits`` comes near ``programs`` without chunks shorter than one step."""
    want = max(1, -(-programs // max(heads, 1)))
    chunk = max(BLOCK_S, -(-(-(-keys // want)) // BLOCK_S) * BLOCK_S)
    return chunk, max(1, -(-keys // chunk))


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter (tests): a few chunks, so the merge runs


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"decode_attention takes q (B, Hkv, G, D) and k, v (B, Hkv, S, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode_attention runs fp16/bf16 q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] > 256:
        raise ValueError(f"decode_attention takes head dims up to 256, got {q.shape[3]}")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1
                             or mask.shape[0] not in (1, q.shape[0]) or mask.shape[3] != k.shape[2]):
        raise ValueError(f"decode_attention takes a boolean mask (B or 1, 1, 1, S={k.shape[2]}); got "
                         f"{tuple(mask.shape)} {mask.dtype}")


@torch.library.custom_op("dsr1_sdk::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Attention of ``q (B, Hkv, G, D)`` over ``k, v (B, Hkv, S, D)`` (any strides with a contiguous last dim),
    ``mask`` a boolean ``(B or 1, 1, 1, S)`` or None → ``(B, Hkv, G, D)`` in ``q.dtype`` (module docstring)."""
    _check(q, k, v, mask)
    if q.stride(3) != 1:
        q = q.contiguous()
    if k.stride(3) != 1 or v.stride(3) != 1:
        k, v = k.contiguous(), v.contiguous()
    b, hkv, g, d = q.shape
    s = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_g, block_d = max(16, triton.next_power_of_2(g)), max(16, triton.next_power_of_2(d))
    chunk, splits = split_plan(b * hkv, s, _programs(q.device))
    ws, counters = split_workspace(q.device, ("decode_attention", b * hkv, splits, block_g, block_d),
                                   b * hkv * splits * block_g * (block_d + 2), b * hkv)
    m = mask if mask is not None else out  # never read without HAS_MASK
    sm_b = (mask.stride(0) if mask.shape[0] > 1 else 0) if mask is not None else 0
    sm_s = mask.stride(3) if mask is not None else 0
    if mask is not None:
        m = mask.view(torch.uint8)
    if q.device.type != "cuda":  # Triton's interpreter (TRITON_INTERPRET=1): the tests
        patch_interpreter()
    _decode_kernel[(b * hkv, splits)](
        q, k, v, m, out, ws, counters, scale, s, chunk, splits,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sm_b, sm_s, out.stride(0), out.stride(1), out.stride(2),
        HKV=hkv, G=g, D=d, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_S=BLOCK_S, HAS_MASK=mask is not None,
        num_warps=4, num_stages=2,
    )
    return out


@decode_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)
