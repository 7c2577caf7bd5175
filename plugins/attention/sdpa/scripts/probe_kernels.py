"""Which SDPA kernels take which inputs on this GPU, and what native vs repeated GQA heads cost.

Run on a CUDA machine: ``python plugins/attention/sdpa/scripts/probe_kernels.py``. It prints,
per shape, mask and GQA mode, each kernel (``auto`` = torch's choice) with its mean time
over 10 calls and its peak extra memory, or why it refused; then what each kernel returns
for a query row that sees no key. The sdpa plugin's GQA rule and README figures come from it.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS: dict[str, SDPBackend | None] = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def timed(fn: Callable[[], torch.Tensor], iters: int = 10) -> tuple[float, float]:
    """Mean milliseconds per call and peak extra MiB."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, (torch.cuda.max_memory_allocated() - base) / 2**20


def sdpa(backend: SDPBackend | None, *args: torch.Tensor | None, **kwargs: object) -> torch.Tensor:
    if backend is None:
        return F.scaled_dot_product_attention(*args, **kwargs)  # type: ignore[arg-type]  # probe script
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(*args, **kwargs)  # type: ignore[arg-type]  # probe script


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    for b, h, hkv, t, s, d in [(1, 32, 8, 4096, 4096, 128), (8, 32, 8, 1, 4096, 128)]:
        print(f"\n== B={b} H={h} Hkv={hkv} T={t} S={s} D={d} bf16", flush=True)
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g)  # (B, H, T, D)
        k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=g)  # (B, Hkv, S, D)
        v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
        causal = torch.ones(t, s, dtype=torch.bool, device="cuda").tril(s - t)[None, None].expand(b, 1, t, s)
        for use_mask in (False, True):
            for native in (True, False):
                kk = k if native else k.repeat_interleave(h // hkv, 1)  # (B, H, S, D) when repeated
                vv = v if native else v.repeat_interleave(h // hkv, 1)
                mask = causal if use_mask else None
                for name, backend in BACKENDS.items():
                    tag = f"mask={use_mask!s:5} gqa={'native' if native else 'repeat'} {name:9}"
                    try:
                        call = functools.partial(sdpa, backend, q, kk, vv, attn_mask=mask,
                                                 is_causal=not use_mask and t == s, enable_gqa=native)
                        ms, mib = timed(call)
                        print(f"{tag} ok   {ms:8.3f} ms  peak +{mib:8.1f} MiB", flush=True)
                    except RuntimeError as err:
                        print(f"{tag} FAIL {str(err).strip().splitlines()[0][:90]}", flush=True)

    print("\n== a query row that sees no key (B=1, H=2, T=2, S=3, D=64, bf16)")
    q = torch.randn(1, 2, 2, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 2, 3, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.tensor([[True, True, False], [False, False, False]], device="cuda")[None, None]
    for name, backend in BACKENDS.items():
        try:
            out = sdpa(backend, q, kv, kv, attn_mask=mask)
            print(f"{name:9} row 1: {[round(x, 4) for x in out[0, 0, 1, :3].float().tolist()]}")
        except RuntimeError as err:
            print(f"{name:9} FAIL {str(err).strip().splitlines()[0][:90]}")


if __name__ == "__main__":
    main()
