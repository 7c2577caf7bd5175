"""``AutoModel`` / ``AutoTokenizer``: a name or path in, a ready model or tokenizer out.

``from_pretrained(name_or_path, config=None, **overrides)``: ``config`` is an
:class:`~dsr1.config.EngineConfig`, a dict or a YAML/TOML/JSON path; keyword overrides use
the family names (``attention="sdpa"``, ``device="cpu"``, ``quant="bf16"``). The pipeline is
resolved once into plain objects; the checkpoint's ``model_type`` picks the builder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dsr1.config import EngineConfig, load_config
from dsr1.errors import Dsr1Error
from dsr1.input_files import is_regular, read_text
from dsr1.models.hf_fields import token_ids
from dsr1.models.loading import read_hf_config, resolve_model_dir


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(read_text(path, "model file")) if is_regular(path, "model file") else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def generation_defaults(model_dir: Path, hf: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """eos/pad ids: ``generation_config.json``, then ``config.json``, then the tokenizer."""
    gen = _read_json(model_dir / "generation_config.json")
    eos = token_ids(gen, "eos_token_id", "generation_config.json") if "eos_token_id" in gen else (
        token_ids(hf, "eos_token_id"))
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    pad = gen.get("pad_token_id", hf.get("pad_token_id"))
    if pad is None and tokenizer is not None and tokenizer.pad_token is not None:
        pad = tokenizer.pad_token_id
    eos_list = [eos] if isinstance(eos, int) else [int(e) for e in (eos or [])]
    return {"eos_token_id": eos_list, "pad_token_id": pad}


class AutoModel:
    """Loads any supported checkpoint through the plugin pipeline."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        config: EngineConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        registry: Any = None,
        **overrides: Any,
    ) -> Any:
        """Build the model in ``name_or_path`` with the plugins ``config`` + ``overrides`` select.

        :param dtype: compute dtype (``torch.bfloat16`` or ``"bf16"``); default: the checkpoint's.
        :param allow_pickle: allow ``*.bin``/``*.pt`` checkpoints (loaded with ``weights_only=True``).
        :param allow_nonfinite: load weights that hold NaN/Inf (refused by default, naming the first such tensor).
        :param registry: a :class:`~dsr1.registry.PluginRegistry` (default: ``PluginRegistry.from_env()``).
        """
        from dsr1.registry import PluginRegistry

        model_dir = resolve_model_dir(name_or_path)
        hf = read_hf_config(model_dir)
        cfg = load_config(config, **overrides)
        registry = registry if registry is not None else PluginRegistry.from_env()
        qc = hf.get("quantization_config")
        # written by `dsr1 quantize`: never load as plain weights; DeepSeek's block fp8 the reader dequantizes
        quantized = qc is not None and not (isinstance(qc, dict) and qc.get("quant_method") == "fp8")
        if quantized:
            from dsr1.quantization.checkpoint import build_quantized, prepare_quantized

            cfg, hf = prepare_quantized(cfg, hf, model_dir, registry)
        cfg = native_attention(cfg, hf, model_dir)
        pipeline = registry.resolve(cfg)
        pipeline.require_device()
        pipeline.model_dir = model_dir
        if quantized and pipeline.pruning is not None:  # its stored integer weights would overwrite the pruned ones
            raise Dsr1Error(f"{str(model_dir)!r} is a quantized checkpoint; pruning at load needs the unquantized "
                            f"weights: load those with 'pruning', or prune before `dsr1 quantize`")
        builder = pipeline.model_builder(str(hf["model_type"]))
        fields = type(builder.options).model_fields
        asked = (("dtype", _dtype_name(dtype)), ("allow_pickle", allow_pickle), ("allow_nonfinite", allow_nonfinite))
        update = {k: v for k, v in asked if k in fields and (v or k == "dtype")}  # False leaves a config's True
        if update:
            builder.options = type(builder.options).model_validate({**builder.options.model_dump(), **update})
        elif dtype is not None:
            raise Dsr1Error(f"model builder {type(builder).__name__} takes no dtype option")
        if quantized:
            model = build_quantized(builder, model_dir, hf, pipeline)
        else:
            model = builder.build(model_dir, hf, pipeline)
        runtime = model.runtime  # bound by the builder (pipeline, graph steps); the checkpoint dir's parts:
        runtime.source_dir = model_dir
        has_tokenizer = is_regular(model_dir / "tokenizer.json", "tokenizer file")  # a FIFO there is an error
        runtime.tokenizer = pipeline.preprocess.load(model_dir) if has_tokenizer else None
        runtime.generation_defaults = generation_defaults(model_dir, hf, runtime.tokenizer)
        pipeline.fire_model_loaded(model)
        return model


