"""The text ``dsr1-tiny`` was trained on, shipped with dsr1: the default text of ``prune`` and ``quantize``.

``tools/tiny_corpus.py`` builds the corpus from CPython's own docs and docstrings; the text depends on
the CPython version, so dsr1 ships the documents the model was trained on as package data
(``dsr1/assets/tiny-corpus.json.gz``, written by ``python tools/tiny_corpus.py --write-asset``) rather
than rebuilding them: the default text then works in any install (no checkout) and is the same on
every Python. Document ``i`` is held out when ``i % 10 == 9``; evaluation reads the held-out split,
default calibration the training split, so the two never overlap.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from dsr1.errors import Dsr1Error

#: The shipped documents, with the corpus record of ``tools/tiny_corpus.py:corpus_info``.
ASSET = Path(__file__).resolve().parent / "assets" / "tiny-corpus.json.gz"
HELDOUT_EVERY = 10  # document i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY - 1

#: What reports say the default text is.
SOURCE = "dsr1-tiny corpus (shipped with dsr1, built by tools/tiny_corpus.py)"


@lru_cache(maxsize=1)
def _load() -> tuple[dict[str, object], tuple[str, ...]]:
    if not ASSET.is_file():
        raise Dsr1Error(f"dsr1's default text {ASSET} is missing (a broken install: reinstall dsr1), "
                        "or pass your own text file")
    try:
        payload = json.loads(gzip.decompress(ASSET.read_bytes()))
        return dict(payload["corpus"]), tuple(str(d) for d in payload["documents"])
    except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
        raise Dsr1Error(f"dsr1's default text {ASSET} cannot be read ({type(err).__name__}); reinstall dsr1") from None


def info() -> dict[str, object]:
    """Sizes, hashes and the Python version the shipped corpus was built with."""
    return dict(_load()[0])


def documents() -> tuple[str, ...]:
    """All documents in corpus order."""
    return _load()[1]


def split(docs: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(train_docs, heldout_docs)``: document ``i`` is held out when ``i % 10 == 9``."""
    train: list[str] = []
    heldout: list[str] = []
    for i, doc in enumerate(docs):
        (heldout if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).append(doc)
    return train, heldout


def split_documents() -> tuple[list[str], list[str]]:
    """The shipped corpus's :func:`split`."""
    return split(documents())
