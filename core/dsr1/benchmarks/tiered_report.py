"""The report helpers of :mod:`dsr1.benchmarks.tiered`: memory against the budget, the ratios, the table."""
from __future__ import annotations

from typing import Any

GIB = float(1 << 30)


def memory_fields(device: str, figures: dict[str, Any], baseline: int | None, budget: int) -> dict[str, Any]:
    """The decode's peak against the budget: on CUDA the allocator's (weights, buffers, activations,
    KV cache); on the CPU the peak resident set less the one before the load."""
    if "peak_bytes" not in figures:
        return {}
    if device == "cuda":
        return {"budget_bytes": budget, "peak_over_budget": round(figures["peak_bytes"] / budget, 3)}
    if baseline is None:
        return {}
    out: dict[str, Any] = {"rss_before_load_bytes": baseline, "peak_above_load_baseline_bytes":
                           figures["peak_bytes"] - baseline}
    out["budget_bytes"] = budget
    out["peak_above_baseline_over_budget"] = round((figures["peak_bytes"] - baseline) / budget, 3)
    return out


def ratios(entry: dict[str, Any], single: dict[str, Any], streaming: dict[str, Any] | None = None) -> None:
    """``entry``'s ratios against ``single`` and accelerate; a row that runs layers on the CPU is
    compared with ``streaming``, the row of the same GPU budget that streams them instead, and
    with accelerate through that row."""
    rate = entry.get("tiered", {}).get("decode_tok_s")
    if rate is None:
        return
    if single.get("decode_tok_s"):
        entry["ratio_vs_single"] = round(rate / single["decode_tok_s"], 3)
        if entry["budget_fraction"] >= 1.0 and entry["cpu_fraction"] is None:
            # both ways: a placement that holds everything must decode like single, and a gap either
            # way means the two runs differ in something besides placement
            entry["within_2pct_of_single"] = abs(entry["ratio_vs_single"] - 1) <= 0.02
    accelerate = entry.get("accelerate", {}).get("decode_tok_s")
    if streaming is not None:
        streamed = streaming.get("tiered", {}).get("decode_tok_s")
        if streamed:
            entry["ratio_vs_streaming"] = round(rate / streamed, 3)
        accelerate = streaming.get("accelerate", {}).get("decode_tok_s")
    if accelerate:
        entry["ratio_vs_accelerate"] = round(rate / accelerate, 3)


def table(report: dict[str, Any]) -> str:
    """The report as a compact table (decode tok/s)."""
    def cell(value: Any, fmt: str = "{:.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    lines = [f"{report['checkpoint']['shape']} ({report['weight_bytes'] / GIB:.2f} GiB {report['dtype']}) on "
             f"{report['hardware']}; decode tok/s, prompt {report['settings']['prompt_len']}, "
             f"{report['settings']['new_tokens']} new",
             f"{'row':<16}{'batch':>6}{'tiered':>10}{'floor':>10}{'of floor':>10}{'single':>10}{'accel':>10}"
             f"{'vs single':>11}{'vs accel':>10}  streamed"]
    for e in report["results"]:
        t, a = e.get("tiered", {}), e.get("accelerate", {})
        s = report["single"].get(str(e["batch_size"]), {})
        plan = t.get("plan") or {}
        tiers = plan.get("tiers", {})
        streamed = sum(tiers.get(k, {}).get("bytes", 0) for k in ("cpu", "disk"))
        on_disk = tiers.get("disk", {}).get("bytes", 0)
        on_cpu = tiers.get("cpu-compute", {}).get("bytes", 0) if isinstance(t.get("device"), list) else 0
        note = t.get("error") or (f"{streamed / GIB:.2f} GiB (disk {on_disk / GIB:.2f})" if plan else "")
        if on_cpu and not t.get("error"):
            note += f", run on the CPU {on_cpu / GIB:.2f} GiB, {cell(e.get('ratio_vs_streaming'), '{:.2f}x')} streaming"
        lines.append(f"{e['row']:<16}{e['batch_size']:>6}{cell(t.get('decode_tok_s')):>10}"
                     f"{cell(t.get('floor_tok_s')):>10}{cell(t.get('fraction_of_floor'), '{:.0%}'):>10}"
                     f"{cell(s.get('decode_tok_s')):>10}{cell(a.get('decode_tok_s')):>10}"
                     f"{cell(e.get('ratio_vs_single'), '{:.3f}x'):>11}"
                     f"{cell(e.get('ratio_vs_accelerate'), '{:.2f}x'):>10}"
                     f"  {note}")
    if report.get("accelerate_skipped"):
        lines.append(report["accelerate_skipped"])
    return "\n".join(lines)
