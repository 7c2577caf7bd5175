"""Weight-only matmuls for decode-sized calls on CUDA: read the packed weight, dequantize in registers.

``y (M, N) = x (M, K) · W (N, K)ᵀ`` with ``W`` stored in one of :data:`~dsr1_sdk.kernels.FORMATS`:

* ``int8``: ``weight`` int8 ``(N, K)``, ``scales`` ``(N,)``; ``W = q · s``.
* ``int4``: ``weight`` uint8 ``(N, K / 2)``, column ``2j`` in the low nibble of byte ``j`` and ``2j + 1`` in
  the high one (:func:`dsr1_sdk.quant.pack_nibbles`), ``scales`` and ``zeros`` ``(N, K / group)``;
  ``W = (q - 8) · s + z`` (:func:`dsr1_sdk.quant.int4_groupwise`).
* ``fp8``: ``weight`` the bytes of float8_e4m3fn ``(N, K)`` (uint8 or e4m3), ``scales`` ``(N,)``; ``W = q · s``.
  Activations stay in their dtype: the point is reading one byte per weight, not fp8 tensor cores.
* ``bf16``: ``weight`` ``(N, K)`` in the activations' dtype, no scales (a GEMV to compare with cuBLAS).

At decode the cost of a layer is reading its weight, so every kernel converts weights in registers, with
integer and float adds instead of int-to-float conversions where it can (their throughput, 16 per clock
per SM on sm80/sm90, capped the first int8 GEMV: ``bench/results/quant-h200/``):

* :func:`_gemv_kernel` (one row): each program owns ``BLOCK_N`` output channels and walks its share of
  ``K``, accumulating ``w · x`` elementwise in fp32 (no tensor cores: nothing for them in a matrix-vector
  product). int4 sums each group's products first and applies its scale and zero once per group.
* :func:`_dot_kernel` (2 to :data:`MAX_ROWS` rows): ``tl.dot`` on ``(BLOCK_M, BLOCK_K) × (BLOCK_K, BLOCK_N)``
  tiles, each weight tile read once for all rows. int4 walks one group per step: its nibbles become
  ``OFFSET + q`` in the activation dtype by bits alone, and the group's scale, zero and offset are applied to
  the step's ``(BLOCK_M, BLOCK_N)`` product.
* **split-K** (``SPLIT_K`` > 1, a tuning axis): programs split ``K`` as well as ``N``, so a layer with few
  outputs (``qkv``, ``o_proj``, ``down_proj`` of a 7B model) still puts enough loads in flight.

  - The GEMV sums the splits exactly and in a fixed order, with no kernel before it. Each split stores its
    fp32 partial in a workspace and counts itself done on a counter of its column block. The last one to
    finish adds the partials in split order, stores ``y``, and sets the counter back to 0 for the next call
    or graph replay.
  - The workspace and counters are kept per device, stream and ``N``
    (:func:`dsr1_sdk.kernels.split_workspace`): calls that share them run in order, on one stream.
  - A zeroing kernel per call would cost what the split saves: a decode layer takes microseconds.
  - The dot kernel adds its partials atomically into an output that its config's pre-hook zeroes. Each
    partial is rounded to the output dtype before the add: at most ``SPLIT_K`` roundings instead of one.

Both are autotuned per shape on the first call (the decode graph's warm-up steps run before capture, so
capture replays tuned kernels). :func:`weight_only_mm` is a ``torch.library`` custom op: ``torch.compile``
keeps it as one opaque call. Setting ``TRITON_INTERPRET=1`` before import runs the kernels on CPU tensors
through Triton's interpreter with one fixed config (:func:`weight_only_mm_with` names it); that is how the CPU
tests check them.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from dsr1_sdk.kernels import FORMATS, MAX_ROWS, patch_interpreter, split_workspace

__all__ = ["DOT_CONFIGS", "GEMV_CONFIGS", "MAX_ROWS", "tuned_config", "weight_only_mm", "weight_only_mm_with"]

#: format → the kernels' constexpr ``FMT`` (the kernels compare with these numbers: 0 int8, 1 int4, 2 fp8, 3 bf16).
_CODE = {name: i for i, name in enumerate(FORMATS)}
_INT4 = _CODE["int4"]

#: splits of K the tuner tries; more than one only where N is small enough to leave the GPU short of
#: programs (below :data:`_SPLIT_MAX_N`: qkv, o_proj, down_proj of a 7B model, not gate_up or the head).
_SPLITS = (1, 2, 4)
_SPLIT_MAX_N = 16384


def _zero_output(nargs: dict[str, Any]) -> None:
    nargs["y_ptr"].zero_()


def _config(split: int, num_warps: int, num_stages: int, zero: bool, **blocks: int) -> triton.Config:
    """``zero``: the config adds split partials atomically into ``y`` (the dot kernel), so ``y`` starts at 0."""
    return triton.Config({**blocks, "SPLIT_K": split}, num_warps=num_warps, num_stages=num_stages,
                         pre_hook=_zero_output if zero and split > 1 else None)


#: (BLOCK_N, BLOCK_K, warps, stages) of the one-row kernel, each with every split: the int8 GEMV's winners on
#: the H200 (``bench/results/quant-h200/session3``), whose longer K tiles also suit int4 (half the bytes per column).
#: Few on purpose: each config is compiled once per format and benchmarked once per shape.
GEMV_CONFIGS = [
    _config(split, w, st, False, BLOCK_N=bn, BLOCK_K=bk)
    for bn, bk, w, st in [(1, 1024, 4, 1), (4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 8, 3), (16, 256, 4, 3),
                          (16, 512, 8, 3), (2, 1024, 4, 1), (2, 2048, 4, 1)]
    for split in _SPLITS
]
#: (BLOCK_N, BLOCK_K, warps, stages) of the tensor-core kernel, each with splits 1 and 2; BLOCK_M follows the
#: rows. int4 walks one group per step whatever BLOCK_K says (its duplicates are pruned).
DOT_CONFIGS = [
    _config(split, w, st, True, BLOCK_N=bn, BLOCK_K=bk)
    for bn, bk, w, st in [(32, 256, 4, 3), (32, 512, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3)]
    for split in _SPLITS[:2]
]


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Drop configs that cannot pay: splits where N gives programs enough, splits longer than K, int4 GEMV
    tiles shorter than a group, and the int4 dot kernel's copies that differ only in the BLOCK_K it ignores."""
    n, k = named_args["N"], named_args["K"]
    fmt, group, dot = kwargs["FMT"], kwargs["GROUP"], "BLOCK_M" in kwargs  # the launch passes them by name
    kept, seen = [], set()
    for c in configs:
        bk, split = c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]
        step = group if (dot and fmt == _INT4) else bk
        if split > 1 and (n >= _SPLIT_MAX_N or step * split > k):
            continue
        if fmt == _INT4 and not dot and (bk < group or bk % group):
            continue
        same = (c.kwargs["BLOCK_N"], step, split, c.num_warps, c.num_stages)
        if same not in seen:
            seen.add(same)
            kept.append(c)
    return kept or configs[:1]


