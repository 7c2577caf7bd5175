"""Request traces of the serving benchmarks: a fixed list of (arrival s, prompt tokens, output tokens),
drawn from a seed or read from JSONL, the prompts for it, percentiles and the plot of a replay.

``dsr1 bench serve`` (:mod:`.serve`), its HTTP client (:mod:`.serve_http`) and
:mod:`.serve_overhead` all replay these, so two engines or schedulers get exactly the same work.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsr1.errors import Dsr1Error
from dsr1.output_files import write_atomic


@dataclass(frozen=True)
class TraceItem:
    arrival: float
    prompt_len: int
    output_len: int


def parse_lengths(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``uniform:64-1024,32-512`` → ((64, 1024), (32, 512)); one-line error otherwise."""
    try:
        kind, ranges = text.split(":", 1)
        (p_lo, p_hi), (o_lo, o_hi) = (tuple(int(x) for x in r.split("-")) for r in ranges.split(","))
    except ValueError:
        raise Dsr1Error(f"--lengths must look like uniform:64-1024,32-512, got {text!r}") from None
    if kind != "uniform" or not (1 <= p_lo <= p_hi and 1 <= o_lo <= o_hi):
        raise Dsr1Error(f"--lengths must be uniform:PMIN-PMAX,OMIN-OMAX with 1 <= MIN <= MAX, got {text!r}")
    return (p_lo, p_hi), (o_lo, o_hi)


def draw_trace(n: int, rate: float, lengths: str, seed: int) -> list[TraceItem]:
    (p_lo, p_hi), (o_lo, o_hi) = parse_lengths(lengths)
    if n < 1:
        raise Dsr1Error(f"--requests must be >= 1, got {n}")
    if not rate > 0:
        raise Dsr1Error(f"--rate must be > 0 requests/s (inf: all at once), got {rate}")
    rng = random.Random(seed)
    t, items = 0.0, []
    for _ in range(n):
        items.append(TraceItem(round(t, 6), rng.randint(p_lo, p_hi), rng.randint(o_lo, o_hi)))
        if rate != float("inf"):
            t += rng.expovariate(rate)
    return items


def read_trace(path: str) -> list[TraceItem]:
    items = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise Dsr1Error(f"--trace {path!r} cannot be read: {err}") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            item = TraceItem(float(d["arrival"]), int(d["prompt_len"]), int(d["output_len"]))
        except (ValueError, KeyError, TypeError):
            raise Dsr1Error(f"--trace {path}:{no}: each line must be a JSON object with arrival, prompt_len, "
                            f"output_len") from None
        unknown = sorted(set(d) - {"arrival", "prompt_len", "output_len"})
        if unknown:  # a key the replay would ignore (a typo of one it reads, or another tool's field)
            raise Dsr1Error(f"--trace {path}:{no}: unknown key {unknown[0]!r}; a line holds arrival, prompt_len "
                            f"and output_len only")
        if item.arrival < 0 or item.prompt_len < 1 or item.output_len < 1:
            raise Dsr1Error(f"--trace {path}:{no}: arrival must be >= 0 and lengths >= 1")
        items.append(item)
    if not items:
        raise Dsr1Error(f"--trace {path!r} holds no requests")
    return sorted(items, key=lambda i: i.arrival)


def prompts_for(trace: list[TraceItem], vocab: int, shared_prefix: int, seed: int) -> list[list[int]]:
    """Random token ids per request (ids from 100 up: clear of the usual special tokens)."""
    rng = random.Random(seed + 1)
    hi = max(vocab - 1, 101)
    prefix = [rng.randrange(100, hi) for _ in range(shared_prefix)]
    return [(prefix + [rng.randrange(100, hi) for _ in range(max(0, it.prompt_len - shared_prefix))])[: it.prompt_len]
            for it in trace]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
    """Throughput, TTFT and TPOT (p50, p99) per replay of ``results`` as one PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dsr1: note: --plot needs matplotlib (pip install 'dsr1[plot]'); no plot written")
        return
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].bar(names, [results[n]["output_tok_s"] for n in names])
    axes[0].set_title("output tok/s")
    for ax, key in ((axes[1], "ttft"), (axes[2], "tpot")):
        for q, shift in (("p50", -0.2), ("p99", 0.2)):
            values = [(results[n].get(f"{key}_{q}_s") or 0) * 1000 for n in names]
            ax.bar([i + shift for i in range(len(names))], values, width=0.4, label=q)
        ax.set_xticks(range(len(names)), names)
        ax.set_title(f"{key.upper()} (ms)")
        ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, metadata={"Software": "dsr1 bench"}),
                 "--plot")
    plt.close(fig)

