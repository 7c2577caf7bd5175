"""Tiny random llama-family checkpoints for the tensor-parallel tests (a copy of the few lines of
tests/engine/conftest.py they need: that package's autouse fixture is not wanted here), the one
two-rank spawn that the lockstep, tensor-parallel and quantized/MoE tensor-parallel modules share, and
the ranks-against-one-process comparison of the tensor- and pipeline-parallel modules."""
from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

#: transformers class, config class and the settings that make each family differ.
TINY: dict[str, dict[str, Any]] = {
    "llama": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", extra=dict(
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    # one KV head for two ranks: replicated
    "llama-kv1": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", extra=dict(num_key_value_heads=1)),
    # qkv bias sharded with its rows; a vocabulary that does not split evenly (padded last shard)
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", extra=dict(tie_word_embeddings=False), vocab=401),
    "qwen2-tied": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", extra=dict(tie_word_embeddings=True)),
    "mistral": dict(cls="MistralForCausalLM", cfg="MistralConfig", extra=dict(sliding_window=6, head_dim=16)),
    # quantized tensor parallelism: every shard fits int4 group 32 on the CPU (inputs 32 and 64, outputs in
    # multiples of 16: vocabulary 512 → 256 rows a rank) and fp8 (multiples of 16)
    "qwen3": dict(cls="Qwen3ForCausalLM", cfg="Qwen3Config", extra=dict(intermediate_size=128, head_dim=16,
                                                                          tie_word_embeddings=False), vocab=512),
    # expert parallelism: 4 experts, 2 a token; layer 1 keeps a dense MLP (sharded as the llama ones)
    "qwen3-moe": dict(cls="Qwen3MoeForCausalLM", cfg="Qwen3MoeConfig", extra=dict(
        head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[1], tie_word_embeddings=False)),
}


def make_checkpoint(out: Path, kind: str, seed: int = 0, **overrides: Any) -> Path:
    """A random-weight transformers model saved with ``save_pretrained`` (safetensors); ``overrides``
    change its config (``num_hidden_layers=3``)."""
    import transformers

    spec = TINY[kind]
    args: dict[str, Any] = dict(
        vocab_size=spec.get("vocab", 400), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.15,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cfg = getattr(transformers, spec["cfg"])(**{**args, **spec["extra"], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(cfg).eval()
    with torch.no_grad():  # norms away from 1 (transformers initialises them to ones): a norm loaded wrong shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_tokenizer(out: Path) -> None:
    """A byte-level BPE trained on two sentences (for the ``dsr1 generate`` smoke test)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["The Python interpreter reads a program.", "A function returns a value."] * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "pad_token": "<pad>", "model_max_length": 128}))


def assert_ranks_match(kind: str, ranks: list[dict[str, Any]], single: dict[str, Any], rank_name: str = "rank",
                       same: tuple[str, ...] = ()) -> None:
    """What each rank saw (``_outputs`` of a test module) against one process's ``single``: logits within
    1e-5, the same greedy ``tokens`` and entries named in ``same``, and the ``sampled`` tokens of rank 0
    (every rank samples the same logits from the same seed). ``rank_name`` names a rank in the messages."""
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["logits"], single["logits"], atol=1e-5, rtol=1e-5,
                                   msg=lambda m: f"{kind} {rank_name} {rank} logits: {m}")
        assert torch.equal(got["tokens"], single["tokens"]), (kind, rank, got["tokens"], single["tokens"])
        for key in same:
            assert got[key] == single[key], (kind, rank, got[key], single[key])
        assert torch.equal(got["sampled"], ranks[0]["sampled"]), (kind, rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="package", autouse=True)
def parallel_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Offline, a private DSR1_HOME, and no torchrun variables from the outside; undone after this package."""
    saved = dict(os.environ)
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "DSR1_HOME": str(tmp_path_factory.mktemp("dsr1home"))})
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DSR1_QUANT", "DSR1_GRAPH"):
        os.environ.pop(var, None)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="package")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-ckpt")
    return {kind: make_checkpoint(root / kind, kind) for kind in TINY}


#: The package's two-rank work, spawned once: a spawn's start-up (two interpreters importing torch, the
#: process group, the first model) is most of what each module's own spawn cost. (module, function, the
#: folder it writes into); every rank calls each ``function(rank, port, paths, out)`` in turn on one process
#: group. The tensor-parallel one ends with rank 1 leaving (the dead-rank check), so it comes last.
TWO_RANK_JOBS = (
    ("tests.parallel.test_tp_quant_moe", "_rank_cpu", "tp-quant-moe"),
    ("tests.parallel.test_lockstep", "_rank", "lockstep"),
    ("tests.parallel.test_tensor_parallel", "_rank_all", "tensor-parallel"),
)


def _two_ranks(rank: int, port: int, paths: dict[str, str], out: str) -> None:
    for module, function, folder in TWO_RANK_JOBS:
        getattr(importlib.import_module(module), function)(rank, port, paths, str(Path(out) / folder))
    # rank 0 is left with a process group whose peer is gone (the dead-rank check): its results are on disk,
    # and tearing the group down at exit could let a gloo thread abort the process (SIGABRT, seen in full runs)
    os._exit(0)


@pytest.fixture(scope="package")
def two_ranks(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the shared spawn's jobs wrote (one folder each, ``TWO_RANK_JOBS``)."""
    out = tmp_path_factory.mktemp("two-ranks")
    for _, _, folder in TWO_RANK_JOBS:
        (out / folder).mkdir()
    paths = {kind: str(p) for kind, p in ckpts.items()}
    mp.spawn(_two_ranks, args=(free_port(), paths, str(out)), nprocs=2, join=True)
    return out
