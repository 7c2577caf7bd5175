"""The SDK's CPU GEMV (:mod:`dsr1_sdk.kernels.cpu`) against the dequantized weight's product, and its ``w8a8``
format against the w8a8 plugin's torch formulation, bit for bit.

Every format, 1 to 9 rows (9: a second pass over the weight), an odd number of output channels (so each
path's row blocks leave a remainder) and a K that is no multiple of any vector width (masked and scalar
tails), on every dispatch path this CPU runs (forced, so an AVX-512 machine also checks AVX2 and scalar).
Bad input is refused in one line. The kernel is built once per torch build and cached, so only a fresh
cache pays the compile; where it cannot be built (no compiler) the tests skip with the reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsr1_sdk import Dsr1Error
from dsr1_sdk.kernels import cpu

REASON = cpu.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CPU GEMV kernel unavailable: {REASON}")

N, K = 37, 83  # odd N; K = 5·16 + 3 = 10·8 + 3
#: the formats and x's dtype each is called with in the cases (bf16 x: the wrapper converts it to fp32).
CASES = {"int8": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float32, "fp32": torch.float32}


def _operands(fmt: str, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                        torch.Tensor]:
    """x, weight, scales and the fp64 reference ``x · (weight · scales)ᵀ``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g).to(CASES[fmt])
    if fmt == "int8":
        w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        s = torch.rand(N, generator=g) * 0.01 + 1e-3  # (N,)
        dense = w.double() * s.double()[:, None]
    else:
        w = torch.randn(N, K, generator=g).to(cpu.FORMATS[fmt])
        s = None
        dense = w.double()
    return x, w, s, F.linear(x.double(), dense)


@pytest.mark.parametrize("path", cpu.paths() if REASON is None else ())
@pytest.mark.parametrize("fmt", list(CASES))
def test_matches_the_dequantized_product(fmt: str, path: str) -> None:
    for rows in range(1, cpu.MAX_ROWS + 2):
        x, w, s, want = _operands(fmt, rows, seed=rows)
        got = cpu.gemv(x, fmt, w, s, path=path)
        assert got.shape == (rows, N) and got.dtype == x.dtype
        # fp32 accumulation over K terms (bf16 output: its own rounding)
        tol = 2 ** -7 if x.dtype == torch.bfloat16 else 1e-5
        err = (got.double() - want).abs() / want.abs().amax()
        worst = int(err.argmax())
        assert err.max() < tol, (f"{fmt} {path} rows={rows}: worst at {divmod(worst, N)}, got "
                                 f"{got.flatten()[worst].item()}, expected {want.flatten()[worst].item()}")


