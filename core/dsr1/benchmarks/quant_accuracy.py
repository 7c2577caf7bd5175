"""Accuracy of a quantized model: held-out perplexity, per-layer SQNR on live activations,
sentence-embedding cosine against fp32.

Held-out text: the split of the corpus ``dsr1-tiny`` was trained on (:mod:`dsr1.corpus`:
document ``i`` is held out when ``i % 10 == 9``), tokenized as its trainer did
(``<|bos|> text <|eos|>`` per document) and cut to the first ``max_tokens`` tokens.
Perplexity is token-level over non-overlapping ``window``-token windows, each scored on its
own, like ``tools/train_tiny.py``: one window is one forward (one *step* for ``dynamic``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsr1 import corpus
from dsr1.quantization.modules import QuantizedLinear

def heldout_documents() -> list[str]:
    """The held-out documents of dsr1-tiny's corpus (:mod:`dsr1.corpus`, shipped with dsr1)."""
    return corpus.split_documents()[1]


def heldout_ids(model_dir: Path, max_tokens: int) -> torch.Tensor:
    """The first ``max_tokens`` held-out token ids ``(N,)`` with the model's own tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    ids: list[int] = []
    for enc in tok.encode_batch(heldout_documents(), add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def heldout_sentences(count: int, min_chars: int = 40, max_chars: int = 200) -> list[str]:
    """The first ``count`` held-out sentences of prose: paragraphs joined, split after ". " (for encoders)."""
    out: list[str] = []
    for doc in heldout_documents():
        for paragraph in doc.split("\n\n"):
            if paragraph.lstrip().startswith((">>>", "...", "*", "=", "-", "+", "|")):
                continue  # code samples and tables
            text = " ".join(paragraph.split())
            for sentence in text.replace(". ", ".\n").splitlines():
                if min_chars <= len(sentence) <= max_chars and "**" not in sentence:
                    out.append(sentence)
                    if len(out) == count:
                        return out
    return out


@torch.no_grad()
def window_nll(model: Any, ids: torch.Tensor, window: int = 256) -> list[tuple[float, int]]:
    """``(sum of NLL, predicted tokens)`` of each non-overlapping window, in order."""
    out: list[tuple[float, int]] = []
    for start in range(0, ids.numel(), window):
        chunk = ids[start:start + window].unsqueeze(0)  # (1, T)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk).logits.float()  # (1, T, V)
        out.append((F.cross_entropy(logits[0, :-1], chunk[0, 1:].to(logits.device), reduction="sum").item(),
                    chunk.shape[1] - 1))
    return out


def perplexity(windows: Sequence[tuple[float, int]]) -> float:
    """``exp(total NLL / tokens)`` of :func:`window_nll` results."""
    nll, count = sum(w[0] for w in windows), sum(w[1] for w in windows)
    return math.exp(nll / max(count, 1))


def reference_linears(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """fp32 ``(weight, bias)`` of every ``nn.Linear`` of a full-precision model, by module name."""
    return {n: (m.weight.detach().float().contiguous(), m.bias.detach().float() if m.bias is not None else None)
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@contextmanager
def layer_sqnr(model: nn.Module, reference: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> Iterator[
        dict[str, float]]:
    """While active, each linear layer of ``model`` (quantized or not) compares its output with the fp32
    reference layer applied to the *same* input; on exit the dict holds each layer's SQNR (dB)."""
    stats: dict[str, list[float]] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        w, b = reference[name]

        def fn(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            x = args[0]
            expected = F.linear(x.float(), w.to(x.device), b.to(x.device) if b is not None else None)
            s = stats.setdefault(name, [0.0, 0.0])
            s[0] += expected.double().pow(2).sum().item()
            s[1] += (output.double() - expected.double()).pow(2).sum().item()

        return fn

    for name, module in model.named_modules():
        if name in reference and isinstance(module, (nn.Linear, QuantizedLinear)):
            handles.append(module.register_forward_hook(hook(name)))
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
        for name, (signal, noise) in stats.items():
            result[name] = round(10 * math.log10(signal / noise), 2) if noise > 0 else math.inf


@torch.no_grad()
def embedding_cosine(reference: Any, model: Any, texts: list[str]) -> dict[str, float]:
    """Cosine of each sentence embedding with the fp32 model's: mean and min over ``texts``."""
    a, b = reference.encode(texts).float(), model.encode(texts).float()  # (N, C), L2-normalized
    cos = F.cosine_similarity(a, b, dim=-1)
    return {"mean": round(cos.mean().item(), 6), "min": round(cos.min().item(), 6), "sentences": len(texts)}
