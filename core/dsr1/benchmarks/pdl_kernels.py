"""The two Triton kernels of :mod:`dsr1.benchmarks.pdl_probe` (imported only there: they need triton)."""
import triton
import triton.language as tl

__all__ = ["gemv", "norm"]


# y = W x for one bf16 row; GDC: wait for the previous kernel (PDL) first; PREFETCH: load the first weight
# tile before that wait (weights do not depend on the previous kernel).
@triton.jit
def gemv(w, x, y, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GDC: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = w + offs_n.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    if PREFETCH:
        w0 = tl.load(rows + offs_k[None, :])
    if GDC:
        tl.extra.cuda.gdc_wait()
    if PREFETCH:
        acc += w0.to(tl.float32) * tl.load(x + offs_k).to(tl.float32)[None, :]
        start = BLOCK_K
    else:
        start = 0
    for k in range(start, K, BLOCK_K):
        ok = k + offs_k
        acc += tl.load(rows + ok[None, :]).to(tl.float32) * tl.load(x + ok).to(tl.float32)[None, :]
    tl.store(y + offs_n, tl.sum(acc, 1).to(tl.bfloat16))


# An RMSNorm-like elementwise kernel of one program; TRIGGER: let a PDL-launched dependent start at once.
@triton.jit
def norm(x, g, y, N, BLOCK: tl.constexpr, TRIGGER: tl.constexpr):
    if TRIGGER:
        tl.extra.cuda.gdc_launch_dependents()
    o = tl.arange(0, BLOCK)
    m = o < N
    v = tl.load(x + o, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(v * v, 0) / N + 1e-6)
    tl.store(y + o, (v * r * tl.load(g + o, mask=m, other=0.0).to(tl.float32)).to(tl.bfloat16), mask=m)