@triton.jit
def _int8_to_fp32(w):
    """int8 → fp32 by bits: ``0x4B000080 + q`` is the float ``2²³ + 128 + q``, exact for every int8 ``q``;
    subtracting ``2²³ + 128`` leaves ``q``. One integer add and one float add, no conversion instruction."""
    bits = w.to(tl.int32) + 0x4B000080
    return bits.to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _nibble_to_fp32(v):
    """A nibble ``q`` (0..15, int32) → ``q - 8`` in fp32 by bits: ``0x4B000000 | q`` is ``2²³ + q``."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _e4m3_bits(w):
    """float8_e4m3fn bytes → fp32 ``w · 2⁻¹²⁰`` by bits: the sign-extended byte shifted by 20 puts e4m3's exponent
    and mantissa where fp32's low exponent bits and high mantissa bits are (subnormals included), masked to those
    and the sign. e4m3's exponent bias is 7 against fp32's 127, hence the 2⁻¹²⁰. Two integer ops; finite inputs
    only (the quantizer never writes NaN)."""
    s = w.to(tl.int8, bitcast=True).to(tl.int32)
    bits = (s << 20) & -2014314496  # 0x87F00000: sign, 4 exponent and 3 mantissa bits
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_to_fp32(w):
    """float8_e4m3fn bytes → fp32 (:func:`_e4m3_bits` times 2¹²⁰)."""
    return _e4m3_bits(w) * 1.329227995784916e36  # 2**120


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, K, FMT: tl.constexpr, GROUP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    n_mask = offs_n < N
    iters = tl.cdiv(K, BLOCK_K * SPLIT_K)  # tiles per split; the last split's may run past K (masked)
    k_first = pid_k * iters * BLOCK_K
    if FMT == 1:  # int4: byte j of a tile holds columns 2j (low nibble) and 2j + 1 (high)
        HALF: tl.constexpr = BLOCK_K // 2
        GPT: tl.constexpr = BLOCK_K // GROUP  # groups per tile
        groups = K // GROUP
        rows = w_ptr + offs_n.to(tl.int64)[:, None] * (K // 2)  # (BLOCK_N, 1) row starts
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for i in range(0, iters):
            k0 = k_first + i * BLOCK_K
            offs_j = k0 // 2 + tl.arange(0, HALF)  # (HALF,) byte columns
            offs_g = k0 // GROUP + tl.arange(0, GPT)  # (GPT,)
            if EVEN:
                b = tl.load(rows + offs_j[None, :])  # (BLOCK_N, HALF) uint8
                xe = tl.load(x_ptr + 2 * offs_j).to(tl.float32)  # (HALF,) even columns
                xo = tl.load(x_ptr + 2 * offs_j + 1).to(tl.float32)  # odd columns
                s = tl.load(s_ptr + offs_n[:, None] * groups + offs_g[None, :]).to(tl.float32)  # (BLOCK_N, GPT)
                z = tl.load(z_ptr + offs_n[:, None] * groups + offs_g[None, :]).to(tl.float32)
            else:
                j_mask = offs_j < K // 2
                g_mask = n_mask[:, None] & (offs_g < groups)[None, :]
                b = tl.load(rows + offs_j[None, :], mask=n_mask[:, None] & j_mask[None, :], other=0)
                xe = tl.load(x_ptr + 2 * offs_j, mask=j_mask, other=0.0).to(tl.float32)
                xo = tl.load(x_ptr + 2 * offs_j + 1, mask=j_mask, other=0.0).to(tl.float32)
                s = tl.load(s_ptr + offs_n[:, None] * groups + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + offs_n[:, None] * groups + offs_g[None, :], mask=g_mask, other=0.0).to(tl.float32)
            b = b.to(tl.int32)
            prod = _nibble_to_fp32(b & 0xF) * xe[None, :] + _nibble_to_fp32(b >> 4) * xo[None, :]  # (BLOCK_N, HALF)
            part = tl.sum(tl.reshape(prod, (BLOCK_N, GPT, GROUP // 2)), axis=2)  # (BLOCK_N, GPT) Σ (q - 8) x
            xs = tl.sum(tl.reshape(xe + xo, (GPT, GROUP // 2)), axis=1)  # (GPT,) Σ x per group
            acc += tl.sum(part * s + z * xs[None, :], axis=1)
        y = acc
    else:
        w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K  # (BLOCK_N, 1) row starts
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for i in range(0, iters):
            offs_k = k_first + i * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            if EVEN:
                x = tl.load(x_ptr + offs_k).to(tl.float32)  # (BLOCK_K,)
                w = tl.load(w_rows + offs_k[None, :])  # (BLOCK_N, BLOCK_K)
            else:
                k_mask = offs_k < K
                x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
            if FMT == 0:  # int8
                wf = _int8_to_fp32(w)
            elif FMT == 2:  # fp8: w · 2⁻¹²⁰ times x · 2⁶⁰ (no multiply per weight), undone below
                wf = _e4m3_bits(w)
                x = x * 1.152921504606847e18  # 2**60: products stay normal, outliers far from overflow
            else:  # bf16 / fp16
                wf = w.to(tl.float32)
            acc2 += wf * x[None, :]
        y = tl.sum(acc2, axis=1)  # (BLOCK_N,)
        if FMT == 2:
            y = y * 1.152921504606847e18  # 2**60
        if FMT != 3:  # bf16 has no scales
            y = y * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)
    else:  # the module docstring's exact split: partials in ws (SPLIT_K, N), a counter per column block
        tl.store(ws_ptr + pid_k * N + offs_n, y, mask=n_mask)
        tl.debug_barrier()  # every thread's partial is written before the counter's release says so
        done = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if done == SPLIT_K - 1:  # the last split of this block: the others' partials are visible (acquire)
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for j in tl.static_range(SPLIT_K):  # in split order: the same sum on every call
                total += tl.load(ws_ptr + j * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")


@triton.jit
def _dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, FMT: tl.constexpr, GROUP: tl.constexpr,
                MAGIC: tl.constexpr, OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    m_mask, n_mask = offs_m < M, offs_n < N
    x_rows = x_ptr + offs_m[:, None] * K  # (BLOCK_M, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FMT == 1:  # int4, one group per step
        HALF: tl.constexpr = GROUP // 2
        groups = K // GROUP
        iters = tl.cdiv(groups, SPLIT_K)
        w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * (K // 2)  # (1, BLOCK_N): packed row n is column n of Wᵀ
        for i in range(0, iters):
            g = pid_k * iters + i
            offs_j = g * HALF + tl.arange(0, HALF)  # (HALF,) byte columns
            g_ok = g < groups
            b = tl.load(w_cols + offs_j[:, None], mask=n_mask[None, :] & g_ok, other=0)  # (HALF, BLOCK_N) uint8
            xe = tl.load(x_rows + 2 * offs_j[None, :], mask=m_mask[:, None] & g_ok, other=0.0)  # (BLOCK_M, HALF)
            xo = tl.load(x_rows + 2 * offs_j[None, :] + 1, mask=m_mask[:, None] & g_ok, other=0.0)
            b = b.to(tl.int32)
            # OFFSET + q exactly, in the activation dtype, from the bits of MAGIC (= OFFSET) with q in its low mantissa
            lo = ((b & 0xF) | MAGIC).to(tl.int16).to(xe.dtype, bitcast=True)  # (HALF, BLOCK_N)
            hi = ((b >> 4) | MAGIC).to(tl.int16).to(xe.dtype, bitcast=True)
            d = tl.dot(xe, lo)
            d = tl.dot(xo, hi, d)  # (BLOCK_M, BLOCK_N) Σ x (OFFSET + q)
            xs = tl.sum(xe.to(tl.float32), axis=1) + tl.sum(xo.to(tl.float32), axis=1)  # (BLOCK_M,)
            s = tl.load(s_ptr + offs_n * groups + g, mask=n_mask & g_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
            z = tl.load(z_ptr + offs_n * groups + g, mask=n_mask & g_ok, other=0.0).to(tl.float32)
            # Σ x ((q - 8) s + z) = s Σ x (OFFSET + q) + (z - (OFFSET + 8) s) Σ x
            acc += d * s[None, :] + xs[:, None] * (z - (OFFSET + 8) * s)[None, :]
    else:
        iters = tl.cdiv(K, BLOCK_K * SPLIT_K)
        w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * K  # (1, BLOCK_N): weight row n is column n of Wᵀ
        for i in range(0, iters):
            offs_k = (pid_k * iters + i) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
            if EVEN:
                x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
                w = tl.load(w_cols + offs_k[:, None])  # (BLOCK_K, BLOCK_N)
            else:
                k_mask = offs_k < K
                x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                w = tl.load(w_cols + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
            if FMT == 2:  # fp8 (int8 converts in .to below, bf16 is already)
                w = _e4m3_to_fp32(w)
            acc = tl.dot(x, w.to(x.dtype), acc)
        if FMT != 3:  # bf16 has no scales
            acc = acc * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + offs_m[:, None] * N + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc.to(y_ptr.dtype.element_ty), mask=mask, sem="relaxed")


def _even_gemv(a: dict[str, Any]) -> bool:
    """No bounds masks needed (unmasked loads vectorize best): the tiles of every split divide K and N."""
    return a["K"] % (a["BLOCK_K"] * a["SPLIT_K"]) == 0 and a["N"] % a["BLOCK_N"] == 0


def _even_dot(a: dict[str, Any]) -> bool:
    return a["FMT"] != _INT4 and a["K"] % (a["BLOCK_K"] * a["SPLIT_K"]) == 0 and a["N"] % a["BLOCK_N"] == 0


#: Triton's interpreter (``TRITON_INTERPRET=1``) cannot benchmark configs: it runs the one it is given.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: the kernels as a caller with a config of its own runs them (the interpreter, the tests), and tuned
_gemv_fixed = triton.heuristics({"EVEN": _even_gemv})(_gemv_kernel)
_dot_fixed = triton.heuristics({"EVEN": _even_dot})(_dot_kernel)
_gemv, _dot = _gemv_fixed, _dot_fixed


def _bench(fn: Any, quantiles: Any) -> Any:
    """Shorter than the autotuner's default (25 + 100 ms per config): the configs × shapes × formats of a
    model would otherwise tune for minutes; decode kernels take microseconds, so 20 ms still averages
    thousands of calls."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


