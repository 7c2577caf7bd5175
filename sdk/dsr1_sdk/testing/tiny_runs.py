"""Tiny end-to-end runs for the kits whose plugins only show in generated tokens (graph, monitor).

:func:`tokens` loads a tiny random llama (:func:`~dsr1_sdk.testing.pruning_models.tiny_checkpoint`)
with one family's plugin chosen and generates a left-padded batch of two prompts, greedily and
with a seeded sampler, so the kits can compare a plugin's run with the builtin's bit for bit.
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import torch

from dsr1_sdk.testing.pruning_models import tiny_checkpoint

#: two prompts of different lengths (the shorter one left-padded with 0) and their attention mask.
PROMPTS = torch.tensor([[5, 17, 33, 9, 71, 42, 8], [0, 0, 0, 64, 12, 99, 7]])  # (2, 7)
MASK = (PROMPTS != 0).long()  # (2, 7)


def load(model_dir: Path, family: str, name: str, options: dict[str, Any] | None = None) -> Any:
    """The tiny model with ``family``'s plugin ``name`` (its ``options``) on the CPU, in float32."""
    from dsr1.auto import AutoModel

    config: dict[str, Any] = {"device": "cpu", "attention": "sdpa", family: {"name": name, "options": options or {}}}
    return AutoModel.from_pretrained(model_dir, config, dtype="float32")


def tokens(model: Any, new: int = 8) -> dict[str, torch.Tensor]:
    """Greedy and seeded-sampled generations of :data:`PROMPTS` (``(2, 7 + new)`` each)."""
    common: dict[str, Any] = {"attention_mask": MASK, "max_new_tokens": new, "ignore_eos": True, "pad_token_id": 0}
    with torch.inference_mode():
        greedy = model.generate(PROMPTS, **common)
        sampled = model.generate(PROMPTS, do_sample=True, temperature=0.9, top_k=20, seed=1234, **common)
    return {"greedy": greedy, "sampled": sampled}


def checkpoint(root: Path) -> Path:
    """A tiny random llama checkpoint under ``root`` (written once per directory)."""
    directory = root / "tiny-llama"
    return directory if (directory / "config.json").exists() else tiny_checkpoint(directory, "llama")


@functools.lru_cache(maxsize=8)
def _builtin_tokens(family: str, name: str, new: int) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory(prefix="dsr1-kit-") as root:
        return tokens(load(checkpoint(Path(root)), family, name), new)


def builtin_tokens(family: str, name: str, new: int = 8) -> dict[str, torch.Tensor]:
    """:func:`tokens` with a builtin plugin (the reference), computed once per process."""
    return {k: v.clone() for k, v in _builtin_tokens(family, name, new).items()}
