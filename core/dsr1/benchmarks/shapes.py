"""Built-in model shapes and random weights for them: what ``--shape NAME --random-weights`` builds.

Every benchmark that needs a model without a checkpoint on disk uses these, so two benchmarks of
one shape run on identical weights: each tensor comes from its own generator seeded by its name
(normal, std 0.02; norm weights 1), never zeros.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "tiny-125m": {
        "model_type": "llama", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "num_key_value_heads": 4, "intermediate_size": 2048, "vocab_size": 32000, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "architectures": ["LlamaForCausalLM"],
    },
    "qwen2-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "use_sliding_window": False,
        "architectures": ["Qwen2ForCausalLM"],
    },
    "llama3-8b": {
        "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": 128001, "hidden_act": "silu", "architectures": ["LlamaForCausalLM"],
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    # DeepSeek-V2-Lite's config.json: MLA (kv_lora_rank 512, no q LoRA), 64 routed + 2 shared experts, 6 active
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2", "hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "intermediate_size": 10944, "moe_intermediate_size": 1408, "vocab_size": 102400,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001, "hidden_act": "silu",
        "architectures": ["DeepseekV2ForCausalLM"],
    },
}


class RandomWeights:
    """A reader of random tensors: each one from its own generator seeded by its name."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: Any, device: Any, seed: int = 0) -> None:
        self.shapes, self.dtype, self.device, self.seed = shapes, dtype, device, seed
        self.model_dir = Path("<random weights>")

    def names(self) -> set[str]:
        return set(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def float_dtype(self) -> Any:
        return self.dtype

    def tensor(self, name: str) -> Any:
        import torch

        shape = self.shapes[name]
        if name.endswith(("norm.weight", "layernorm.weight")):
            return torch.ones(shape, dtype=self.dtype, device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed ^ zlib.crc32(name.encode()))
        t = torch.empty(shape, dtype=torch.float32, device=self.device).normal_(0.0, 0.02, generator=gen)
        return t.to(self.dtype)

    def read(self, name: str, dtype: Any, device: Any) -> Any:
        t = self.tensor(name)
        return t.to(dtype=dtype or t.dtype, device=device)


def random_weights(shape: str, dtype: Any, device: Any) -> tuple[dict[str, Any], RandomWeights]:
    """The HF config of a built-in ``shape`` and a reader of random weights for it."""
    from dsr1.errors import Dsr1Error, did_you_mean
    from dsr1.models.deepseek import DeepseekArgs
    from dsr1.models.llama import LlamaArgs

    if shape not in SHAPES:
        raise Dsr1Error(f"unknown shape {shape!r}" + did_you_mean(shape, SHAPES))
    hf = dict(SHAPES[shape])
    args = DeepseekArgs if hf["model_type"].startswith("deepseek") else LlamaArgs
    return hf, RandomWeights(args.from_hf(hf).hf_tensor_shapes(), dtype, device)


def build_random(builder: Any, hf: dict[str, Any], reader: RandomWeights, pipeline: Any) -> Any:
    """``builder``'s model of ``hf`` on ``reader``'s weights (one-line error for a builder that only loads
    checkpoints: ``build_from`` is optional on a model builder)."""
    from dsr1.errors import Dsr1Error

    build_from = getattr(builder, "build_from", None)
    if build_from is None:
        raise Dsr1Error(f"model builder {type(builder).__name__} cannot build from random weights")
    return build_from(hf, reader, pipeline)
