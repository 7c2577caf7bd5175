"""Text for pruning: held-out evaluation text and calibration text, as token tensors.

Default source: the corpus ``dsr1-tiny`` was trained on, shipped with dsr1 (:mod:`dsr1.corpus`:
CPython's ``pydoc_data.topics`` and standard-library docstrings; document ``i`` is held out when
``i % 10 == 9``). Evaluation always reads the **held-out** split; default calibration reads the
**training** split, so the two never overlap. ``--calibration FILE`` replaces the calibration text
(UTF-8, any length ≥ a few dozen tokens); ``--eval-text FILE`` replaces the held-out text.

Causal LMs: each document is tokenized as ``<bos> text <eos>`` and the documents are concatenated
(as ``tools/train_tiny.py`` does), giving a stream ``(N,)``; evaluation uses its first
``eval_tokens`` tokens in non-overlapping windows, calibration ``samples`` windows of ``seq_len``
tokens taken at evenly spaced offsets. Encoders: sentences (split on sentence ends, 30–300
characters) instead of a stream.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from dsr1 import corpus
from dsr1.errors import Dsr1Error

#: What the report says the default text is.
DEFAULT_SOURCE = f"{corpus.SOURCE}: held-out split for evaluation, training split for calibration"


def split_documents() -> tuple[list[str], list[str]]:
    """``(train_docs, heldout_docs)`` of the default corpus."""
    return corpus.split_documents()


def read_text_file(path: str | Path, what: str) -> str:
    """The text of ``path`` (one-line errors for a missing, unreadable or empty file)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise Dsr1Error(f"{what} file {str(path)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise Dsr1Error(f"{what} file {str(path)!r} is not UTF-8 text") from None
    if not text.strip():
        raise Dsr1Error(f"{what} file {str(path)!r} is empty")
    return text


def documents(path: str | Path | None, heldout: bool, what: str) -> list[str]:
    """A file's text as one document, or the default split."""
    if path is not None:
        return [read_text_file(path, what)]
    train, held = split_documents()
    return held if heldout else train


# --- causal LMs: token streams -----------------------------------------------------------------


def token_stream(tokenizer: Any, docs: list[str], limit: int | None = None) -> torch.Tensor:
    """``<bos> doc <eos>`` for each document, concatenated; ``(N,)`` int64, at most ``limit`` tokens."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids += ([bos] if bos is not None else []) + tokenizer.encode(doc, add_special_tokens=False)
        ids += [eos] if eos is not None else []
        if limit is not None and len(ids) >= limit:
            break
    return torch.tensor(ids[:limit] if limit is not None else ids, dtype=torch.long)


def windows(stream: torch.Tensor, samples: int, seq_len: int) -> list[torch.Tensor]:
    """``samples`` windows ``(1, seq_len)`` at evenly spaced offsets of ``stream`` (fewer if it is short)."""
    n = stream.numel()
    if n <= seq_len:
        return [stream[None]] if n >= 2 else []
    room = n - seq_len
    count = max(1, min(samples, n // seq_len))
    starts = sorted({round(i * room / max(count - 1, 1)) for i in range(count)})
    return [stream[s : s + seq_len][None] for s in starts]  # each (1, seq_len)


# --- encoders: sentences -------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(docs: list[str], limit: int) -> list[str]:
    """Up to ``limit`` sentences of 30–300 characters (whitespace collapsed), in document order."""
    out: list[str] = []
    for doc in docs:
        for piece in _SENTENCE_END.split(doc):
            s = " ".join(piece.split())
            if 30 <= len(s) <= 300 and any(c.isalpha() for c in s):
                out.append(s)
                if len(out) >= limit:
                    return out
    return out


def calibration_sentences(path: str | Path | None, limit: int, min_count: int = 4) -> list[str]:
    """Calibration sentences for an encoder (training split by default)."""
    found = sentences(documents(path, heldout=False, what="calibration"), limit)
    if len(found) < min_count:
        raise Dsr1Error(
            f"calibration text {str(path)!r} holds {len(found)} usable sentence(s) (30-300 characters); "
            f"at least {min_count} are needed"
        )
    return found


def calibration_windows(
    path: str | Path | None, tokenizer: Any, samples: int, seq_len: int, min_tokens: int = 32
) -> list[torch.Tensor]:
    """Calibration windows ``(1, seq_len)`` for a causal LM (training split by default)."""
    docs = documents(path, heldout=False, what="calibration")
    stream = token_stream(tokenizer, docs, limit=samples * seq_len * 4)
    where = "the default calibration text" if path is None else f"calibration text {str(path)!r}"
    if stream.numel() < min_tokens:
        raise Dsr1Error(f"{where} is too short: {stream.numel()} tokens, at least {min_tokens} are needed")
    return windows(stream, samples, seq_len)


def heldout_stream(path: str | Path | None, tokenizer: Any, tokens: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the held-out text ``(N,)``."""
    stream = token_stream(tokenizer, documents(path, heldout=True, what="evaluation"), limit=tokens)
    if stream.numel() < 2:
        raise Dsr1Error(f"evaluation text {str(path)!r} holds fewer than 2 tokens")
    return stream
