"""The bundled ``dsr1-tiny`` model, its corpus and its training script (``tools/``)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "core" / "dsr1" / "assets" / "dsr1-tiny"
FILES = (
    "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "dsr1_tiny.json", "README.md",
)
sys.path.insert(0, str(ROOT / "tools"))

import tiny_corpus  # noqa: E402  (tools/ is not a package)
import train_tiny  # noqa: E402

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads((ASSET / "dsr1_tiny.json").read_text())


def test_committed_files_present_and_small() -> None:
    for name in FILES:
        assert (ASSET / name).is_file(), name
    assert (ASSET / "model.safetensors").stat().st_size <= 30 * 2**20


def test_config_is_llama_fp32(card: dict) -> None:
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "float32"
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1, 2)
    assert card["parameters"] < 10_000_000 and card["seed"] == 0


def test_tokenizer_round_trips_and_templates() -> None:
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(ASSET)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    text = tiny_corpus.heldout_text()[:2000] + "\n  tabs\tand ünïcödé 世界 🙂 \r\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|>user: hi\nassistant:"


def test_model_loss_far_below_uniform(card: dict) -> None:
    model = transformers.LlamaForCausalLM.from_pretrained(ASSET).eval()
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(ASSET)
    vocab = model.config.vocab_size
    ppl = card["heldout_perplexity"]
    assert math.isfinite(ppl) and 1.0 < ppl < vocab
    ids = train_tiny.encode_stream(tok.backend_tokenizer, tiny_corpus.split_documents()[1][:2])[:512]
    loss = math.log(train_tiny.heldout_perplexity(lambda x: model(input_ids=x).logits, ids, 256))
    assert loss < 0.6 * math.log(vocab), (loss, math.log(vocab))


def test_corpus_split_deterministic_and_disjoint(card: dict) -> None:
    train, heldout = tiny_corpus.split_documents()
    assert len(heldout) >= 10 and len(train) >= 9 * len(heldout)
    assert not set(train) & set(heldout)
    tiny_corpus.documents.cache_clear()  # rebuild from scratch in a fresh interpreter
    info = tiny_corpus.corpus_info()
    if info["python_version"] != card["corpus"]["python_version"]:
        pytest.skip("docstrings differ between CPython versions")
    assert (info["train_sha256"], info["heldout_sha256"]) == (
        card["corpus"]["train_sha256"], card["corpus"]["heldout_sha256"],
    )


def test_attention_other_than_softmax_is_refused() -> None:
    with pytest.raises(SystemExit):
        train_tiny.parse_args(["--output-dir", "x", "--attention", "linear"])


@pytest.fixture
def torch_globals() -> Iterator[None]:
    """``train_tiny.main`` sets the thread count and deterministic mode; put them back afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


def test_train_script_end_to_end(tmp_path: Path, torch_globals: None) -> None:
    out = tmp_path / "tiny"
    train_tiny.main(["--output-dir", str(out), "--steps", "2", "--tiny-config-for-tests"])
    for name in FILES:
        assert (out / name).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no temporary directory left behind
    card = json.loads((out / "dsr1_tiny.json").read_text())
    assert card["steps"] == 2 and math.isfinite(card["heldout_perplexity"])
    model = transformers.LlamaForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1
    assert torch.isfinite(model.lm_head.weight).all()
