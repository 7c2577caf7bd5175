"""Loading a directory written by ``dsr1 quantize``: refuse it as plain weights, dispatch it to its policy.

Such a directory is Hugging Face-shaped (``config.json`` + ``model.safetensors`` + tokenizer
files) but every quantized linear layer ``X`` is stored as ``X.qweight`` (+ ``X.scales``,
``X.zeros``) instead of ``X.weight``, and ``config.json`` carries::

    "quantization_config": {"quant_method": "dsr1", "policy": "int8", "distribution": "dsr1-quant-int8",
                            "format": "int8_per_channel", "format_version": 1, "options": {...}}

A plain loader finds no ``X.weight`` and fails; transformers refuses the unknown
``quant_method``. dsr1 loads it in two steps (:func:`build_quantized`): the model builder
reads the checkpoint through :class:`DequantizedReader` (which presents ``X.weight``,
dequantized) and the policy quantizes the model as usual; then the stored integer tensors
replace the recomputed ones (:func:`load_quantized_state_`), so the loaded model computes
exactly what the saved one did.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsr1.config import EngineConfig, PluginChoice
from dsr1.errors import Dsr1Error
from dsr1.models.loading import QUANTIZED_MODEL_TYPE as QUANTIZED_MODEL_TYPE  # the writer's marker, read here
from dsr1.models.checkpoint import CheckpointReader
from dsr1.models.loading import LoadOptions
from dsr1.models.loading import quantized_hf_config as quantized_hf_config
from dsr1.quantization.modules import QuantizedLinear
from dsr1.quantization.policy import FORMAT_VERSION, QUANT_METHOD
from dsr1.quantization.schemes import fp8_dequantize, int4_dequantize, int8_dequantize, unpack_nibbles

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Format:
    """A canonical layout: the tensor suffixes of one layer, how to dequantize them, the weight shape."""

    tensors: tuple[str, ...]
    dequantize: Callable[[Tensors, dict[str, Any]], torch.Tensor]
    weight_shape: Callable[[dict[str, tuple[int, ...]]], tuple[int, ...]]


#: Every canonical layout this version reads, by the name in ``quantization_config["format"]``.
FORMATS: dict[str, Format] = {
    "int8_per_channel": Format(
        ("qweight", "scales"),
        lambda t, o: int8_dequantize(t["qweight"], t["scales"]),
        lambda s: s["qweight"],
    ),
    "int4_groupwise": Format(
        ("qweight", "scales", "zeros"),
        lambda t, o: int4_dequantize(unpack_nibbles(t["qweight"]), t["scales"], t["zeros"], int(o["group_size"])),
        lambda s: (s["qweight"][0], 2 * s["qweight"][1]),
    ),
    "fp8_e4m3_per_channel": Format(
        ("qweight", "scales"),
        lambda t, o: fp8_dequantize(t["qweight"], t["scales"]),
        lambda s: s["qweight"],
    ),
}


def prepare_quantized(
    config: EngineConfig, hf: dict[str, Any], model_dir: Path, registry: Any
) -> tuple[EngineConfig, dict[str, Any]]:
    """``config`` with ``quant`` set to the policy that wrote ``model_dir``, and ``hf`` with its real
    ``model_type`` back; one-line errors for every reason it cannot load."""
    config = select_policy(config, hf, model_dir, registry)
    real = hf["quantization_config"].get("model_type") or hf.get("model_type")
    if real == QUANTIZED_MODEL_TYPE or not real:
        raise Dsr1Error(f"model dir {str(model_dir)!r} has no quantization_config.model_type (the architecture "
                        f"behind model_type {QUANTIZED_MODEL_TYPE!r}); its config.json is corrupt")
    return config, {**hf, "model_type": real}


def select_policy(config: EngineConfig, hf: dict[str, Any], model_dir: Path, registry: Any) -> EngineConfig:
    """``config`` with ``quant`` set to the policy that wrote ``model_dir`` (one-line errors otherwise)."""
    qc = hf["quantization_config"]
    where = f"model dir {str(model_dir)!r}"
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        raise Dsr1Error(f"{where} holds weights quantized with quant_method {method!r}, which dsr1 cannot load "
                        f"(it loads dirs written by `dsr1 quantize`); load the unquantized checkpoint instead")
    policy, dist = str(qc.get("policy")), str(qc.get("distribution") or f"dsr1-quant-{qc.get('policy')}")
    fmt, version = qc.get("format"), qc.get("format_version", 1)
    if fmt not in FORMATS or not isinstance(version, int) or version > FORMAT_VERSION:
        raise Dsr1Error(f"{where} uses quantized format {fmt!r} version {version}, newer than this dsr1 reads "
                        f"({', '.join(FORMATS)} up to version {FORMAT_VERSION}); upgrade dsr1 and {dist}")
    chosen = config.choice("quant")
    if chosen is not None and chosen.name != policy:
        raise Dsr1Error(f"{where} holds {policy} weights written by `dsr1 quantize`; it loads only with "
                        f"quant={policy!r}, not {chosen.name!r} (drop the quant setting)")
    if policy not in registry.names("quant"):
        raise Dsr1Error(f"{where} holds weights quantized by the dsr1 quant plugin {policy!r}, which is not "
                        f"installed: pip install {dist}")
    saved = dict(qc.get("options") or {})
    asked = dict(chosen.options) if chosen is not None else {}
    differ = sorted(k for k in asked if k in saved and asked[k] != saved[k])
    if differ:
        k = differ[0]
        raise Dsr1Error(f"{where} was quantized with {policy} option {k}={saved[k]!r}; it cannot load with "
                        f"{k}={asked[k]!r} (drop that option)")
    return config.model_copy(update={"quant": PluginChoice(name=policy, options={**saved, **asked}), "hardware": (
        config.hardware.model_copy(update={"precision": None}) if config.hardware is not None else None)})


class DequantizedReader:
    """A checkpoint reader that shows each quantized layer ``X`` as a float ``X.weight``.

    Wraps a :class:`dsr1.models.checkpoint.CheckpointReader`; the stored tensors stay readable
    unchanged through :meth:`read_raw`.
    """

    def __init__(self, reader: Any, quantization_config: dict[str, Any]) -> None:
        self.reader = reader
        self.model_dir = reader.model_dir
        self.format = FORMATS[quantization_config["format"]]
        self.options = dict(quantization_config.get("options") or {})
        raw = reader.names()
        self.layers = sorted(n.removesuffix(".qweight") for n in raw if n.endswith(".qweight"))
        hidden = {f"{layer}.{t}" for layer in self.layers for t in self.format.tensors}
        missing = sorted(h for h in hidden if h not in raw)
        if missing:
            raise Dsr1Error(f"quantized checkpoint in {str(self.model_dir)!r} lacks {missing[0]}")
        self._names = (raw - hidden) | {f"{layer}.weight" for layer in self.layers}
        self._quantized = {f"{layer}.weight": layer for layer in self.layers}

    def names(self) -> set[str]:
        return set(self._names)

    def raw_names(self) -> set[str]:
        return self.reader.names()

    def shape(self, name: str) -> tuple[int, ...]:
        layer = self._quantized.get(name)
        if layer is None:
            return tuple(self.reader.shape(name))
        shapes = {t: tuple(self.reader.shape(f"{layer}.{t}")) for t in self.format.tensors}
        return tuple(self.format.weight_shape(shapes))

    def float_dtype(self) -> torch.dtype | None:
        return self.reader.float_dtype()

    def read(self, name: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        layer = self._quantized.get(name)
        if layer is None:
            return self.reader.read(name, dtype, device)  # type: ignore[no-any-return]
        parts = {t: self.read_raw(f"{layer}.{t}", torch.device("cpu")) for t in self.format.tensors}
        w = self.format.dequantize(parts, self.options)  # (out, in) fp32
        return w.to(device=device, dtype=dtype or torch.float32)

    def read_raw(self, name: str, device: torch.device) -> torch.Tensor:
        """A stored tensor exactly as saved (no dtype conversion)."""
        return self.reader.read(name, None, device)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.reader.close()


def hf_sources(name: str, fused: dict[str, tuple[str, ...]]) -> list[str]:
    """Checkpoint module names behind model module ``name`` (a fused ``qkv_proj`` → q/k/v)."""
    for fused_name, parts in fused.items():
        if name == fused_name or name.endswith("." + fused_name):
            prefix = name[: len(name) - len(fused_name)]
            return [prefix + p for p in parts]
    return [name]


def fused_modules(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """The ``FUSED`` table of the model's own module (``dsr1.models.llama.FUSED``) when it fused at load."""
    if not getattr(model, "fused", False):
        return {}
    table = getattr(sys.modules.get(type(model).__module__), "FUSED", {})
    return dict(table) if isinstance(table, dict) else {}


