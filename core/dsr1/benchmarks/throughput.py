"""``dsr1 bench``: prefill / decode tokens per second and peak memory, against transformers.

Each (engine, batch size) runs in its own subprocess, so peak memory is that process's own
high-water mark: ``ru_maxrss`` after the run minus the baseline after imports on CPU, or
``torch.cuda.max_memory_allocated`` on CUDA. Both engines get the same weights (random ones
are generated per tensor name from one seed, normal with std 0.02, norm weights 1), dtype,
thread count and prompts; generation is forced to the full length (no eos).

Timing: one warm-up ``generate``, then ``--reps`` repetitions of a prefill-only ``generate``
(1 new token) and a full one; medians. prefill tok/s = B·P / t(1 token); decode tok/s =
B·(N−1) / (t(N tokens) − t(1 token)); end-to-end tok/s = B·N / t(N tokens). When the N-token
median is no longer than the 1-token one (a load burst in a 1-token run), up to 2·reps + 2 more
pairs are timed (``extra_reps``); a run whose timings are still not positive, finite and ordered
is refused with a one-line error, never printed as a rate (:mod:`dsr1.benchmarks.rates`).

Other forms: ``dsr1 bench attention``, ``kvcache``, ``serve`` and ``precision`` (quant unset vs
explicit policies such as ``fp32``, same weights, one process).
"""
# run() is the parent (one spawn() per engine, batch size and round, then the report); worker() measures one
# engine at one batch size in this process, and is what dsr1.benchmarks.pruning_speed calls for a saved stage.
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

from dsr1.benchmarks.common import (
    above_floor,
    bandwidth_gbs,
    cpu_busy,
    cpu_model,
    maxrss_mb,
    others_busy,
    thp_mode,
    version,
    write_report,
)
from dsr1.benchmarks.rates import rates
from dsr1.benchmarks.shapes import build_random, random_weights
from dsr1.errors import Dsr1Error
from dsr1.progress import progress

#: figures of a worker that several rounds combine by their median (peak memory: the highest).
RATES = ("prefill_tok_s", "decode_tok_s", "e2e_tok_s", "prefill_s", "generate_s")


# --- parent: spawn one worker per (engine, batch) -----------------------------------------------


def run(args: Any) -> int:
    """Every batch size of ``args`` (the ``dsr1 bench`` options, checked by the CLI), then the report."""
    import torch

    batches = [int(b) for b in str(args.batch_size).split(",") if b.strip()]
    device = args.device or "cpu"
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    threads = args.threads or os.cpu_count() or 1
    engines = ["dsr1"] + (["hf"] if args.compare else [])
    spec = {
        "model": args.model, "shape": args.shape, "config": args.config, "dtype": dtype, "device": device,
        "dtype_explicit": args.dtype is not None,
        "threads": threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
    }
    results: list[dict[str, Any]] = []
    with progress("bench workers", total=len(batches) * args.rounds * len(engines),
                  quiet=args.json or args.quiet) as bar:
        for b in batches:
            results.append(one_batch(args, spec, engines, b, bar))
    report(args, device, threads, spec, results, torch)
    return 0


