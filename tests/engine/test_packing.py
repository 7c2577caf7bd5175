"""The CPU ``auto`` layout: oneDNN-packed linear weights while generating 2+ rows, ``kn`` for one row."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsr1.auto import AutoModel
from dsr1.models.packing import OnednnLinear

from .conftest import hf_model, padded_batch


def _decoder_linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]


def test_packing_follows_the_batch_and_keeps_the_numerics(ckpts: dict[str, Path]) -> None:
    enc = padded_batch(ckpts["qwen2"])  # qkv bias: the packed call takes a bias too
    model = AutoModel.from_pretrained(ckpts["qwen2"])
    ref = hf_model(ckpts["qwen2"])
    before = dict(model.hf_state_dict())
    assert all(type(m) is nn.Linear for m in _decoder_linears(model))

    got = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=16)  # batch 4: packs
    assert all(type(m) is OnednnLinear and m.weight.is_mkldnn for m in _decoder_linears(model))
    assert type(model.lm_head) is nn.Linear  # the output head stays kn
    with torch.inference_mode():
        want = ref.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)
        real = enc["attention_mask"].bool()
        torch.testing.assert_close(model(**enc).logits[real], ref(**enc).logits[real], atol=1e-4, rtol=0)
    assert torch.equal(got, want)
    packed = dict(model.hf_state_dict())  # plain (out, in) tensors, bit for bit
    assert packed.keys() == before.keys()
    assert all(not t.is_mkldnn and torch.equal(t, before[n]) for n, t in packed.items())

    model.generate(enc["input_ids"][:1], max_new_tokens=2)  # batch 1: back to kn
    for m in _decoder_linears(model):
        assert type(m) is nn.Linear and not m.weight.is_mkldnn and m.weight.t().is_contiguous()  # (in, out) storage
    assert all(torch.equal(t, before[n]) for n, t in model.hf_state_dict())


def test_explicit_layouts_never_pack(ckpts: dict[str, Path]) -> None:
    enc = padded_batch(ckpts["llama"])
    for layout in ("kn", "nk"):
        model = AutoModel.from_pretrained(ckpts["llama"], {"model": {"name": "llama", "options": {"weight_layout": layout}}})
        model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=2)
        assert not any(type(m) is OnednnLinear for m in model.modules())