def encoder_error(name: str | os.PathLike[str], model_type: Any) -> Dsr1Error:
    """The one line for a command that needs a causal LM and was given an encoder (BERT, MiniLM)."""
    return Dsr1Error(f"model {str(name)!r} ({model_type}) is an encoder; it cannot generate: give a causal LM, "
                     f"e.g. --model dsr1-tiny")


def require_causal_lm(name_or_path: str | os.PathLike[str], config: Any = None) -> None:
    """Refuse, before any weights load, a checkpoint whose model plugin declares the ``encoder``
    capability: ``chat``, ``serve`` and ``bench`` generate. A model that is not found, or whose
    ``config.json`` is bad, is refused here in loading's words; a config that names no model plugin is
    left to loading. An encoder from a plugin that does not declare itself one is refused once built
    (:class:`~dsr1.engine.Engine`)."""
    from dsr1.models.loading import QUANTIZED_MODEL_TYPE
    from dsr1.pipeline import ENCODER_CAPABILITY, builder_for
    from dsr1.registry import PluginRegistry

    hf = read_hf_config(resolve_model_dir(name_or_path))
    model_type = hf["model_type"]
    if model_type == QUANTIZED_MODEL_TYPE and isinstance(hf.get("quantization_config"), dict):
        model_type = hf["quantization_config"].get("model_type")
    try:
        chosen = load_config(config).model
        registry = PluginRegistry.from_env()
        name = chosen.name if chosen is not None else builder_for(registry, str(model_type))
        encoder = ENCODER_CAPABILITY in registry.load("model", name).capabilities
    except Dsr1Error:
        return
    if encoder:
        raise encoder_error(name_or_path, model_type)


def native_attention(cfg: EngineConfig, hf: dict[str, Any], model_dir: Path) -> EngineConfig:
    """A checkpoint trained with a non-softmax attention says so in ``config.json``
    (``"dsr1_attention": "linear"``). When the config leaves attention unset, use that one
    and say so; an explicit choice is kept (the attention plugin warns about fidelity)."""
    native = hf.get("dsr1_attention")
    if not native or cfg.attention is not None:
        return cfg
    import logging

    from dsr1.config import PluginChoice

    logging.getLogger("dsr1").info("%s was trained with %r attention: selecting attention=%r", model_dir.name, native, native)
    return cfg.model_copy(update={"attention": PluginChoice(name=str(native))})


def _dtype_name(dtype: str | torch.dtype | None) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else str(dtype)


#: transformers' name for the same thing.
AutoModelForCausalLM = AutoModel


class AutoTokenizer:
    """Loads the tokenizer of a checkpoint through the ``preprocess`` plugin."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        config: EngineConfig | dict[str, Any] | str | os.PathLike[str] | None = None,
        *,
        padding_side: str | None = None,
        registry: Any = None,
        **overrides: Any,
    ) -> Any:
        from dsr1.registry import PluginRegistry

        model_dir = resolve_model_dir(name_or_path)
        cfg = load_config(config, **overrides)
        registry = registry if registry is not None else PluginRegistry.from_env()
        choice = cfg.choice("preprocess")
        if choice is None:
            raise Dsr1Error("config sets no preprocess plugin; AutoTokenizer needs one (e.g. 'tokenizers')")
        tokenizer = registry.make("preprocess", choice).load(model_dir)
        if padding_side is not None:
            if padding_side not in ("left", "right"):
                raise Dsr1Error(f"padding_side must be 'left' or 'right', got {padding_side!r}")
            tokenizer.padding_side = padding_side
        return tokenizer
