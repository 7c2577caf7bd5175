"""``dsr1 bench attention``: peak memory and time of one prefill attention call per plugin and length.

One point = one plugin at one sequence length ``T``: random ``q`` ``(B, H, T, D)`` and
``k``/``v`` ``(B, Hkv, T, D)`` (normal, seeded; never zeros), causal (``mask=None``), called
through the engine's :class:`~dsr1.models.common.AttentionCall`, so a plugin without the
``gqa`` capability pays for repeating K/V heads exactly as it does inside a model.

Each point runs in a fresh subprocess: a warm-up call at 16 tokens (library init), then the
measured call, whose peak memory is what it allocated on top of its inputs (output included;
see :mod:`dsr1.benchmarks.common` for how on CPU and CUDA), then ``reps`` timed calls
(median; CUDA synchronized around each; ``other_processes_cpu_pct`` says how busy other processes
kept the CPUs meanwhile). A call slower than ``slow_s`` is timed once.

On CPU each worker may map at most ``--mem-cap-gb`` more than its inputs (an address-space
limit), so a point that does not fit fails alone with the allocator's message; longer lengths
of that plugin are then skipped with the reason recorded. On CUDA an out-of-memory error
is caught the same way. A plugin that is not installed is skipped with the reason.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

from dsr1.benchmarks import common
from dsr1.errors import Dsr1Error
from dsr1.output_files import write_atomic

#: the plugins issue 4 builds: skipped with a reason while not installed (others are typos).
EXPECTED = ("eager", "sdpa", "linear", "sliding")
#: one layer of Qwen2-7B (on CUDA) and a smaller slice that fits the 2-core CPU machines.
#: options a plugin needs outside a model (a checkpoint would give sliding its window): Mistral-7B's 4096.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"sliding": {"window": 4096}}
LAYER_DEFAULTS = {"cuda": {"heads": 28, "kv_heads": 4, "head_dim": 128, "ffn": 18944},
                  "cpu": {"heads": 8, "kv_heads": 2, "head_dim": 64, "ffn": 1376}}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("attention", help="peak memory and time of one prefill attention call per plugin and length",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plugins", default="eager,sdpa,linear,sliding", help="comma-separated attention plugins")
    p.add_argument("--seq", default="1024,4096,8192,16384,32768", help="comma-separated sequence lengths")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, help="query heads (default 28 on CUDA = Qwen2-7B, 8 on CPU)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (default 4 on CUDA, 2 on CPU)")
    p.add_argument("--head-dim", type=int, help="head dim (default 128 on CUDA, 64 on CPU)")
    p.add_argument("--layer", action="store_true",
                   help="also measure a whole decoder layer (norms, qkv/rope, attention, o_proj, MLP; random weights)")
    p.add_argument("--ffn", type=int, help="the layer's FFN size (default 18944 on CUDA = Qwen2-7B, 1376 on CPU)")
    p.add_argument("--plugin-option", action="append", default=[], metavar="NAME.KEY=VALUE",
                   help="an option of one plugin, e.g. sliding.window=4096 (repeatable)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions after the measured call (median)")
    p.add_argument("--slow-s", type=float, default=20.0, help="a call slower than this is timed once")
    p.add_argument("--mem-cap-gb", type=float, default=None,
                   help="CPU: most a point may map beyond its inputs (default 10); "
                        "CUDA: none (out-of-memory is caught)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="a point running longer is skipped")
    p.add_argument("--threads", type=int, help="torch threads (default 1 on CPU: the machines are shared)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--output", help="also write the JSON report to this file")
    p.add_argument("--plot", help="write memory (and time) vs sequence length to this PNG")
    p.add_argument("--from-json", metavar="F.json", help="measure nothing: plot/summarize a saved report "
                   "(e.g. one from a GPU machine without matplotlib)")
    p.set_defaults(func=run)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Validated settings of a run (one-line errors on bad input)."""
    plugins = common.name_list(args.plugins, "--plugins")
    seqs = common.int_list(args.seq, "--seq")
    layer = LAYER_DEFAULTS[args.device]
    for flag in ("heads", "kv_heads", "head_dim", "ffn", "threads", "batch"):  # 0 is not "the default"
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise Dsr1Error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.reps < 0:
        raise Dsr1Error(f"--reps must be ≥ 0, got {args.reps}")
    heads = args.heads or layer["heads"]
    kv_heads = args.kv_heads or layer["kv_heads"]
    head_dim = args.head_dim or layer["head_dim"]
    if heads % kv_heads:
        raise Dsr1Error(f"--heads ({heads}) must be a multiple of --kv-heads ({kv_heads})")
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise Dsr1Error(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    cap = args.mem_cap_gb if args.mem_cap_gb is not None else (10.0 if args.device == "cpu" else None)
    if cap is not None and cap <= 0:
        raise Dsr1Error(f"--mem-cap-gb must be > 0, got {cap}")
    skipped = common.check_names("attention", plugins, EXPECTED)
    given = common.parse_plugin_options(args.plugin_option, plugins, "--plugin-option")
    return {
        "plugins": plugins, "seq": seqs, "device": args.device, "dtype": dtype, "batch": args.batch,
        "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "reps": args.reps, "slow_s": args.slow_s,
        "layer": bool(args.layer), "ffn": args.ffn or layer["ffn"],
        "mem_cap_gb": cap, "timeout_s": args.timeout_s,
        "threads": args.threads or (1 if args.device == "cpu" else None),
        "options": {p: {**DEFAULT_OPTIONS.get(p, {}), **given.get(p, {})} for p in plugins},
        "not_installed": skipped,
    }


def command(args: argparse.Namespace) -> str:
    parts = ["dsr1", "bench", "attention", "--plugins", args.plugins, "--seq", args.seq, "--device", args.device]
    for flag in ("dtype", "batch", "heads", "kv_heads", "head_dim", "ffn", "reps", "mem_cap_gb", "threads", "output",
                 "plot"):
        value = getattr(args, flag)
        if value is not None and not (flag == "batch" and value == 1) and not (flag == "reps" and value == 3):
            parts += ["--" + flag.replace("_", "-"), str(value)]
    for item in args.plugin_option:
        parts += ["--plugin-option", item]
    return shlex.join(parts + (["--layer"] if args.layer else []) + (["--json"] if args.json else []))


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        saved = common.read_report(args.from_json, "attention")

        def show() -> None:
            if args.plot:
                plot(saved, args.plot)
            print(target(saved["results"])["summary"])

        common.from_report(args.from_json, show)
        return 0
    s = settings(args)
    report: dict[str, Any] = {"command": command(args), **common.environment(s["device"], s["threads"])}
    report["settings"] = {k: v for k, v in s.items() if k != "not_installed"}
    report["memory_method"] = common.PeakMemory(s["device"]).method
    results = measure(s, log=not args.json)
    report["results"] = results
    report["ratios"] = ratios(results)
    report["target"] = target(results)
    text = common.write_report(report, args.output)
    if args.plot:
        try:
            plot(report, args.plot)
        except ImportError as err:  # a GPU machine without matplotlib: plot later with --from-json
            print(f"dsr1 bench: warning: no plot ({err}); the JSON has everything, replot with --from-json",
                  file=sys.stderr)
    if args.json:
        print(text)
    else:
        print(report["target"]["summary"])
    return 0


def measure(s: dict[str, Any], log: bool = True) -> list[dict[str, Any]]:
    """Every (plugin, length) point, shortest first; a plugin stops at its first failure."""
    results: list[dict[str, Any]] = []
    for plugin in s["plugins"]:
        stop: str | None = s["not_installed"].get(plugin)
        for seq in s["seq"]:
            if stop is not None:
                row = {"plugin": plugin, "seq": seq, "status": "skipped", "reason": stop}
            else:
                row = _spawn(s, plugin, seq)
                if row["status"] != "ok":
                    stop = f"not tried: {row['status']} at {seq} tokens ({row['reason']})"
            results.append(row)
            if log:
                what = (f"peak {row['peak_mem_bytes'] / 2**20:10.1f} MiB  {row['time_s'] * 1e3:10.1f} ms"
                        if row["status"] == "ok" else f"{row['status']}: {row['reason']}")
                print(f"{plugin:>10} T={seq:>6}: {what}", file=sys.stderr, flush=True)
    return results


def _spawn(s: dict[str, Any], plugin: str, seq: int) -> dict[str, Any]:
    spec = {**{k: v for k, v in s.items() if k not in ("plugins", "seq", "not_installed", "options")},
            "plugin": plugin, "plugin_options": s["options"].get(plugin, {}), "seq": seq}
    env = common.worker_env()
    if s["threads"]:
        env["OMP_NUM_THREADS"] = str(s["threads"])
    cmd = [sys.executable, "-m", "dsr1.benchmarks.attention", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=s["timeout_s"], check=False)
    except subprocess.TimeoutExpired:
        return {"plugin": plugin, "seq": seq, "status": "skipped", "reason": f"ran past --timeout-s {s['timeout_s']}"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        if proc.returncode < 0:
            tail = f"killed by signal {-proc.returncode} (out of memory?); {tail}"
        return {"plugin": plugin, "seq": seq, "status": "error", "reason": tail}
    return dict(json.loads(lines[-1]))


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Peak memory and time of each plugin relative to ``eager`` at each length both measured."""
    ok = {(r["plugin"], r["seq"]): r for r in results if r["status"] == "ok"}
    out = []
    for (plugin, seq), r in sorted(ok.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = ok.get(("eager", seq))
        if plugin == "eager" or base is None:
            continue
        row = {"plugin": plugin, "seq": seq,
               "peak_mem_vs_eager": round(r["peak_mem_bytes"] / max(base["peak_mem_bytes"], 1), 4),
               "time_vs_eager": round(r["time_s"] / base["time_s"], 4)}
        if r.get("layer_status") == "ok" and base.get("layer_status") == "ok":
            row["layer_peak_mem_vs_eager"] = round(r["layer_peak_mem_bytes"] / max(base["layer_peak_mem_bytes"], 1), 4)
            row["layer_time_vs_eager"] = round(r["layer_time_s"] / base["layer_time_s"], 4)
        out.append(row)
    return out


def target(results: list[dict[str, Any]], at: int = 32768, limit: float = 0.27) -> dict[str, Any]:
    """Issue 4's target: ``linear`` peak memory ≤ 27% of ``eager`` at 32768 tokens."""
    ok = {(r["plugin"], r["seq"]): r for r in results if r["status"] == "ok"}
    both = sorted(seq for (p, seq) in ok if p == "linear" and ("eager", seq) in ok)
    out: dict[str, Any] = {"at_seq": at, "limit": limit}
    if not both:
        out.update(met=None, summary="target not measurable: no length where both linear and eager ran")
        return out
    seq = at if at in both else both[-1]
    ratio = ok[("linear", seq)]["peak_mem_bytes"] / max(ok[("eager", seq)]["peak_mem_bytes"], 1)
    out.update(seq=seq, linear_vs_eager=round(ratio, 4))
    sdpa = ok.get(("sdpa", seq))
    if sdpa:
        out["sdpa_vs_eager"] = round(sdpa["peak_mem_bytes"] / max(ok[("eager", seq)]["peak_mem_bytes"], 1), 4)
    if seq == at:
        out["met"] = ratio <= limit
        out["summary"] = (f"linear peak memory is {ratio:.1%} of eager at {at} tokens "
                          f"(target ≤ {limit:.0%}: {'met' if ratio <= limit else 'missed'})")
    else:
        eager_at = next((r for r in results if r["plugin"] == "eager" and r["seq"] == at), None)
        why = f" ({eager_at['status']}: {eager_at['reason']})" if eager_at else " (not in --seq)"
        out["met"] = None
        out["summary"] = (f"eager did not run at {at} tokens{why}; at {seq}, the largest length both ran, "
                          f"linear peak memory is {ratio:.1%} of eager")
    return out


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for plugin in s["plugins"]:
        rows = [r for r in report["results"] if r["plugin"] == plugin and r["status"] == "ok"]
        if not rows:
            continue
        seqs = [r["seq"] for r in rows]
        line, = mem_ax.plot(seqs, [r["peak_mem_bytes"] / 2**20 for r in rows], marker="o", label=plugin)
        time_ax.plot(seqs, [r["time_s"] * 1e3 for r in rows], marker="o", label=plugin)
        layer = [r for r in rows if r.get("layer_status") == "ok"]
        if layer:
            mem_ax.plot([r["seq"] for r in layer], [r["layer_peak_mem_bytes"] / 2**20 for r in layer], ls="--",
                        marker=".", color=line.get_color(), label=f"{plugin}, whole layer")
        stop = next((r for r in report["results"] if r["plugin"] == plugin and r["status"] != "ok"), None)
        if stop is not None and not stop["reason"].startswith("not tried"):
            why = "out of memory" if "out of memory" in stop["reason"] else stop["status"]
            mem_ax.annotate(f"{why} at {stop['seq']}", (seqs[-1], rows[-1]["peak_mem_bytes"] / 2**20),
                            xytext=(6, -4), textcoords="offset points", fontsize=8, color=line.get_color())
    for ax, label in ((mem_ax, "peak memory of one call (MiB)"), (time_ax, "time of one call (ms, median)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    where = report["machine"]["gpu"] or report["machine"]["cpu"]
    fig.suptitle(f"prefill attention, B={s['batch']} H={s['heads']} Hkv={s['kv_heads']} D={s['head_dim']} "
                 f"{s['dtype']} on {where}", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": "dsr1 bench"}),
                 "--plot")
    plt.close(fig)


# --- worker: one plugin, one length ----------------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from dsr1.config import PluginChoice
    from dsr1.models.common import AttentionCall
    from dsr1.registry import PluginRegistry

    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    plugin, seq = spec["plugin"], int(spec["seq"])
    row: dict[str, Any] = {"plugin": plugin, "seq": seq}
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    registry = PluginRegistry.from_env()
    impl = registry.make("attention", PluginChoice(name=plugin, options=spec["plugin_options"]))
    reasons = impl.validate(spec["device"], dtype)
    if reasons:
        return {**row, "status": "skipped", "reason": "; ".join(reasons)}
    caps = registry.load("attention", plugin).capabilities
    b, h, hkv, d = spec["batch"], spec["heads"], spec["kv_heads"], spec["head_dim"]
    call = AttentionCall(impl, h // hkv, "gqa" in caps)
    g = torch.Generator(device=device).manual_seed(seq)

    def qkv(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = torch.randn(b, h, t, d, device=device, generator=g).to(dtype)  # (B, H, T, D)
        k = torch.randn(b, hkv, t, d, device=device, generator=g).to(dtype)  # (B, Hkv, T, D)
        v = torch.randn(b, hkv, t, d, device=device, generator=g).to(dtype)  # (B, Hkv, T, D)
        return q, k, v

    def timed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = call(q, k, v, None, d**-0.5)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if out.shape != q.shape or not bool(torch.isfinite(out[:, :, -1]).all()):
            raise Dsr1Error(f"{plugin} returned shape {tuple(out.shape)} or non-finite values at T={seq}")
        return elapsed

    with torch.inference_mode():
        timed(*qkv(16))  # library init (thread pools, kernels) outside the measured call
        q, k, v = qkv(seq)
        row["input_bytes"] = q.nbytes + k.nbytes + v.nbytes
        row["output_bytes"] = q.nbytes
        if device.type == "cpu" and spec["mem_cap_gb"]:
            common.limit_address_space(int(spec["mem_cap_gb"] * 2**30))
        try:
            with common.PeakMemory(spec["device"]) as mem:
                first = timed(q, k, v)
                peak = mem.peak()
        except (RuntimeError, MemoryError) as err:
            if not common.is_oom(err):
                raise
            cap = f" (cap {spec['mem_cap_gb']} GB)" if device.type == "cpu" and spec["mem_cap_gb"] else ""
            return {**row, "status": "skipped", "reason": f"out of memory{cap}: {str(err).splitlines()[0][:200]}"}
        times = [first]
        busy = common.cpu_busy()
        if first < spec["slow_s"]:
            times = [timed(q, k, v) for _ in range(int(spec["reps"]))] or [first]
        row.update(status="ok", peak_mem_bytes=peak, time_s=statistics.median(times), times_s=times,
                   other_processes_cpu_pct=common.others_busy(busy, common.cpu_busy()), capabilities=sorted(caps))
        del q, k, v
        if spec.get("layer"):
            row.update(_layer(spec, call, device, dtype))
    return row


def _layer(spec: dict[str, Any], call: Any, device: Any, dtype: Any) -> dict[str, Any]:
    """Peak memory (weights and input excluded, output included) and time of one decoder layer's prefill."""
    import torch

    from dsr1.models.llama import LlamaArgs, LlamaBlock
    from dsr1.models.rope import RotaryEmbedding, rope_inv_freq

    b, t, h, d = spec["batch"], int(spec["seq"]), spec["heads"], spec["head_dim"]
    a = LlamaArgs.from_hf({"model_type": "llama", "vocab_size": 1, "hidden_size": h * d, "num_hidden_layers": 1,
                           "num_attention_heads": h, "num_key_value_heads": spec["kv_heads"], "head_dim": d,
                           "intermediate_size": spec["ffn"], "rope_theta": 1e6, "max_position_embeddings": t})
    with torch.device(device):
        block = LlamaBlock(a, 0, call, fused=True).to(dtype).eval()  # nn.Linear's random init: never zeros
        inv_freq, scaling = rope_inv_freq(a.rope, d, t)
        rope = RotaryEmbedding(inv_freq.to(device), scaling)
        rope.ensure(t, dtype)
        cos, sin = rope(torch.arange(t).expand(b, t), signed=True)  # (B, T, 1, D)
        x = torch.randn(b, t, h * d, generator=torch.Generator(device=device).manual_seed(t)).to(dtype)  # (B, T, C)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        block(x, cos, sin, (None, None), None, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    try:
        with common.PeakMemory(spec["device"]) as mem:
            first = timed()
            peak = mem.peak()
    except (RuntimeError, MemoryError) as err:
        if not common.is_oom(err):
            raise
        return {"layer_status": "skipped", "layer_reason": f"out of memory: {str(err).splitlines()[0][:200]}"}
    times = [timed() for _ in range(int(spec["reps"]))] if first < spec["slow_s"] else []
    return {"layer_status": "ok", "layer_peak_mem_bytes": peak, "layer_time_s": statistics.median(times or [first]),
            "layer_weight_bytes": sum(p.nbytes for p in block.parameters())}


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
