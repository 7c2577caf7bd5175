"""Speed of a saved pruning stage against its dense model, measured the way ``dsr1 bench`` measures.

Causal LMs go through the bench worker itself (:func:`dsr1.benchmarks.throughput.worker`, in this
process): the stage dir is loaded by ``AutoModel`` with the engine's normal options, one
warm-up ``generate``, then ``reps`` prefill-only and full generations with random prompt ids;
medians. Encoders have no ``generate``; :func:`encoder_speed` follows the same rules with a
full forward over a fixed batch of held-out sentences padded to ``seq_len`` tokens.

Every stage and the dense model are measured in the same run with the same settings, so the
figure to read is the ratio against dense (BENCHMARKS.md); ``dsr1 prune`` measures the dense model
again right before and right after each stage and divides by the mean of those two, so slow
drift of a shared machine cancels. On a busy 2-core machine, ``--threads 1`` gives steadier
figures than 2 threads fighting other processes.

Run as a module, it is the alternating check behind the committed pruning speed claims: one
measurement per stage can be slowed by other processes, so :func:`main` alternates the two models
for ``--rounds`` rounds (dense, stage, dense, stage, ...) and reports the median of the per-round
ratios (a round: one stage measurement divided by the mean of the dense measurements either side).

    python -m dsr1.benchmarks.pruning_speed --dense dsr1-tiny \\
        --stage /tmp/dsr1-pruning/dsr1-tiny-structured/stage-0.50 \\
        --output bench/results/pruning/speed-dsr1-tiny-structured.json
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dsr1.benchmarks.common import cpu_model, write_report
from dsr1.errors import Dsr1Error

#: The speed figure plotted and compared, per model kind.
HEADLINE = {"causal": "decode_tok_s", "encoder": "tokens_s"}


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def causal_speed(model_dir: Path, config: dict[str, Any], settings: dict[str, Any]) -> dict[str, float]:
    """prefill / decode / end-to-end tokens per second of ``model_dir``, via the bench worker."""
    from dsr1.benchmarks.throughput import worker  # the engine's bench code (one engine, one batch size)

    spec = {
        "engine": "dsr1", "model": str(model_dir), "shape": None, "config": config,
        "dtype": settings["dtype"], "device": settings["device"], "threads": settings["threads"],
        "batch_size": settings["batch_size"], "prompt_len": settings["prompt_len"],
        "new_tokens": settings["new_tokens"], "reps": settings["reps"],
    }
    got = worker(spec)
    return {k: round(float(got[k]), 2) for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s")}


def encoder_speed(
    model_dir: Path, config: dict[str, Any], settings: dict[str, Any], texts: list[str]
) -> dict[str, float]:
    """Sentences and tokens per second of a full encoder forward over ``batch_size`` sentences."""
    import torch

    from dsr1.auto import AutoModel

    device = settings["device"]
    torch.set_num_threads(int(settings["threads"]))
    model = AutoModel.from_pretrained(model_dir, config, dtype=settings["dtype"], device=device)
    if model.tokenizer is None:
        raise Dsr1Error(f"{model_dir} has no tokenizer.json; encoder speed needs one")
    b, t = int(settings["batch_size"]), int(settings["prompt_len"])
    # each row joins 8 held-out sentences, so truncation to t leaves t real tokens (no padding timed)
    batch = [" ".join(texts[(8 * i + j) % len(texts)] for j in range(8)) for i in range(b)]
    enc = model.tokenizer(batch, return_tensors="pt", padding="max_length", truncation=True, max_length=t)
    enc = enc.to(model.device)

    def timed() -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model(**enc)
        _sync(device)
        return time.perf_counter() - start

    timed()  # warm-up
    median = statistics.median(timed() for _ in range(int(settings["reps"])))
    return {"sentences_s": round(b / median, 2), "tokens_s": round(b * t / median, 2), "forward_s": round(median, 5)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsr1.benchmarks.pruning_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--strategy", default=None, help="pruning plugin named in the stage's engine config")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output")
    args = p.parse_args(argv)
    import torch

    from dsr1.models.loading import read_hf_config, resolve_model_dir
    from dsr1.pruning import data

    dense, stage = resolve_model_dir(args.dense), resolve_model_dir(args.stage)
    causal = read_hf_config(dense)["model_type"] != "bert"
    kind = "causal" if causal else "encoder"
    settings = {"device": "cpu", "dtype": "float32", "threads": args.threads, "batch_size": args.batch_size,
                "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "reps": args.reps}
    texts = [] if causal else data.sentences(data.split_documents()[1], 128)
    stage_cfg: dict[str, Any] = {"device": "cpu"}
    if args.strategy:
        stage_cfg["pruning"] = args.strategy

    def measure(path: Path, config: dict[str, Any]) -> dict[str, float]:
        if causal:
            return causal_speed(path, config, settings)
        return encoder_speed(path, config, settings, texts)

    dense_runs, stage_runs = [measure(dense, {"device": "cpu"})], []
    for r in range(args.rounds):
        stage_runs.append(measure(stage, stage_cfg))
        dense_runs.append(measure(dense, {"device": "cpu"}))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    metrics = ["prefill_tok_s", "decode_tok_s", "e2e_tok_s"] if causal else ["tokens_s", "sentences_s"]
    result: dict[str, Any] = {}
    for m in metrics:
        ratios = [s[m] / ((dense_runs[i][m] + dense_runs[i + 1][m]) / 2) for i, s in enumerate(stage_runs)]
        result[m] = {"dense_median": round(statistics.median(d[m] for d in dense_runs), 2),
                     "stage_median": round(statistics.median(s[m] for s in stage_runs), 2),
                     "ratio_median": round(statistics.median(ratios), 3),
                     "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3)}
    report = {
        "command": shlex.join(["python", "-m", "dsr1.benchmarks.pruning_speed",
                               *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "threads": args.threads},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "dense": str(args.dense), "stage": str(args.stage), "kind": kind, "headline": HEADLINE[kind],
        "settings": settings, "rounds": args.rounds, "result": result,
    }
    print(write_report(report, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
