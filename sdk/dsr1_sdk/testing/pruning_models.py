"""Model-level pruning checks on tiny random dsr1 checkpoints (llama and bert).

* :func:`tiny_checkpoint` writes a tiny random HF-format checkpoint (config.json +
  model.safetensors) with dsr1's own writer, so the kit needs no transformers.
* :func:`check_saved_stage_reloads` prunes a loaded model, saves it with ``save_pretrained``
  and checks that dsr1 reloads it with bit-identical outputs.
* :func:`check_structured_model` checks what a ``structured`` pruner leaves: a model whose
  tensors have exactly the shapes its (updated) config implies, that runs, that keeps the
  output shape, and whose realized sparsity is at the target within one FFN channel per layer.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Literal

import torch

from dsr1.interfaces import Pruner

Arch = Literal["llama", "bert"]

#: Tiny configs: 2 layers, 4 heads (llama: 2 kv heads, explicit head_dim), hidden 64, FFN 96.
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
        "vocab_size": 128, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    },
    "bert": {
        "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 96, "vocab_size": 128, "max_position_embeddings": 64,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0,
    },
}


def _shapes(arch: Arch, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    if arch == "llama":
        from dsr1.models.llama import LlamaArgs

        return LlamaArgs.from_hf(config).hf_tensor_shapes()
    from dsr1.models.bert import BertArgs

    return BertArgs.from_hf(config).hf_tensor_shapes(pooler=True)


def tiny_checkpoint(directory: Path, arch: Arch = "llama", seed: int = 0) -> Path:
    """Write a tiny random checkpoint of ``arch`` into ``directory``; returns it."""
    from dsr1.models.loading import write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    config = dict(CONFIGS[arch])
    tensors = []
    for name, shape in sorted(_shapes(arch, config).items()):
        gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
        if "norm" in name.lower() and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * (0.02 if "embed" in name else 0.2)
        tensors.append((name, t))
    (directory / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    write_safetensors(directory / "model.safetensors", tensors, {"format": "pt"})
    return directory


def load(directory: Path, arch: Arch) -> Any:
    """dsr1's model of ``directory``, loaded the way ``dsr1 prune`` loads it (llama unfused)."""
    from dsr1.auto import AutoModel

    config: dict[str, Any] = {"device": "cpu", "attention": "sdpa"}
    if arch == "llama":
        config["model"] = {"name": "llama", "options": {"fuse": False, "weight_layout": "nk"}}
    return AutoModel.from_pretrained(directory, config, dtype="float32")


def inputs(arch: Arch, seed: int = 0) -> torch.Tensor:
    """Token ids ``(2, 12)`` (real ids, never all zeros)."""
    return torch.randint(3, CONFIGS[arch]["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(seed))


def outputs(model: Any, arch: Arch, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(ids)
    return out.logits if arch == "llama" else out.last_hidden_state  # type: ignore[no-any-return]


def calibration(arch: Arch) -> list[torch.Tensor]:
    """Calibration id batches for activation-aware pruners: four ``(1, 16)`` windows."""
    vocab = CONFIGS[arch]["vocab_size"]
    return [torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(100 + s)) for s in range(4)]


def check_saved_stage_reloads(pruner: Pruner, target: float, workdir: Path, arch: Arch = "llama") -> Any:
    """Prune a tiny model, save it, reload it with dsr1: outputs bit-identical. Returns the reloaded model."""
    model = load(tiny_checkpoint(workdir / "dense", arch), arch)
    ids = inputs(arch)
    with torch.no_grad():
        pruner.prune_(model, target, calibration(arch))
    before = outputs(model, arch, ids)
    assert torch.isfinite(before).all(), f"{arch}: the pruned model produces non-finite outputs"
    saved = model.save_pretrained(workdir / "stage")
    again = load(saved, arch)
    after = outputs(again, arch, ids)
    assert after.shape == before.shape and torch.equal(after, before), (
        f"{arch} at sparsity {target}: the saved stage reloads with different outputs "
        f"(max |diff| {float((after - before).abs().max()) if after.shape == before.shape else 'shape'})"
    )
    zeros_before = {n: int((p == 0).sum()) for n, p in model.state_dict().items()}
    zeros_after = {n: int((p == 0).sum()) for n, p in again.state_dict().items()}
    assert zeros_before == zeros_after, f"{arch}: the saved stage lost or gained zeros"
    return again


def check_structured_model(pruner: Pruner, target: float, workdir: Path, arch: Arch = "llama") -> None:
    """A structured pruner leaves a smaller, consistent model at the target sparsity."""
    from dsr1.pruning.metrics import census, original_shapes, prunable_linears

    model = load(tiny_checkpoint(workdir / f"dense-{arch}", arch), arch)
    original = original_shapes(model)
    ids = inputs(arch)
    dense_out = outputs(model, arch, ids)
    with torch.no_grad():
        pruner.prune_(model, target, calibration(arch))
    expected = _shapes(arch, model.config)
    got = {name: tuple(t.shape) for name, t in model.hf_state_dict()}
    wrong = {n: (got.get(n), s) for n, s in expected.items() if got.get(n) != s}
    assert not wrong and set(got) == set(expected), (
        f"{arch}: tensors do not match the shapes the updated config implies: {dict(list(wrong.items())[:3])}"
    )
    out = outputs(model, arch, ids)
    assert out.shape == dense_out.shape and torch.isfinite(out).all(), f"{arch}: the pruned model's output is broken"
    if target == 0:
        assert torch.equal(out, dense_out), f"{arch}: sparsity 0 changed the outputs"
        return
    realized = census(model, original)["realized_sparsity"]
    layers = int(model.config["num_hidden_layers"])
    mult = 3 if arch == "llama" else 2
    channel = mult * int(model.config["hidden_size"]) * layers / sum(layer.numel for layer in original)
    assert abs(realized - target) <= max(0.01, channel) + 1e-9, (
        f"{arch}: structured pruning realized sparsity {realized:.4f}, target {target} (± one FFN channel per "
        f"layer = {channel:.4f})"
    )
    assert all(float((m.weight != 0).float().mean()) > 0.5 for _, m in prunable_linears(model)), (
        f"{arch}: structured pruning should remove rows and columns, not leave zeros behind"
    )