def one_batch(args: Any, spec: dict[str, Any], engines: list[str], b: int, bar: Any) -> dict[str, Any]:
    """Every engine's rounds at batch ``b``, combined (and compared with transformers where asked)."""
    row: dict[str, Any] = {"batch_size": b}
    runs: dict[str, list[dict[str, Any]]] = {engine: [] for engine in engines}
    for r in range(args.rounds):
        for engine in engines if r % 2 == 0 else engines[::-1]:  # alternate who goes first
            bar.advance(0, description=f"bench: {engine} batch {b}, round {r + 1}")
            got = spawn({**spec, "engine": engine, "batch_size": b})
            bar.advance()
            runs[engine].append(got)
            others = got.get("other_processes_cpu_pct")
            if others is not None and others > 10:
                print(f"dsr1 bench: warning: other processes kept {others:.0f}% of the CPUs busy while {engine} "
                      f"ran batch {b}; its figures are not trustworthy", file=sys.stderr, flush=True)
            if not args.json:
                print(f"batch {b:>3} {engine:>5}: prefill {got['prefill_tok_s']:9.1f} tok/s  decode "
                      f"{got['decode_tok_s']:8.1f} tok/s  end-to-end {got['e2e_tok_s']:8.1f} tok/s  "
                      f"peak {got['peak_mem_mb']:8.1f} MB", file=sys.stderr, flush=True)
    for engine in engines:
        row[engine] = combine_rounds(runs[engine])
    if "hf" in row:
        d, h = row["dsr1"], row["hf"]
        row["ratio_vs_hf"] = {k: round(d[k] / h[k], 3) for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s")}
        row["ratio_vs_hf"]["peak_mem"] = round(d["peak_mem_mb"] / h["peak_mem_mb"], 3) if h["peak_mem_mb"] > 0 else None
    return row


def report(args: Any, device: str, threads: int, spec: dict[str, Any], results: list[dict[str, Any]],
           torch: Any, extra: dict[str, Any] | None = None) -> None:
    """The report (JSON, and the summary lines unless --json), from every batch size's row; ``extra``'s
    keys are added to (or replace) the report's."""
    weight_bytes = results[0]["dsr1"]["weight_bytes"]
    streamed = results[0]["dsr1"].get("streamed_bytes", weight_bytes)
    bandwidth = bandwidth_gbs(device)
    out: dict[str, Any] = {
        "command": command(args),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None,
            "load_avg_1m": os.getloadavg()[0], "transparent_hugepage": thp_mode(),
        },
        "versions": {"torch": torch.__version__, "transformers": version("transformers"), "python":
                     platform.python_version()},
        "settings": spec,
        "floor": {"weight_bytes": weight_bytes, "streamed_bytes_per_token": streamed,
                  "read_bandwidth_gbs": round(bandwidth, 2),
                  "batch1_decode_floor_tok_s": round(bandwidth * 1e9 / streamed, 1)},
        "results": results,
        **(extra or {}),
    }
    active = results[0]["dsr1"].get("active_bytes")
    if active:  # MoE: a token reads only its experts' weights
        streamed = active
        out["floor"].update(active_bytes_per_token=active,
                            batch1_decode_floor_tok_s=round(bandwidth * 1e9 / active, 1))
        for row in results:
            if row["batch_size"] == 1:
                row["dsr1"]["share_of_floor"] = round(row["dsr1"]["decode_tok_s"] / out["floor"][
                    "batch1_decode_floor_tok_s"], 3)
    # no engine may beat the floor: one that does reads faster than the probe, so the floor is wrong
    beaten = [f"{engine} at batch {row['batch_size']} ({gbs} GB/s)" for row in results for engine in ("dsr1", "hf")
              if engine in row and (gbs := above_floor(row[engine]["decode_tok_s"], row["batch_size"], streamed,
                                                       bandwidth))]
    out["floor"]["beaten_by"] = beaten
    text = write_report(out, args.output)
    if beaten:
        print(f"warning: the floor's {bandwidth:.1f} GB/s is below what {', '.join(beaten)} read; the floor is "
              f"not a bound on this machine", file=sys.stderr)
    if args.json:
        print(text)
        return
    print(f"decode floor at batch 1: {out['floor']['batch1_decode_floor_tok_s']} tok/s "
          f"({streamed / 1e6:.0f} MB of weights read per token, {bandwidth:.1f} GB/s)")
    for row in results:
        if "ratio_vs_hf" in row:
            r = row["ratio_vs_hf"]
            print(f"batch {row['batch_size']}: dsr1/transformers decode {r['decode_tok_s']:.2f}x, end-to-end "
                  f"{r['e2e_tok_s']:.2f}x, prefill {r['prefill_tok_s']:.2f}x, peak memory {r['peak_mem']}x")
        else:
            d = row["dsr1"]
            print(f"batch {row['batch_size']}: decode {d['decode_tok_s']:.1f} tok/s, e2e {d['e2e_tok_s']:.1f}")


