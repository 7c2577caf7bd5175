"""A prompt's greedy output does not depend on what else is in its batch (issue 19, class 3).

dsr1-tiny generates each prompt alone and inside left-padded batches with prompts of other
lengths, for every KV cache; the compressing caches get budgets small enough that they evict
during the prompt and while decoding. Before the fix, ``heavy-hitter`` with a fractional budget
counted a row's left padding as written tokens and kept more of the short prompts in a batch.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.kvcache.evicting import EvictingKVCache

PROMPTS = (
    "The Python interpreter reads a program and runs it one statement at a time, and",
    "A function is defined with",
    "Lists, tuples and dictionaries are the built-in containers of Python; the for statement",
    "import",
)
NEW = 16

CACHES: dict[str, dict[str, Any]] = {
    "heavy-hitter-fraction": {"name": "heavy-hitter", "options": {"budget": 0.3, "recent": 3}},
    "heavy-hitter-count": {"name": "heavy-hitter", "options": {"budget": 6, "recent": 2}},
    "streaming": {"name": "streaming", "options": {"sinks": 2, "window": 5}},
    "contiguous": {"name": "contiguous"},
    "paged": {"name": "paged", "options": {"block_size": 4}},
    "int8": {"name": "int8"},
}


@pytest.mark.parametrize("cache", list(CACHES))
def test_prompt_alone_equals_prompt_in_padded_batch(cache: str) -> None:
    model = AutoModel.from_pretrained("dsr1-tiny", kvcache=CACHES[cache])
    tok = model.tokenizer
    alone = [model.generate(tok(p, return_tensors="pt")["input_ids"], max_new_tokens=NEW, ignore_eos=True)[0, -NEW:]
             for p in PROMPTS]
    for order in (PROMPTS, PROMPTS[::-1], PROMPTS[1:3]):
        enc = tok(list(order), return_tensors="pt")  # left-padded to the longest
        assert not bool(enc["attention_mask"].all())
        out = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=NEW, ignore_eos=True)
        for row, prompt in enumerate(order):
            want = alone[PROMPTS.index(prompt)]
            assert torch.equal(out[row, -NEW:], want), (
                f"{cache}: {prompt!r} in a batch of {len(order)} gives {tok.decode(out[row, -NEW:])!r}, "
                f"alone {tok.decode(want)!r}"
            )
    kv = model.pipeline.kvcache
    if isinstance(kv, EvictingKVCache):  # the budget was small enough to evict
        kept = kv.kept_positions(0)  # (B, n), -1 where a row holds no token
        written = int(enc["attention_mask"][0].sum()) + NEW - 1
        assert int((kept[0] >= 0).sum()) < written
