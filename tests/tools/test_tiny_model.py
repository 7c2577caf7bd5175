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


def test_unknown_attention_is_refused() -> None:
    assert train_tiny.parse_args(["--output-dir", "x", "--attention", "linear"]).attention == "linear"
    with pytest.raises(SystemExit):
        train_tiny.parse_args(["--output-dir", "x", "--attention", "performer"])


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


def test_train_script_linear_attention(tmp_path: Path, torch_globals: None) -> None:
    """``--attention linear``: the config declares it, dsr1 selects it, and dsr1's logits are the trained model's."""
    pytest.importorskip("dsr1_attention_linear")
    from dsr1.auto import AutoModel

    out = tmp_path / "tiny-linear"
    train_tiny.main(["--output-dir", str(out), "--steps", "2", "--tiny-config-for-tests", "--attention", "linear"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dsr1_attention"] == "linear" and "_attn_implementation" not in cfg
    card = json.loads((out / "dsr1_tiny.json").read_text())
    assert card["attention"] == "linear" and card["name"] == "dsr1-tiny-linear"
    assert math.isfinite(card["heldout_perplexity"])
    ours = AutoModel.from_pretrained(out)
    assert type(ours.pipeline.attention).__name__ == "LinearAttention"
    trained = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation=train_tiny.use_attention("linear"))
    ids = torch.randint(0, cfg["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(ours(ids).logits, trained(input_ids=ids).logits, atol=1e-4, rtol=0)


LINEAR_ASSET = ROOT / "core" / "dsr1" / "assets" / "dsr1-tiny-linear"


def test_linear_asset_loads_with_linear_attention_and_generates(card: dict) -> None:
    """The committed dsr1-tiny-linear: selected by name, linear attention, text out, perplexity as recorded."""
    from dsr1.auto import AutoModel

    for name in FILES:
        assert (LINEAR_ASSET / name).is_file(), name
    assert (LINEAR_ASSET / "model.safetensors").stat().st_size <= 30 * 2**20
    linear_card = json.loads((LINEAR_ASSET / "dsr1_tiny.json").read_text())
    assert linear_card["attention"] == "linear"
    for key in ("steps", "batch_size", "seq_len", "lr", "warmup", "seed", "train_tokens", "heldout_tokens"):
        assert linear_card[key] == card[key], key  # same data and hyperparameters as dsr1-tiny
    model = AutoModel.from_pretrained("dsr1-tiny-linear")
    assert type(model.pipeline.attention).__name__ == "LinearAttention"
    tok = model.tokenizer
    ids = torch.tensor([tok.encode("The Python interpreter")])
    out = model.generate(ids, max_new_tokens=20)
    text = tok.decode(out[0].tolist(), skip_special_tokens=True)
    assert text.startswith("The Python interpreter") and len(text) > len("The Python interpreter") + 10
    from tokenizers import Tokenizer

    heldout = train_tiny.encode_stream(Tokenizer.from_file(str(LINEAR_ASSET / "tokenizer.json")),
                                       tiny_corpus.split_documents()[1])[:1024]
    ppl = train_tiny.heldout_perplexity(lambda x: model(x).logits, heldout, 256)
    assert ppl < 0.5 * linear_card["config"]["vocab_size"], ppl