def combine_rounds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One engine's figures over its rounds: the round with the median decode rate, with every rate
    replaced by its median, the highest peak memory, and each round's rates under ``rounds``."""
    if len(runs) == 1:
        return runs[0]
    middle = sorted(runs, key=lambda got: got["decode_tok_s"])[len(runs) // 2]
    out = {**middle, **{k: statistics.median(got[k] for got in runs) for k in RATES}}
    out["peak_mem_mb"] = max(got["peak_mem_mb"] for got in runs)
    out["rounds"] = [{k: got[k] for k in (*RATES, "peak_mem_mb", "other_processes_cpu_pct")} for got in runs]
    return out


def command(args: Any) -> str:
    """The command line that reproduces this run (from the parsed options, not sys.argv)."""
    parts = ["dsr1", "bench"]
    for flag in ("model", "shape", "config", "batch_size", "prompt_len", "new_tokens", "reps", "rounds", "compare",
                 "dtype", "device", "threads", "output"):
        value = getattr(args, flag)
        if value is not None:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    parts += [f for f, on in (("--random-weights", args.random_weights), ("--json", args.json)) if on]
    return shlex.join(parts)


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`worker` of ``spec`` in a fresh ``dsr1 bench --worker`` process (its own peak memory)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    from dsr1 import hugepages

    if spec["engine"] == "hf" and hugepages.HUGE_PAGES_BY_DSR1:
        env["THP_MEM_ALLOC_ENABLE"] = "0"  # the CLI's default (dsr1.hugepages.enable_huge_pages), not transformers'
    cmd = [sys.executable, "-m", "dsr1.cli", "bench", "--shape", "tiny-125m", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1].removeprefix("dsr1: error: ")
        raise Dsr1Error(f"bench worker ({spec['engine']}, batch {spec['batch_size']}) failed: {tail}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# --- under torchrun: every rank measures in its own process ----------------------------------------


def run_launched(args: Any, rank: int) -> int:
    """``torchrun --nproc-per-node N -m dsr1 bench ...``: every rank loads its shards once and measures
    every batch size on the same inputs; ``model.generate`` runs the same static batch on every rank, so
    the ranks' collectives stay in lockstep. Rank 0 writes the report: its rates, and each rank's peak
    memory (from the loaded weights on: each batch size resets the peak) and share of the weight bytes."""
    import torch

    from dsr1.parallel.lockstep import gather_json, world_group

    if args.compare:
        raise Dsr1Error("--compare hf runs transformers in one process; under torchrun leave it out (a dsr1 bench "
                        "without torchrun compares)")
    if args.rounds != 1:
        raise Dsr1Error(f"--rounds {args.rounds} spawns fresh processes per round; under torchrun use --rounds 1 "
                        f"and repeat the launch")
    batches = [int(b) for b in str(args.batch_size).split(",") if b.strip()]
    device = args.device or "cpu"
    if device == "cuda":  # this rank's GPU before anything allocates (the peak memory is read there too)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", str(rank))))
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    threads = args.threads or os.cpu_count() or 1
    spec = {
        "model": args.model, "shape": args.shape, "config": args.config, "dtype": dtype, "device": device,
        "dtype_explicit": args.dtype is not None, "engine": "dsr1",
        "threads": threads, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
    }
    loaded = load({**spec, "batch_size": batches[0]})
    model = loaded["model"]
    group = world_group(model)
    if group is None:
        size = os.environ.get("WORLD_SIZE", "?")
        raise Dsr1Error(f"dsr1 bench under torchrun ({size} ranks) needs a --config whose parallel.tensor (times "
                        f"parallel.pipeline) is {size}; without it every rank would measure a whole model alone")
    results: list[dict[str, Any]] = []
    for b in batches:
        got = measure({**spec, "batch_size": b}, loaded, reset_peak=True)
        results.append({"batch_size": b, "dsr1": got})
        print(f"batch {b:>3} (rank {rank}): prefill {got['prefill_tok_s']:9.1f} tok/s  decode "
              f"{got['decode_tok_s']:8.1f} tok/s  peak {got['peak_mem_mb']:8.1f} MB", file=sys.stderr, flush=True)
    mine = {"rank": group.rank, "weight_bytes": loaded["weight_bytes"],
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "peak_mem_mb": {str(r["batch_size"]): r["dsr1"]["peak_mem_mb"] for r in results},
            "decode_tok_s": {str(r["batch_size"]): r["dsr1"]["decode_tok_s"] for r in results},
            "prefill_tok_s": {str(r["batch_size"]): r["dsr1"]["prefill_tok_s"] for r in results}}
    ranks = gather_json(mine, group, loaded["device"])
    if group.rank != 0:
        return 0
    parallel = model.pipeline.config.parallel
    totals = {"weight_bytes": sum(r["weight_bytes"] for r in ranks),
              "peak_mem_mb": {str(b): round(sum(r["peak_mem_mb"][str(b)] for r in ranks), 1) for b in batches}}
    extra = {"command": f"torchrun --nproc-per-node {group.size} -m {command(args)}",
             "parallel": {"world_size": group.size, "tensor": parallel.tensor,
                          "pipeline": getattr(parallel, "pipeline", 1), "ranks": ranks, "totals": totals}}
    report(args, device, threads, spec, results, torch, extra)
    return 0


# --- worker: one engine, one batch size -----------------------------------------------------------


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Rates, peak memory and weight bytes of one engine (``spec["engine"]``: dsr1 or hf) at one batch size."""
    return measure(spec, load(spec))


def load(spec: dict[str, Any]) -> dict[str, Any]:
    """The model of ``spec`` and what :func:`measure` reads of it: its generate call, weight bytes, the
    memory baseline taken before it loaded."""
    import torch

    torch.set_num_threads(int(spec["threads"]))
    cuda = spec["device"] == "cuda"
    dtype = getattr(torch, spec["dtype"]) if spec["dtype"] else torch.float32
    if spec["engine"] == "hf":
        import transformers  # noqa: F401 - imported before the baseline, like dsr1's modules
    from dsr1.auto import AutoModel  # noqa: F401

    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated() / 2**20
    else:
        base = maxrss_mb()
    device = torch.device("cuda" if cuda else "cpu")
    if spec["shape"]:
        hf_cfg, reader = random_weights(spec["shape"], dtype, device)
    else:
        from dsr1.models.loading import read_hf_config, resolve_model_dir

        model_dir = resolve_model_dir(spec["model"])
        hf_cfg = read_hf_config(model_dir)
        spec = {**spec, "model_dir": str(model_dir)}  # transformers cannot resolve dsr1's names
        reader = None
    if spec["engine"] == "dsr1":
        model, gen = load_dsr1(spec, hf_cfg, reader, dtype)
    else:
        model, gen = load_hf(spec, hf_cfg, reader, dtype, device)
    # weights = parameters + buffers: quantized layers keep their int8/int4 weights and scales as buffers
    params = {id(p): p for p in (*model.parameters(), *model.buffers())}
    weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
    # an embedding table is gathered, not streamed, per token (unless it is also the output head)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    gathered = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - linear
    streamed = sum(p.numel() * p.element_size() for i, p in params.items() if i not in gathered)
    active = active_bytes(model, hf_cfg, streamed)
    del params  # no reference to the weights beyond the model's (it may relayout them: dsr1.models.packing)
    return {"model": model, "gen": gen, "hf_cfg": hf_cfg, "base": base, "device": device, "weight_bytes": weight_bytes,
            "streamed": streamed, "active": active}


def measure(spec: dict[str, Any], loaded: dict[str, Any], reset_peak: bool = False) -> dict[str, Any]:
    """:func:`worker`'s figures at ``spec["batch_size"]`` on a model :func:`load` made. One model may
    serve several batch sizes: with ``reset_peak`` each gets its own CUDA peak, from the loaded weights
    on (without, the peak includes the load's); on the CPU the peak is the process's high-water mark."""
    import torch

    cuda = spec["device"] == "cuda"
    model, gen, hf_cfg, base, device = (loaded[k] for k in ("model", "gen", "hf_cfg", "base", "device"))
    weight_bytes, streamed, active = loaded["weight_bytes"], loaded["streamed"], loaded["active"]
    if cuda and reset_peak:
        torch.cuda.reset_peak_memory_stats()
    b, p, n = int(spec["batch_size"]), int(spec["prompt_len"]), int(spec["new_tokens"])
    vocab = int(hf_cfg["vocab_size"])
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(min(100, vocab - 1), vocab, (b, p), generator=g).to(device)
    mask = torch.ones_like(ids)

    def timed(new: int) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = gen(ids, mask, new)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        if out.shape != (b, p + new):
            raise Dsr1Error(f"{spec['engine']} generated {tuple(out.shape)}, expected {(b, p + new)}")
        return elapsed

    timed(n)  # warm-up (allocator, kernels, caches)
    t1, tn = [], []
    busy_before = cpu_busy()
    reps = int(spec["reps"])
    for _ in range(reps):
        t1.append(timed(1))
        tn.append(timed(n))
    extra = 0  # a load burst in a 1-token run can leave no decode time: measure more pairs before refusing
    while statistics.median(tn) <= statistics.median(t1) and extra < 2 * reps + 2:
        t1.append(timed(1))
        tn.append(timed(n))
        extra += 1
    others = others_busy(busy_before, cpu_busy())
    figures = rates(f"bench {spec['engine']} batch {b}", b, p, n, t1, tn)  # refuses timings that cannot be real
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else maxrss_mb()) - base
    out = {
        **figures, "peak_mem_mb": peak, "weight_bytes": weight_bytes,
        "streamed_bytes": streamed, "active_bytes": active,
        "times_1": t1, "times_n": tn, "extra_reps": extra,
        "other_processes_cpu_pct": others,
        "torch_huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
    }
    if spec["engine"] == "dsr1":
        out["pipeline"] = model.pipeline.describe()
    return out


def load_dsr1(spec: dict[str, Any], hf_cfg: dict[str, Any], reader: Any, dtype: Any) -> tuple[Any, Any]:
    """dsr1's model of ``spec`` (a checkpoint, or ``reader``'s random weights) and its generate call."""
    import torch

    from dsr1.auto import AutoModel

    overrides = {"device": spec["device"]} if spec["device"] else {}
    if reader is None:
        explicit = dtype if spec.get("dtype_explicit") else None  # else the checkpoint's (or the quant policy's)
        model = AutoModel.from_pretrained(spec["model"], spec["config"], dtype=explicit, **overrides)
    else:
        from dsr1.config import load_config
        from dsr1.registry import PluginRegistry

        pipeline = PluginRegistry.from_env().resolve(load_config(spec["config"], **overrides))
        builder = pipeline.model_builder(hf_cfg["model_type"])
        if spec.get("dtype_explicit"):  # else the random weights' dtype, or the quant policy's compute dtype
            builder.options = type(builder.options).model_validate(
                {**builder.options.model_dump(), "dtype": str(dtype).removeprefix("torch.")})
        model = build_random(builder, hf_cfg, reader, pipeline)
        pipeline.fire_model_loaded(model)

    def gen(ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
        return model.generate(ids, mask, max_new_tokens=new, ignore_eos=True)

    return model, gen


def _stacked_experts(reader: Any, name: str, n_experts: int) -> Any:
    """A transformers 5 stacked expert parameter from the checkpoint-layout tensors of ``reader``."""

    from dsr1.models.moe import expert_sources, stack_experts

    sources, how = expert_sources(name.rsplit("experts.", 1)[0], n_experts)[name]
    return stack_experts([reader.tensor(s) for s in sources], how)


def active_bytes(model: Any, hf_cfg: dict[str, Any], streamed: int) -> int | None:
    """Weight bytes one token reads at batch 1 in a mixture-of-experts model: everything streamed but the
    experts it is not routed to (None: a dense model)."""
    experts = int(hf_cfg.get("n_routed_experts") or hf_cfg.get("num_experts") or hf_cfg.get("num_local_experts") or 0)
    if not experts:
        return None
    k = int(hf_cfg["num_experts_per_tok"])
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    return int(streamed - expert_bytes * (experts - k) / experts)


def load_hf(spec: dict[str, Any], hf_cfg: dict[str, Any], reader: Any, dtype: Any, device: Any) -> tuple[Any, Any]:
    """transformers' model of ``spec`` on the same weights, and its greedy generate call (no eos)."""
    import torch
    import transformers

    if reader is None:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec["model_dir"], dtype=dtype if spec.get("dtype_explicit") else "auto").to(device)
    else:
        cfg = transformers.AutoConfig.for_model(**hf_cfg)
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        with torch.no_grad():
            for name, param in model.state_dict().items():
                if name in reader.shapes:
                    param.copy_(reader.tensor(name))
                elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # transformers 5 stacks experts
                    param.copy_(_stacked_experts(reader, name, param.shape[0]))
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0

    def gen(ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                               do_sample=False)
        return out

    return model, gen
