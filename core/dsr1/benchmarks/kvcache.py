"""``dsr1 bench kvcache``: KV bytes held, decode tokens/s, held-out perplexity and top-1 agreement
with the full cache, per KV-cache plugin and context length.

Protocol for one context ``C`` (the same for every cache): the held-out split of dsr1-tiny's
corpus (:func:`dsr1.benchmarks.quant_accuracy.heldout_ids`) is cut into ``samples`` non-overlapping
windows of ``C`` tokens. Each window is *teacher-forced through the cache*: the first
``prefill_frac · C`` tokens are prefilled in one forward, then the remaining tokens are fed one
at a time with :meth:`forward_step` (the engine's decode step), so every scored token is
predicted from what the cache kept. Scored: the predictions of tokens ``P..C−1`` (decoded
half); perplexity is ``exp(mean NLL)`` over them; top-1 agreement is the share of those
positions whose argmax equals the ``contiguous`` cache's argmax on the same window.

``other_processes_cpu_pct``: how busy other processes kept the CPUs meanwhile (shared machines).
KV bytes: ``cache.nbytes() + cache.state_nbytes()`` after the last token of a window (what the
cache holds at full context), in the model's dtype (fp32 for dsr1-tiny). Decode tok/s: scored
tokens / wall time of the one-token steps, batch 1 (CUDA synchronized).

Budgets: each compressing cache gets options that keep about ``--keep`` (default 1/3) of the
context (:func:`default_options`); ``--cache-option NAME.KEY=VALUE`` overrides them.
Contexts past the trained context (the training card's ``seq_len``, dsr1-tiny: 256; else the
config's ``max_position_embeddings``) are run anyway (RoPE tables grow; nothing else limits the
decode step) and the report flags them: the model is then beyond its training length for every
cache alike, and the target is not judged there.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from typing import Any

from dsr1.benchmarks import common
from dsr1.errors import Dsr1Error
from dsr1.output_files import write_atomic

#: the caches issue 4 builds: skipped with a reason while not installed (others are typos).
EXPECTED = ("contiguous", "paged", "int8", "streaming", "heavy-hitter")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("kvcache", help="KV bytes, decode tok/s, held-out perplexity and top-1 agreement per cache",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dsr1-tiny", help="model name or directory (held-out text is dsr1-tiny's)")
    p.add_argument("--context", default="512,1024,2048", help="comma-separated context lengths")
    p.add_argument("--caches", default="contiguous,paged,int8,streaming,heavy-hitter",
                   help="comma-separated kvcache plugins (contiguous, the reference, is always run first)")
    p.add_argument("--cache-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="an option of one cache, e.g. streaming.window=160 (repeatable; beats --keep)")
    p.add_argument("--keep", default="0.32",
                   help="comma-separated shares of the context compressing caches keep (one run per share)")
    p.add_argument("--attention", help="attention plugin (default: the checkpoint's)")
    p.add_argument("--prefill-frac", type=float, default=0.5, help="share of each window prefilled at once")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per context (≥ one window)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", help="compute dtype (default: the checkpoint's; fp32 for dsr1-tiny)")
    p.add_argument("--threads", type=int, help="torch threads (default 1 on CPU: see the README)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--output", help="also write the JSON report to this file")
    p.add_argument("--plot", help="write KV memory vs perplexity per cache to this PNG")
    p.add_argument("--from-json", metavar="F.json", help="measure nothing: plot/summarize a saved report")
    p.set_defaults(func=run)


def default_options(name: str, fields: set[str], context: int, keep: float) -> dict[str, Any]:
    """Options that make ``name`` keep about ``keep · context`` tokens (only fields it has)."""
    budget = max(8, round(keep * context))
    sinks = 4
    wanted: dict[str, Any] = {}
    if name == "streaming":
        wanted = {"sinks": sinks, "sink_tokens": sinks, "window": budget - sinks, "recent": budget - sinks}
    elif name == "heavy-hitter":
        wanted = {"budget": round(keep, 4), "recent": max(1, budget // 2), "window": max(1, budget // 2),
                  "sinks": sinks}
    return {k: v for k, v in wanted.items() if k in fields}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    contexts = common.int_list(args.context, "--context", minimum=8)
    caches = common.name_list(args.caches, "--caches")
    if "contiguous" in caches:
        caches.remove("contiguous")
    caches.insert(0, "contiguous")  # the reference every other cache is compared with
    try:
        keeps = sorted({float(k) for k in str(args.keep).split(",") if k.strip()})
    except ValueError:
        raise Dsr1Error(f"--keep must be comma-separated fractions, got {args.keep!r}") from None
    if not keeps or not all(0 < k <= 1 for k in keeps):
        raise Dsr1Error(f"--keep must be fractions in (0, 1], got {args.keep!r}")
    if not 0 < args.prefill_frac < 1:
        raise Dsr1Error(f"--prefill-frac must be in (0, 1), got {args.prefill_frac}")
    if args.eval_tokens < max(contexts):
        raise Dsr1Error(f"--eval-tokens ({args.eval_tokens}) must cover one window of the longest context "
                        f"({max(contexts)})")
    threads = args.threads or (1 if args.device == "cpu" else None)
    return {"model": args.model, "contexts": contexts, "caches": caches, "keep": keeps,
            "attention": args.attention, "prefill_frac": args.prefill_frac, "eval_tokens": args.eval_tokens,
            "device": args.device, "dtype": args.dtype, "threads": threads,
            "options": common.parse_plugin_options(args.cache_option, caches, "--cache-option"),
            "not_installed": common.check_names("kvcache", caches, EXPECTED)}


def command(args: argparse.Namespace) -> str:
    parts = ["dsr1", "bench", "kvcache", "--model", args.model, "--context", args.context, "--caches", args.caches]
    for flag in ("attention", "device", "dtype", "threads", "output", "plot"):
        if getattr(args, flag) is not None and not (flag == "device" and args.device == "cpu"):
            parts += ["--" + flag, str(getattr(args, flag))]
    for flag, default in (("keep", "0.32"), ("prefill_frac", 0.5), ("eval_tokens", 4096)):
        if getattr(args, flag) != default:
            parts += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    for item in args.cache_option:
        parts += ["--cache-option", item]
    return shlex.join(parts + (["--json"] if args.json else []))


def run(args: argparse.Namespace) -> int:
    import torch

    if args.from_json:
        saved = common.read_report(args.from_json, "kvcache")

        def show() -> None:
            if args.plot:
                plot(saved, args.plot)
            print("\n".join(target(saved["results"])["summary"]))

        common.from_report(args.from_json, show)
        return 0
    s = settings(args)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    model = load_model(s)
    report: dict[str, Any] = {"command": command(args), **common.environment(s["device"], s["threads"])}
    report["settings"] = {k: v for k, v in s.items() if k != "not_installed"}
    trained = trained_context(s["model"], model)
    report["model"] = {"name": s["model"], "dtype": str(model.dtype).removeprefix("torch."),
                       "trained_context": trained, "attention": type(model.pipeline.attention).__name__}
    report["results"] = measure(model, s, log=not args.json)
    report["targets"] = target(report["results"])
    text = common.write_report(report, args.output)
    if args.plot:
        plot(report, args.plot)
    if args.json:
        print(text)
    else:
        for line in report["targets"]["summary"]:
            print(line)
    return 0


def load_model(s: dict[str, Any]) -> Any:
    from dsr1.auto import AutoModel, require_causal_lm

    require_causal_lm(s["model"])  # it measures perplexity under each cache: a causal LM
    overrides: dict[str, Any] = {"device": s["device"]}
    if s["attention"]:
        overrides["attention"] = s["attention"]
    model = AutoModel.from_pretrained(s["model"], dtype=s["dtype"], **overrides)
    model.eval()
    return model


def trained_context(name: str, model: Any) -> int:
    """The window length the checkpoint was trained on: its training card's ``seq_len`` (dsr1-tiny:
    256, while its config's ``max_position_embeddings`` says 512), else the config's context."""
    from dsr1.models.loading import resolve_model_dir

    for card in sorted(resolve_model_dir(name).glob("dsr1_tiny*.json")):
        seq_len = json.loads(card.read_text(encoding="utf-8")).get("seq_len")
        if seq_len:
            return int(seq_len)
    return int(getattr(model, "context_length", 0))


def make_cache(name: str, s: dict[str, Any], context: int, keep: float) -> tuple[Any, dict[str, Any]]:
    from dsr1.config import PluginChoice
    from dsr1.registry import PluginRegistry

    registry = PluginRegistry.from_env()
    fields = set(registry.load("kvcache", name).options.model_fields)
    options = {**default_options(name, fields, context, keep), **s["options"].get(name, {})}
    return registry.make("kvcache", PluginChoice(name=name, options=options)), options


def measure(model: Any, s: dict[str, Any], log: bool = True) -> list[dict[str, Any]]:
    from dsr1.benchmarks.quant_accuracy import heldout_ids
    from dsr1.models.loading import resolve_model_dir

    stream = heldout_ids(resolve_model_dir(s["model"]), s["eval_tokens"])
    trained = trained_context(s["model"], model)
    results: list[dict[str, Any]] = []
    for context in s["contexts"]:
        windows = [stream[i:i + context] for i in range(0, stream.numel() - context + 1, context)]
        reference: list[Any] = []
        for name, keep in variants(s):
            label = name if keep is None else f"{name}@{keep:g}"
            row: dict[str, Any] = {"cache": label, "plugin": name, "keep": keep, "context": context,
                                   "samples": len(windows),
                                   "beyond_trained_context": bool(trained and context > trained)}
            if name in s["not_installed"]:
                row.update(status="skipped", reason=s["not_installed"][name])
            elif name != "contiguous" and not reference:
                row.update(status="skipped", reason="the contiguous reference did not run")
            else:
                try:
                    cache, options = make_cache(name, s, context, keep or 1.0)
                    row["options"] = options
                    row.update(status="ok", **evaluate(model, cache, windows, s["prefill_frac"], reference))
                except Dsr1Error as err:
                    row.update(status="skipped", reason=str(err))
                except Exception as err:  # noqa: BLE001 - one cache failing must not stop the matrix
                    row.update(status="error", reason=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
            results.append(row)
            if log:
                what = (f"KV {row['kv_bytes'] / 2**20:8.2f} MiB  ppl {row['perplexity']:9.3f}  top-1 "
                        f"{row['top1_agreement']:.3f}  {row['decode_tok_s']:7.1f} tok/s"
                        if row["status"] == "ok" else f"{row['status']}: {row['reason']}")
                print(f"{label:>18} C={context:>5}: {what}", file=sys.stderr, flush=True)
        base = next((r for r in results if r["context"] == context and r["cache"] == "contiguous"), None)
        for r in results:
            if r["context"] == context and r["status"] == "ok" and base and base["status"] == "ok":
                r["kv_reduction"] = round(base["kv_bytes"] / max(r["kv_bytes"], 1), 3)
                r["perplexity_increase"] = round(r["perplexity"] / base["perplexity"] - 1, 5)
    return results


def variants(s: dict[str, Any]) -> list[tuple[str, float | None]]:
    """(cache, keep share) pairs: a cache that compresses runs once per ``--keep`` share."""
    from dsr1.registry import PluginRegistry

    out: list[tuple[str, float | None]] = []
    for name in s["caches"]:
        compresses = name not in s["not_installed"] and bool(
            getattr(PluginRegistry.from_env().load("kvcache", name).impl, "compresses", False))
        out += [(name, k) for k in s["keep"]] if compresses else [(name, None)]
    return out


def evaluate(model: Any, cache: Any, windows: list[Any], prefill_frac: float,
             reference: list[Any]) -> dict[str, Any]:
    """Teacher-force each window through ``cache``; ``reference`` holds (or receives, when
    empty: the contiguous run) each window's argmax predictions."""
    import torch
    import torch.nn.functional as F

    device = model.device
    cuda = device.type == "cuda"
    fill = not reference
    nll, count, agree, decode_s, decoded, kv_bytes = 0.0, 0, 0, 0.0, 0, 0
    check: float | None = None
    busy = common.cpu_busy()
    with torch.inference_mode():
        for w, window in enumerate(windows):
            ids = window.to(device)[None]  # (1, C)
            c = ids.shape[1]
            p = max(1, int(prefill_frac * c))
            cache.allocate(model.cache_shape(1, c), model.dtype, device)
            cache.clear_state()
            model.rope.ensure(c, model.dtype)
            pos = torch.arange(c, device=device)[None]  # (1, C)
            logits = [model.forward_step(ids[:, :p], pos[:, :p], 0, cache, None, None, True)]  # [(1, V)]
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(p, c - 1):
                logits.append(model.forward_step(ids[:, i:i + 1], pos[:, i:i + 1], i, cache, None, None, True))
            if cuda:
                torch.cuda.synchronize()
            decode_s += time.perf_counter() - start
            decoded += c - 1 - p
            kv_bytes = max(kv_bytes, int(cache.nbytes()) + int(cache.state_nbytes()))
            scored = torch.cat(logits).float()  # (C − P, V): predictions of tokens P..C−1
            nll += F.cross_entropy(scored, ids[0, p:], reduction="sum").item()
            count += c - p
            top1 = scored.argmax(-1)
            if fill:
                reference.append(top1)
                if w == 0:  # the through-cache path must equal the cache-free forward
                    full = model(ids).logits[0, p - 1:c - 1].float()  # (C − P, V)
                    check = (full - scored).abs().max().item()
            agree += int((top1 == reference[w]).sum())
    out = {"kv_bytes": kv_bytes, "kv_bytes_per_token": round(kv_bytes / len(windows[0]), 1),
           "perplexity": math.exp(nll / count), "scored_tokens": count, "top1_agreement": round(agree / count, 5),
           "decode_tok_s": decoded / decode_s if decode_s else None, "prefill_tokens": p,
           "other_processes_cpu_pct": common.others_busy(busy, common.cpu_busy())}
    if check is not None:
        out["max_abs_logit_diff_vs_forward"] = check
    return out