if not _INTERPRET:
    _prune_by = {"early_config_prune": _prune}
    _gemv = triton.autotune(configs=GEMV_CONFIGS, key=["N", "K", "FMT", "GROUP"], prune_configs_by=_prune_by,
                            do_bench=_bench)(_gemv_fixed)
    _dot = triton.autotune(configs=DOT_CONFIGS, key=["M", "N", "K", "FMT", "GROUP"], prune_configs_by=_prune_by,
                           do_bench=_bench)(_dot_fixed)

#: the interpreter's config when the caller gives none.
_INTERPRET_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1}
#: int4 dot kernel: the bits of OFFSET in each activation dtype, with the nibble in the low mantissa bits.
_MAGIC = {torch.bfloat16: (0x4300, 128), torch.float16: (0x6400, 1024)}


def _launch(x: torch.Tensor, fmt: str, weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
            group: int, config: dict[str, int] | None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    code = _CODE[fmt]
    fixed = dict(config or (_INTERPRET_CONFIG if _INTERPRET else {}))
    if config is None and _INTERPRET and fmt == "int4":
        fixed["BLOCK_K"] = max(fixed["BLOCK_K"], group)  # a one-row tile holds whole groups
    split = fixed.get("SPLIT_K", 1)
    if fmt == "int4" and m == 1 and "BLOCK_K" in fixed and fixed["BLOCK_K"] % group:
        raise ValueError(f"weight_only_mm int4 one-row config: BLOCK_K {fixed['BLOCK_K']} is not a multiple of the "
                         f"group {group}")
    # the dot kernel adds split partials atomically: its autotuned configs zero y in their pre-hook, a fixed one here
    y = (torch.zeros if split > 1 and m > 1 else torch.empty)((m, n), dtype=x.dtype, device=x.device)
    s = scales if scales is not None else y  # never read (bf16 has none; only int4 has zeros)
    z = zeros if zeros is not None else y
    if _INTERPRET:
        patch_interpreter()
    gemv, dot = (_gemv_fixed, _dot_fixed) if fixed else (_gemv, _dot)
    if m == 1:
        cap = max(split, *_SPLITS)  # every split the tuner tries (or a fixed config's own, in the tests)
        ws, counters = split_workspace(x.device, ("gemv", n, cap), cap * n, n)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        gemv[grid](x, weight, s, z, y, ws, counters, n, k, FMT=code, GROUP=group, **fixed)
    else:
        block_m = min(max(16, triton.next_power_of_2(m)), MAX_ROWS)  # tl.dot wants at least 16
        magic, offset = _MAGIC[x.dtype]
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m), meta["SPLIT_K"])  # noqa: E731
        dot[grid](x, weight, s, z, y, m, n, k, FMT=code, GROUP=group, MAGIC=magic, OFFSET=offset, BLOCK_M=block_m,
                  **fixed)
    return y



