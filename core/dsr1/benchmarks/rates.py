"""Tokens per second from timed ``generate`` calls, refusing timings that cannot be real.

One protocol for every throughput figure of ``dsr1 bench``: medians of ``t(1 token)`` (prefill)
and ``t(N tokens)``; prefill tok/s = B·P / t1, decode tok/s = B·(N−1) / (tN − t1), end-to-end
tok/s = B·N / tN. Under load the difference ``tN − t1`` can come out zero or negative (a prefill
rep slowed by another process), and a clamp turned that into ``7e9 tok/s`` once: a figure that
is not positive and finite is a measurement that failed, so it is refused with a one-line error
saying what to do, never printed as a rate.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from dsr1.errors import Dsr1Error


def check_times(what: str, times: Sequence[float]) -> None:
    """Every timing is a positive, finite number of seconds (one-line error otherwise)."""
    bad = [t for t in times if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0)]
    if not times or bad:
        shown = bad[0] if bad else "none"
        raise Dsr1Error(f"{what}: a timing of {shown} s is not a positive, finite duration; the clock or the "
                        "machine misbehaved: run again on an idle machine (more --reps helps)")


def rates(what: str, batch: int, prompt: int, new: int, t1: Sequence[float], tn: Sequence[float]) -> dict[str, float]:
    """Prefill, decode and end-to-end tok/s of medians of ``t1`` (1 new token) and ``tn`` (``new`` tokens)."""
    check_times(what, [*t1, *tn])
    m1, mn = statistics.median(t1), statistics.median(tn)
    if mn <= m1:
        raise Dsr1Error(f"{what}: generating {new} tokens took {mn:.4f} s, no longer than prefill alone "
                        f"({m1:.4f} s), so decode has no measurable time; run again on an idle machine, with more "
                        "--new-tokens or --reps")
    out = {"prefill_tok_s": batch * prompt / m1, "decode_tok_s": batch * (new - 1) / (mn - m1),
           "e2e_tok_s": batch * new / mn, "prefill_s": m1, "generate_s": mn}
    for key, value in out.items():  # positive finite inputs can still overflow
        if not (math.isfinite(value) and value > 0):
            raise Dsr1Error(f"{what}: {key} came out {value}; run again on an idle machine")
    return out