def target(results: list[dict[str, Any]], reduction: float = 3.0, increase: float = 0.02) -> dict[str, Any]:
    """Issue 4's target: a cache with ≥ 3× less KV memory at ≤ 2% perplexity increase."""
    lines, met = [], []
    for r in results:
        if r["status"] != "ok" or r["cache"] == "contiguous" or "kv_reduction" not in r:
            continue
        ok = r["kv_reduction"] >= reduction and r["perplexity_increase"] <= increase
        verdict = "meets" if ok else "misses"
        if r["beyond_trained_context"]:  # the full-cache baseline is itself out of distribution there
            verdict, ok = "not judged: beyond the trained context", False
        if ok:
            met.append({"cache": r["cache"], "context": r["context"]})
        lines.append(f"{r['cache']:>18} at {r['context']:>5}: {r['kv_reduction']:5.2f}x less KV, perplexity "
                     f"{r['perplexity_increase']:+.2%}, top-1 {r['top1_agreement']:.1%} -> {verdict}")
    lines.append(f"target (>= {reduction:g}x less KV at <= {increase:.0%} perplexity increase): "
                 + (f"met by {', '.join(sorted({m['cache'] for m in met}))}" if met else "not met by any cache")
                 + " (judged within the trained context only)")
    return {"kv_reduction": reduction, "perplexity_increase": increase, "met_by": met, "summary": lines}


