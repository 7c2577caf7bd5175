"""The evaluation helpers behind bench/results/quant-*.json."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from dsr1.auto import AutoModel
from dsr1.benchmarks.quant_accuracy import layer_sqnr, perplexity, reference_linears, window_nll
from dsr1_sdk.testing.quant import tiny_llama_checkpoint


def test_perplexity_matches_a_direct_cross_entropy(tmp_path: Path) -> None:
    model = AutoModel.from_pretrained(tiny_llama_checkpoint(tmp_path / "m"))
    ids = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(0))
    windows = window_nll(model, ids, window=50)
    assert [w[1] for w in windows] == [49, 49]
    with torch.no_grad():
        logits = model(ids.view(2, 50)).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), ids.view(2, 50)[:, 1:].reshape(-1))
    assert math.isclose(perplexity(windows), math.exp(nll.item()), rel_tol=1e-5)


def test_layer_sqnr_on_live_inputs(tmp_path: Path) -> None:
    path = tiny_llama_checkpoint(tmp_path / "m")
    reference = reference_linears(AutoModel.from_pretrained(path))
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(1))
    fp32, int8_model = AutoModel.from_pretrained(path), AutoModel.from_pretrained(path, quant="int8")
    with layer_sqnr(fp32, reference) as same:
        fp32(ids)
    with layer_sqnr(int8_model, reference) as int8:
        int8_model(ids)
    assert len(same) == 9 and all(v > 100 for v in same.values())  # fp32 against itself: exact or nearly
    assert len(int8) == 9 and all(35 < v < 60 for v in int8.values())