def _check(x: torch.Tensor, fmt: str, weight: torch.Tensor, scales: torch.Tensor | None,
           zeros: torch.Tensor | None, group: int) -> None:
    m, k = x.shape
    if m > MAX_ROWS or x.dtype not in _MAGIC:
        raise ValueError(f"weight_only_mm takes at most {MAX_ROWS} fp16/bf16 rows, got {m} {x.dtype} rows")
    if fmt not in _CODE:
        raise ValueError(f"weight_only_mm has no format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not weight.is_contiguous() or any(t is not None and not t.is_contiguous() for t in (scales, zeros)):
        raise ValueError("weight_only_mm needs a contiguous weight, scales and zeros")
    cols = k // 2 if fmt == "int4" else k
    if weight.dim() != 2 or weight.shape[1] != cols or weight.element_size() != (2 if fmt == "bf16" else 1):
        raise ValueError(f"weight_only_mm {fmt}: weight {tuple(weight.shape)} {weight.dtype} does not fit x with "
                         f"K={k}")
    if fmt == "int4" and (zeros is None or scales is None or k % group or group % 32
                          or tuple(scales.shape) != (weight.shape[0], k // group)):
        raise ValueError(f"weight_only_mm int4 needs scales and zeros (N, K / group) with group a multiple of 32 "
                         f"dividing K={k}; got group {group}")
    if fmt in ("int8", "fp8") and (scales is None or scales.numel() != weight.shape[0]):
        raise ValueError(f"weight_only_mm {fmt} needs one scale per output channel ({weight.shape[0]})")


@torch.library.custom_op("dsr1_sdk::weight_only_mm", mutates_args=())
def weight_only_mm(x: torch.Tensor, fmt: str, weight: torch.Tensor, scales: torch.Tensor | None,
                   zeros: torch.Tensor | None, group: int) -> torch.Tensor:
    """``x (M, K)`` fp16/bf16 times the ``fmt`` weight (module docstring) → ``(M, N)`` in ``x.dtype``.

    ``M`` at most :data:`MAX_ROWS`; ``group`` is int4's (0 for the others). The kernels index rows as
    ``row · K``: a strided ``x`` (a slice of a wider tensor) is copied first.
    """
    x = x.contiguous()
    _check(x, fmt, weight, scales, zeros, group)
    return _launch(x, fmt, weight, scales, zeros, group, None)


@weight_only_mm.register_fake
def _(x: torch.Tensor, fmt: str, weight: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
      group: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))


def weight_only_mm_with(x: torch.Tensor, fmt: str, weight: torch.Tensor, scales: torch.Tensor | None,
                        zeros: torch.Tensor | None, group: int, config: dict[str, int]) -> torch.Tensor:
    """:func:`weight_only_mm` with ``config`` (``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``; ``num_warps`` ...) instead
    of the tuner's choice: the tests walk the configs this way, in the interpreter or on a GPU."""
    x = x.contiguous()
    _check(x, fmt, weight, scales, zeros, group)
    return _launch(x, fmt, weight, scales, zeros, group, config)


def tuned_config(rows: int) -> str | None:
    """The config the tuner chose last for ``rows`` (1: the GEMV, more: the dot kernel), as text."""
    kernel = _gemv if rows == 1 else _dot
    best = getattr(kernel, "best_config", None)  # an autotuner has it after its first call
    return None if best is None else str(best)
