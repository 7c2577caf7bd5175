"""The ``tokenizers`` preprocess plugin and the config paths of ``from_pretrained``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsr1.auto import AutoModel, AutoTokenizer
from dsr1.config import EngineConfig
from dsr1.errors import Dsr1Error


def test_padding_sides_and_decode(ckpts: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(ckpts["llama"])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    enc = tok(["A function", "The for statement iterates"], return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert tok.padding_side == "left" and mask[0, 0] == 0 and mask[:, -1].all() and ids[0, 0] == 0
    assert ids[1, 0] == tok.bos_token_id  # the post-processor's BOS
    right = AutoTokenizer.from_pretrained(ckpts["llama"], padding_side="right")
    assert right(["A function", "The for statement iterates"], return_tensors="pt")["attention_mask"][0, -1] == 0
    assert tok.batch_decode(ids, skip_special_tokens=True) == ["A function", "The for statement iterates"]
    assert tok.decode(ids[1]).startswith("<s>")
    single = tok("输入文本")
    assert isinstance(single["input_ids"], list) and tok.decode(single["input_ids"], skip_special_tokens=True) == "输入文本"
    assert "token_type_ids" not in enc and enc.input_ids is ids
    with pytest.raises(Dsr1Error, match="need padding=True"):
        tok(["a", "a much longer text"], return_tensors="pt", padding=False)


def test_chat_template_renders_in_a_sandbox(ckpts: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(ckpts["llama"])
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|user|>hi</s><|assistant|>"
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    assert enc["input_ids"].shape[0] == 1 and tok.decode(enc["input_ids"][0]) == text
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(Dsr1Error, match="sandbox forbids: access to attribute '__class__'"):
        tok.apply_chat_template(messages, chat_template=evil, tokenize=False)
    with pytest.raises(Exception, match="immutable|unsafe|not safely"):
        tok.apply_chat_template(messages, chat_template="{{ messages.append(1) }}", tokenize=False)
    with pytest.raises(Dsr1Error, match="chat template error: nope"):
        tok.apply_chat_template(messages, chat_template="{{ raise_exception('nope') }}", tokenize=False)


def test_config_forms_and_overrides(ckpts: dict[str, Path], tmp_path: Path) -> None:
    path = ckpts["llama"]
    yaml_file = tmp_path / "engine.yaml"
    yaml_file.write_text("attention: engine-test-sdpa\nscheduler:\n  name: static\n  options: {max_batch_size: 3}\n")
    toml_file = tmp_path / "engine.toml"
    toml_file.write_text('attention = "engine-test-nogqa"\n')
    for config, attention in [
        (EngineConfig(attention="engine-test-sdpa"), "engine-test-sdpa"),
        ({"attention": "engine-test-nogqa"}, "engine-test-nogqa"),
        (str(yaml_file), "engine-test-sdpa"),
        (toml_file, "engine-test-nogqa"),
    ]:
        model = AutoModel.from_pretrained(path, config)
        assert model.pipeline.describe()["attention"]["name"] == attention
    model = AutoModel.from_pretrained(path, yaml_file, attention="sdpa")  # keyword overrides win
    assert model.pipeline.describe()["attention"]["name"] == "sdpa"
    assert model.pipeline.scheduler.options.max_batch_size == 3
    with pytest.raises(Dsr1Error, match="unknown config key 'atention'; did you mean 'attention'"):
        AutoModel.from_pretrained(path, atention="sdpa")
    with pytest.raises(Dsr1Error, match="no attention plugin named 'nope'"):
        AutoModel.from_pretrained(path, attention="nope")


def test_quant_policy_sets_compute_dtype(ckpts: dict[str, Path]) -> None:
    installed = AutoModel.from_pretrained(ckpts["llama"]).pipeline.registry.names("quant")
    if "bf16" not in installed:
        pytest.skip("dsr1-quant-float is not installed")
    model = AutoModel.from_pretrained(ckpts["llama"], quant="bf16")
    assert model.dtype == torch.bfloat16
    out = model.generate(torch.tensor([[1, 40, 41]]), max_new_tokens=4, ignore_eos=True)
    assert out.shape == (1, 7)
    assert all(k.dtype == torch.bfloat16 for k in model.pipeline.kvcache.k)  # one buffer per layer


def test_generation_defaults_from_the_checkpoint(ckpts: dict[str, Path]) -> None:
    model = AutoModel.from_pretrained(ckpts["llama"])
    gen_cfg = json.loads((ckpts["llama"] / "generation_config.json").read_text())
    assert model.generation_defaults["eos_token_id"] == [gen_cfg["eos_token_id"]]
    assert model.generation_defaults["pad_token_id"] == 0
