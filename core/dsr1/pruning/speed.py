"""Speed of a saved stage on the selected device, measured the way ``dsr1 bench`` measures.

Causal LMs go through the bench worker itself (:func:`dsr1.commands.bench._worker`, in this
process): the stage dir is loaded by ``AutoModel`` with the engine's normal options, one
warm-up ``generate``, then ``reps`` prefill-only and full generations with random prompt ids;
medians. Encoders have no ``generate``; :func:`encoder_speed` follows the same rules with a
full forward over a fixed batch of held-out sentences padded to ``seq_len`` tokens.

Every stage and the dense model are measured in the same run with the same settings, so the
figure to read is the ratio against dense (BENCHMARKS.md); the runner measures the dense model
again right before and right after each stage and divides by the mean of those two, so slow
drift of a shared machine cancels. On a busy 2-core machine, ``--threads 1`` gives steadier
figures than 2 threads fighting other processes.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dsr1.errors import Dsr1Error


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def causal_speed(model_dir: Path, config: dict[str, Any], settings: dict[str, Any]) -> dict[str, float]:
    """prefill / decode / end-to-end tokens per second of ``model_dir``, via the bench worker."""
    from dsr1.commands.bench import _worker  # the engine's bench code (one engine, one batch size)

    spec = {
        "engine": "dsr1", "model": str(model_dir), "shape": None, "config": config,
        "dtype": settings["dtype"], "device": settings["device"], "threads": settings["threads"],
        "batch_size": settings["batch_size"], "prompt_len": settings["prompt_len"],
        "new_tokens": settings["new_tokens"], "reps": settings["reps"],
    }
    got = _worker(spec)
    return {k: round(float(got[k]), 2) for k in ("prefill_tok_s", "decode_tok_s", "e2e_tok_s")}


def encoder_speed(
    model_dir: Path, config: dict[str, Any], settings: dict[str, Any], texts: list[str]
) -> dict[str, float]:
    """Sentences and tokens per second of a full encoder forward over ``batch_size`` sentences."""
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


#: The speed figure plotted and compared, per model kind.
HEADLINE = {"causal": "decode_tok_s", "encoder": "tokens_s"}