def _w8a8_torch(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The w8a8 plugin's torch formulation (``int8_per_token``, an exact integer product, two rescales)."""
    xf = x.float()
    sx = (xf.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(1e-12)  # (M, 1)
    q = torch.clamp(torch.round(xf / sx), -127, 127)  # (M, K), integers
    acc = q.to(torch.int64) @ w.to(torch.int64).t()  # (M, N), exact
    return (acc.float() * sx * scales).to(x.dtype)


@pytest.mark.parametrize("path", cpu.paths("w8a8") if REASON is None else ())
@pytest.mark.parametrize("k", [K, 200])  # 200 = 3·64 + 8: a masked VNNI tail; 83: K < 2 vectors
def test_w8a8_is_the_torch_formulation_bit_for_bit(path: str, k: int) -> None:
    """Quantizing x per row (round half to even), exact int32 sums and the same two fp32 products in the same
    order: the kernel's result is the formulation's exactly, for fp32 and bf16 x, an all-zero row and ties."""
    g = torch.Generator().manual_seed(k)
    w = torch.randint(-127, 128, (N, k), generator=g, dtype=torch.int8)
    scales = torch.rand(N, generator=g) * 0.01 + 1e-3  # (N,) fp32, as the plugin keeps them
    for rows in range(1, cpu.MAX_ROWS + 2):
        x = torch.randn(rows, k, generator=g) * 3
        x[0, :4] = torch.tensor([127.0, 0.5, -1.5, 2.5])  # row max 127 → scale 1: three ties to round
        x[0, 4:] = x[0, 4:].clamp(-100, 100)
        if rows > 2:
            x[1] = 0.0  # the scale floor
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            got = cpu.gemv(xd, "w8a8", w, scales, path=path)
            assert got.dtype == dtype and torch.equal(got, _w8a8_torch(xd, w, scales)), (path, rows, dtype)


def test_paths_agree_exactly_on_exact_inputs() -> None:
    """Small integers make every product and partial sum exact in fp32: every path gives the same answer."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (5, K), generator=g).float()
    w = torch.randint(-4, 5, (N, K), generator=g).to(torch.float16)
    want = F.linear(x, w.float())
    for path in cpu.paths():
        assert torch.equal(cpu.gemv(x, "fp16", w, path=path), want), path


def test_stream_read_reads_every_byte() -> None:
    """Every path returns the sum of the buffer's 64-bit words plus its last bytes: it read every byte."""
    n = 3 * 65_536 + 1_003  # past the 64 KiB thread chunks, and no multiple of any vector
    buf = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    words = n // 8 * 8
    want = int(buf[:words].view(torch.int64).sum()) + int(buf[words:].sum())  # int64 sums wrap as the kernel's
    want = (want + 2**63) % 2**64 - 2**63
    assert {cpu.stream_read(buf, path) for path in cpu.paths()} == {want}


@pytest.mark.parametrize(("call", "message"), [
    (lambda: cpu.gemv(torch.randn(2, 8), "int4", torch.zeros(4, 8, dtype=torch.uint8)), "fmt 'int4' is unknown"),
    (lambda: cpu.gemv(torch.randn(2, 8), "int8", torch.zeros(4, 8), torch.ones(4)), "takes a 2-D torch.int8"),
    (lambda: cpu.gemv(torch.randn(2, 9), "fp32", torch.zeros(4, 8)), "x must be a 2-D float tensor (M, 8)"),
    (lambda: cpu.gemv(torch.ones(2, 8, dtype=torch.int32), "fp32", torch.zeros(4, 8)), "2-D float tensor"),
    (lambda: cpu.gemv(torch.randn(2, 8), "int8", torch.zeros(4, 8, dtype=torch.int8)), "scales of shape (4,)"),
    (lambda: cpu.gemv(torch.randn(2, 8), "int8", torch.zeros(4, 8, dtype=torch.int8), torch.ones(3)),
     "scales of shape (4,)"),
    (lambda: cpu.gemv(torch.randn(2, 8), "bf16", torch.zeros(4, 8, dtype=torch.bfloat16), torch.ones(4)),
     "takes no scales"),
    (lambda: cpu.gemv(torch.randn(2, 8), "fp32", torch.zeros(4, 8), path="neon"), "not a CPU GEMV path"),
    (lambda: cpu.gemv(torch.randn(2, 8), "w8a8", torch.zeros(4, 8, dtype=torch.int8)), "scales of shape (4,)"),
    (lambda: cpu.gemv(torch.randn(1, 65_537), "w8a8", torch.zeros(1, 65_537, dtype=torch.int8), torch.ones(1)),
     "takes K up to 65536"),
])
def test_bad_input_is_one_line(call: object, message: str) -> None:
    with pytest.raises(Dsr1Error) as err:
        call()  # type: ignore[operator]
    assert message in str(err.value) and "\n" not in str(err.value)


def test_is_one_opaque_op_for_torch_compile() -> None:
    """The C++ op has a meta kernel: shapes propagate without running it (what torch.compile's tracing needs)."""
    x = torch.empty(3, K, device="meta")
    w = torch.empty(N, K, dtype=torch.int8, device="meta")
    y = torch.ops.dsr1_sdk.cpu_gemv(x, "int8", w, torch.empty(N, device="meta"), "auto")
    assert y.shape == (3, N) and y.device.type == "meta" and y.dtype == torch.float32