def plot(report: dict[str, Any], path: str) -> None:
    """KV bytes vs perplexity, one panel per context; a compressing cache is a line over its --keep shares;
    the shaded box is the target (≥ 3× less KV than contiguous at ≤ 2% more perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = report["settings"]["contexts"]
    cols = min(len(contexts), 2)
    rows_n = -(-len(contexts) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.2 * cols, 4.4 * rows_n), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(report["settings"]["caches"])}
    markers = {"contiguous": "s", "paged": "x", "int8": "D"}
    for ax, context in zip(axes.flat, contexts):
        ok = [r for r in report["results"] if r["context"] == context and r["status"] == "ok"]
        for name in report["settings"]["caches"]:
            mine = sorted((r for r in ok if r.get("plugin", r["cache"]) == name), key=lambda r: r["kv_bytes"])
            if mine:
                ax.plot([r["kv_bytes"] / 2**20 for r in mine], [r["perplexity"] for r in mine], color=colors[name],
                        marker=markers.get(name, "o"), ls="-" if len(mine) > 1 else "", label=name, ms=7)
                for r in mine:
                    if r.get("keep") is not None:
                        ax.annotate(f"{r['keep']:g}", (r["kv_bytes"] / 2**20, r["perplexity"]), fontsize=7,
                                    xytext=(4, 3), textcoords="offset points", color=colors[name])
        base = next((r for r in ok if r["cache"] == "contiguous"), None)
        if base is not None:
            ax.axvspan(0, base["kv_bytes"] / 2**20 / 3, ymax=1, color="green", alpha=0.06)
            ax.axhline(base["perplexity"] * 1.02, color="green", ls=":", lw=1, label="contiguous + 2%")
        beyond = context > report["model"]["trained_context"] > 0
        trained = report["model"]["trained_context"]
        ax.set_title(f"context {context}" + (f" (beyond the trained {trained})" if beyond else ""), fontsize=9)
        ax.set_xlabel(f"KV bytes held at full context (MiB, {report['model']['dtype']})")
        ax.set_ylabel("held-out perplexity (decoded half)")
        ax.set_xlim(left=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(contexts):]:
        ax.set_visible(False)
    fig.suptitle(f"{report['model']['name']}: KV memory vs perplexity per cache (labels: share of the context "
                 f"kept; green band: ≥ 3× less KV than contiguous)", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": "dsr1 bench"}),
                 "--plot")
    plt.close(fig)
