"""Block-scaled float8 weights, the format of DeepSeek's fp8 checkpoints (V3, R1).

A quantized linear weight ``X.weight`` is stored as ``float8_e4m3fn`` ``(out, in)`` with a
companion ``X.weight_scale_inv`` in fp32 ``(ceil(out / bo), ceil(in / bi))``, one scale per
``bo × bi`` block of the weight (``weight_block_size``, ``[128, 128]`` in DeepSeek's configs).
The real weight is ``q.float() * scale_inv`` with each scale spread over its block; edge
blocks are partial when a dimension is not a multiple of the block. ``config.json`` says so:

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}

This module holds the math (:func:`dequantize`, :func:`quantize`, :func:`row_scales`) and a
writer that turns a plain safetensors checkpoint into such a one (:func:`write_block_fp8`),
for tests and for users who want a small checkpoint in DeepSeek's format.
:class:`dsr1.models.checkpoint.CheckpointReader` reads the format.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from dsr1.errors import Dsr1Error

#: e4m3's largest finite value: a block's largest magnitude maps onto it.
FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)
#: DeepSeek's block (rows of the weight, columns of the weight).
DEFAULT_BLOCK = (128, 128)
#: tensors :func:`write_block_fp8` keeps in floating point: embeddings, norms, the output head and the
#: MoE router (DeepSeek's checkpoints keep all four in bf16).
DEFAULT_SKIP = ("*embed_tokens.*", "lm_head.*", "*norm*", "*.mlp.gate.weight", "*rotary_emb*")


def scale_shape(shape: Sequence[int], block: Sequence[int]) -> tuple[int, int]:
    """``(ceil(out / bo), ceil(in / bi))``: the scale tensor of a weight of ``shape``."""
    out, inp = shape
    return -(-out // block[0]), -(-inp // block[1])


def row_scales(scale_inv: torch.Tensor, block: Sequence[int], rows: int) -> torch.Tensor:
    """``(ceil(out / bo), nb)`` block scales → ``(rows, nb)``, one per weight row.

    The same weight seen with a ``(1, bi)`` block; fused layers (q/k/v stacked along the rows)
    concatenate such row scales even when a part's rows are not a multiple of ``bo``.
    """
    return scale_inv.float().repeat_interleave(block[0], dim=0)[:rows]  # (rows, nb)


def dequantize(
    q: torch.Tensor, scale_inv: torch.Tensor, block: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """e4m3 ``q (out, in)`` times its block scales → ``(out, in)`` in ``dtype``.

    One fp32 copy of the weight, scaled in place through views of it (the scales are spread
    over the rows only, a tensor ``1/bi`` of the weight's size), then cast to ``dtype``.
    """
    out, inp = q.shape
    if tuple(scale_inv.shape) != scale_shape(q.shape, block):
        raise Dsr1Error(f"block scales of shape {tuple(scale_inv.shape)} do not fit a weight {tuple(q.shape)} "
                        f"in blocks of {tuple(block)}: expected {scale_shape(q.shape, block)}")
    w = q.to(torch.float32)  # (out, in), the one copy
    s = row_scales(scale_inv.to(q.device), block, out)  # (out, nb)
    full, rest = divmod(inp, block[1])
    if full:
        w[:, : full * block[1]].unflatten(1, (full, block[1])).mul_(s[:, :full, None])  # (out, full, bi) view
    if rest:
        w[:, full * block[1]:].mul_(s[:, full:])  # the partial last column block: (out, rest) * (out, 1)
    return w if dtype == torch.float32 else w.to(dtype)


def quantize(w: torch.Tensor, block: Sequence[int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w (out, in)`` → e4m3 ``q (out, in)`` and fp32 ``scale_inv (ceil(out / bo), ceil(in / bi))``.

    Each block's largest magnitude maps onto e4m3's largest finite value, so nothing clips; an
    all-zero block gets scale 1 (its values stay exact zeros).
    """
    out, inp = w.shape
    nbo, nbi = scale_shape(w.shape, block)
    padded = torch.zeros(nbo * block[0], nbi * block[1], dtype=torch.float32, device=w.device)
    padded[:out, :inp] = w
    blocks = padded.view(nbo, block[0], nbi, block[1])  # (nbo, bo, nbi, bi)
    amax = blocks.abs().amax(dim=(1, 3))  # (nbo, nbi)
    scale_inv = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    blocks.div_(scale_inv[:, None, :, None])
    q = padded[:out, :inp].clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)  # (out, in)
    return q, scale_inv


def quantization_config(block: Sequence[int] = DEFAULT_BLOCK) -> dict[str, object]:
    """The ``config.json`` entry of a block-fp8 checkpoint (DeepSeek's own, key for key)."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [int(block[0]), int(block[1])]}


def quantize_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], block: Sequence[int] = DEFAULT_BLOCK,
    skip: Sequence[str] = DEFAULT_SKIP,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each 2-D floating ``*.weight`` not matching ``skip`` as ``weight`` (e4m3) + ``weight_scale_inv``;
    every other tensor unchanged."""
    for name, t in tensors:
        if name.endswith(".weight") and t.dim() == 2 and t.is_floating_point() and not any(
                fnmatch.fnmatchcase(name, p) for p in skip):
            q, scale_inv = quantize(t, block)
            yield name, q
            yield name + "_scale_inv", scale_inv
        else:
            yield name, t


def write_block_fp8(
    src: Path, out: Path, block: Sequence[int] = DEFAULT_BLOCK, skip: Sequence[str] = DEFAULT_SKIP
) -> Path:
    """Write ``src`` (a model dir of safetensors weights) as a block-fp8 checkpoint into ``out``.

    Every linear weight becomes e4m3 with ``block`` scales, as :func:`quantize_tensors` picks
    them; ``config.json`` gains the ``quantization_config``; the other files are copied. Holds
    the whole checkpoint in memory once: meant for test-sized models.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise Dsr1Error(f"block must be two positive ints (rows, columns), got {list(block)!r}")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise Dsr1Error(f"model directory {str(src)!r} has no *.safetensors to convert")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if config.get("quantization_config") is not None:
        raise Dsr1Error(f"{str(src)!r} is already quantized ({config['quantization_config'].get('quant_method')!r}); "
                        f"convert an unquantized checkpoint")

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, f.get_tensor(name)

    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copyfile(item, out / item.name)
    state = {name: t.contiguous() for name, t in quantize_tensors(tensors(), block, skip)}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = quantization_config(block)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out
