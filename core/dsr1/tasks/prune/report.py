"""``report.json``, ``curve.csv`` and ``curve.png`` of a pruning run, each written atomically.

The report is rewritten after every stage (and on Ctrl-C), so it always describes exactly the
stages that exist on disk. The curve has one row per point: the dense model (sparsity 0, not
written as a stage) and each stage. ``curve.png`` plots accuracy against realized sparsity with
speed relative to dense on a second axis.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from dsr1.outputs import umask

#: Columns of ``curve.csv``.
CSV_COLUMNS = (
    "point", "target_sparsity", "realized_sparsity", "params_fraction", "prunable_nonzero", "file_mb",
    "perplexity", "mean_cosine", "spearman", "accuracy_score", "speed_metric", "speed", "speed_vs_dense",
    "dense_speed_paired", "speed_vs_dense_paired",
)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _ratio(value: Any, base: Any) -> Any:
    """``value / base`` to 3 places, or ``""`` where either is missing (or the base is not positive)."""
    if value in (None, "") or base in (None, "") or not base > 0:
        return ""
    return round(float(value) / float(base), 3)


def curve_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per point of the curve: dense first, then each stage in order.

    Every ratio is computed from columns of the same file, so a reader can check it:
    ``speed_vs_dense`` = ``speed`` / the dense row's ``speed``; ``speed_vs_dense_paired`` =
    ``speed`` / ``dense_speed_paired``, the mean of the two dense measurements taken around that
    stage (``dsr1 prune`` measures dense, stage, dense: machine drift cancels, so prefer it)."""
    rows = []
    dense_speed = (report["dense"].get("speed") or {}).get("value")
    for point in [report["dense"], *report["stages"]]:
        acc, speed = point.get("accuracy", {}), point.get("speed") or {}
        pairs = speed.get("dense_paired")
        paired = sum(pairs) / len(pairs) if pairs else speed.get("value") if point is report["dense"] else None
        rows.append({
            "point": point["name"],
            "target_sparsity": point["target_sparsity"],
            "realized_sparsity": point["realized_sparsity"],
            "params_fraction": point["params_fraction"],
            "prunable_nonzero": point["prunable_nonzero"],
            "file_mb": round(point["file_bytes"] / 1e6, 3) if point.get("file_bytes") else "",
            "perplexity": acc.get("perplexity", ""),
            "mean_cosine": acc.get("mean_cosine", ""),
            "spearman": acc.get("spearman", ""),
            "accuracy_score": acc.get("score", ""),
            "speed_metric": speed.get("metric", ""),
            "speed": speed.get("value", ""),
            "speed_vs_dense": _ratio(speed.get("value"), dense_speed),
            "dense_speed_paired": "" if paired is None else paired,
            "speed_vs_dense_paired": _ratio(speed.get("value"), paired),
        })
    return rows


def write_csv(path: Path, report: dict[str, Any]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(curve_rows(report))
    write_atomic(path, buf.getvalue().encode())


def write_png(path: Path, report: dict[str, Any]) -> None:
    """Accuracy vs realized sparsity (left axis), speed vs dense (right axis)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; select before pyplot is imported
    import matplotlib.pyplot as plt

    rows = curve_rows(report)
    causal = report["model_kind"] == "causal"
    x = [r["realized_sparsity"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if causal:
        ax.plot(x, [r["perplexity"] for r in rows], "o-", color="tab:blue", label="held-out perplexity")
        ax.set_ylabel("held-out perplexity (lower is better)", color="tab:blue")
    else:
        ax.plot(x, [r["mean_cosine"] for r in rows], "o-", color="tab:blue", label="mean cosine to dense")
        ax.plot(x, [r["spearman"] for r in rows], "s--", color="tab:cyan", label="Spearman of pair similarities")
        ax.set_ylabel("embedding fidelity to dense", color="tab:blue")
    ax.set_xlabel("realized sparsity of the prunable linear layers")
    speeds = [(xi, r["speed_vs_dense_paired"]) for xi, r in zip(x, rows, strict=True)
              if r["speed_vs_dense_paired"] != ""]
    handles, labels = ax.get_legend_handles_labels()
    if speeds:
        ax2 = ax.twinx()
        ax2.plot([s[0] for s in speeds], [s[1] for s in speeds], "^:", color="tab:red", label="speed vs dense")
        ax2.axhline(1.0, color="tab:red", linewidth=0.5, alpha=0.5)
        metric = rows[0]["speed_metric"] or "speed"
        ax2.set_ylabel(f"{metric} relative to dense (×)", color="tab:red")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=8)
    ax.set_title(f"{report['model_name']}: {report['strategy']['name']} pruning, {report['settings']['device']}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def write_all(out_dir: Path, report: dict[str, Any]) -> None:
    """``report.json``, ``curve.csv`` and ``curve.png``, in that order."""
    write_atomic(out_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    write_csv(out_dir / "curve.csv", report)
    try:
        write_png(out_dir / "curve.png", report)
    except ModuleNotFoundError as err:  # the plot is optional: matplotlib comes with the `plot` extra
        if err.name is None or err.name.split(".")[0] != "matplotlib":
            raise
        _note_once("dsr1: note: curve.png needs matplotlib (pip install 'dsr1[plot]'); report.json and curve.csv "
                   "are written")


@functools.cache
def _note_once(message: str) -> None:
    """``message`` on stderr, once per process (the report is rewritten after every stage)."""
    print(message, file=sys.stderr, flush=True)