def load_quantized_state_(model: nn.Module, reader: DequantizedReader) -> None:
    """Put the stored canonical tensors of every quantized layer into ``model`` (after ``quantize_``)."""
    fused = fused_modules(model)
    raw = reader.raw_names()
    used: set[str] = set()
    where = str(reader.model_dir)
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        sources = hf_sources(name, fused)
        local: Tensors = {}
        device = next(iter([*module.buffers(), *module.parameters()])).device
        for key in module.state_dict():
            parts = [f"{src}.{key}" for src in sources]
            absent = [p for p in parts if p not in raw]
            if absent:
                raise Dsr1Error(f"quantized checkpoint in {where!r} has no {absent[0]} for layer {name!r}: it was "
                                f"written with other options (see quantization_config.options)")
            tensors = [reader.read_raw(p, device) for p in parts]
            local[key] = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]  # (sum of outs, ...)
            used.update(parts)
        module.load_state_dict(local, strict=True)
    left = sorted(layer for layer in reader.layers if f"{layer}.qweight" not in used)
    if left:
        raise Dsr1Error(f"quantized checkpoint in {where!r} stores layer {left[0]!r} quantized, but the policy "
                        f"left it in floating point (was it written with other skip options?)")


def build_quantized(builder: Any, model_dir: Path, hf: dict[str, Any], pipeline: Any) -> Any:
    """Build the model of a ``dsr1 quantize`` dir with its policy (``pipeline.quant``)."""
    build_from = getattr(builder, "build_from", None)
    if build_from is None:
        raise Dsr1Error(f"model builder {type(builder).__name__} cannot load quantized checkpoints (it has no "
                        f"build_from(hf_config, reader, pipeline))")
    options = builder.options
    allow_nonfinite = isinstance(options, LoadOptions) and options.allow_nonfinite
    # the stored tensors (float scales included) are checked for NaN/Inf as read; integer ones cannot hold them
    reader = DequantizedReader(CheckpointReader(model_dir, allow_nonfinite=allow_nonfinite), hf["quantization_config"])
    try:
        model = build_from(hf, reader, pipeline)
        load_quantized_state_(model, reader)
    finally:
        reader.close()
    model.runtime.source_dir = model_dir
    return model
