"""Fixtures of the engine tests: test plugins, a tiny BPE tokenizer, tiny random checkpoints.

The default attention (``sdpa``) and device (``cpu``) plugins live in their own
distributions. While those are not installed, a test-only distribution registers
look-alikes under the same names, so ``AutoModel.from_pretrained(path)`` runs unchanged;
once they are installed the tests run against them.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
PLUGIN_DIR = HERE / "_plugins"

SENTENCES = [
    "The Python interpreter reads a program and runs it one statement at a time.",
    "A function is defined with def and returns a value with return.",
    "Lists, tuples and dictionaries are the built-in containers of Python.",
    "An exception is raised when an error happens and can be caught with try.",
    "The for statement iterates over the items of any sequence in order.",
    "Modules group related code; import loads a module by its name.",
    "输入文本 is Chinese for input text, and tokenizers handle it as bytes.",
]


def _installed(group: str) -> set[str]:
    import importlib_metadata

    return {ep.name for ep in importlib_metadata.entry_points(group=group)}


@pytest.fixture(scope="package", autouse=True)
def engine_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Register the test plugin distribution and isolate caches; undone after this package."""
    site = tmp_path_factory.mktemp("site")
    provide = []
    if "sdpa" not in _installed("dsr1.attention"):
        provide.append("sdpa")
    if "cpu" not in _installed("dsr1.device"):
        provide.append("cpu")
    lines = ["[dsr1.attention]", "engine-test-nogqa = dsr1_engine_testplugins",
             "engine-test-sdpa = dsr1_engine_testplugins"]
    if "sdpa" in provide:
        lines.append("sdpa = dsr1_engine_testplugins")
    lines += ["[dsr1.device]", "engine-test-device = dsr1_engine_testplugins"]
    if "cpu" in provide:
        lines.append("cpu = dsr1_engine_testplugins")
    info = site / "dsr1_engine_testplugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dsr1-engine-testplugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    saved_env = dict(os.environ)
    os.environ.update({
        "DSR1_ENGINE_TEST_PROVIDE": ",".join(provide),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DSR1_HOME": str(tmp_path_factory.mktemp("dsr1home")),
        "HF_HUB_CACHE": str(tmp_path_factory.mktemp("hfcache")),
        "PYTHONPATH": os.pathsep.join([str(site), str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]),
    })
    for var in ("DSR1_PLUGINS", *[f"DSR1_{f.upper()}" for f in ("attention", "device", "quant", "graph")]):
        os.environ.pop(var, None)
    sys.path[:0] = [str(site), str(PLUGIN_DIR)]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield site
    sys.path.remove(str(site))
    sys.path.remove(str(PLUGIN_DIR))
    os.environ.clear()
    os.environ.update(saved_env)


# --- tiny tokenizer + checkpoints ------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tokenizer(out: Path, vocab_size: int = 400, added: tuple[str, ...] = (),
                    chat_template: str = CHAT_TEMPLATE) -> int:
    """Train a byte-level BPE on a few sentences (``added``: extra non-special tokens, e.g. thinking
    markers); returns its vocab size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    if added:
        tok.add_tokens([AddedToken(t, special=False) for t in added])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 128,
        "chat_template": chat_template,
    }))
    return int(tok.get_vocab_size())


#: prompts of four different lengths: padded together they exercise left padding.
PROMPTS = [
    "The Python interpreter reads a program",
    "A function",
    "Lists, tuples and dictionaries are the built-in containers of Python, and for iterates",
    "An exception is raised when",
]


def padded_batch(path: Path) -> dict[str, torch.Tensor]:
    """:data:`PROMPTS` tokenized by the checkpoint's tokenizer: left-padded, every row a different length."""
    from dsr1.auto import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(path)(PROMPTS, return_tensors="pt", padding=True)
    lengths = enc["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == len(PROMPTS) and enc["attention_mask"][:, 0].eq(0).any()
    return dict(enc)


TINY: dict[str, dict[str, Any]] = {
    "llama": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", extra=dict(
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", extra=dict(tie_word_embeddings=False)),
    "qwen2-tied": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", extra=dict(tie_word_embeddings=True)),
    "mistral": dict(cls="MistralForCausalLM", cfg="MistralConfig", extra=dict(sliding_window=6, head_dim=16)),
    # norms drawn away from 1 (transformers initialises them to ones): a q/k norm loaded wrong shows
    "qwen3": dict(cls="Qwen3ForCausalLM", cfg="Qwen3Config", extra=dict(tie_word_embeddings=False, head_dim=16),
                  noisy_norms=True),
    # layer 0 MoE (8 experts, top 2, renormalised), layer 1 dense (mlp_only_layers)
    "qwen3_moe": dict(cls="Qwen3MoeForCausalLM", cfg="Qwen3MoeConfig", noisy_norms=True, extra=dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[1])),
    # MLA with a q LoRA, YaRN rope, grouped sigmoid routing with a correction bias, a dense first layer
    "deepseek_v3": dict(cls="DeepseekV3ForCausalLM", cfg="DeepseekV3Config", noisy_norms=True, extra=dict(
        num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
        moe_intermediate_size=32, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                      "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1})),
    # MLA without a q LoRA (V2-Lite), softmax routing limited to the best groups, two shared experts
    "deepseek_v2": dict(cls="DeepseekV2ForCausalLM", cfg="DeepseekV2Config", noisy_norms=True, extra=dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, n_shared_experts=2, moe_intermediate_size=32, first_k_dense_replace=1,
        routed_scaling_factor=1.5)),
}


def make_checkpoint(out: Path, kind: str, vocab: int = 400, seed: int = 0, tokenizer: bool = True,
                    layers: int = 2) -> Path:
    """A random-weight transformers model saved with ``save_pretrained`` (safetensors)."""
    import transformers

    spec = TINY[kind]
    args: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg = getattr(transformers, spec["cfg"])(**{**args, **spec["extra"]})
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(cfg).eval()
    if spec.get("noisy_norms"):  # also the MoE routers: transformers zeroes their bias, and ties pick arbitrarily
        with torch.no_grad():
            for name, p in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
                elif name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
                    p.normal_(0.0, 0.5)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer:
        write_tokenizer(out)
    return out


@pytest.fixture(scope="package")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: make_checkpoint(root / kind, kind) for kind in TINY}


def hf_model(path: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="sdpa").eval()
