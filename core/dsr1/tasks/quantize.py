"""``dsr1 quantize`` as a function: load a model through a quant plugin, write its quantized directory.

See :mod:`dsr1.commands.quantize` for the directory written and the output rules; the command
parses arguments and prints what :func:`quantize_dir` returns.
"""
from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dsr1.errors import Dsr1Error


def check_policy(name: str, registry: Any) -> None:
    """The policy exists (closest names otherwise) and can be written ahead of time."""
    spec = registry.load("quant", name)
    if "save" in spec.capabilities or "cast" in spec.capabilities:
        return
    if "dynamic" in spec.capabilities:
        raise Dsr1Error(f"quant {name!r} picks int8 layers at run time from live activations, so there is nothing "
                        f"to write ahead of time; load the model with quant={name!r}, or write a static int8 dir "
                        f"with --quant int8")
    raise Dsr1Error(f"quant {name!r} does not declare the 'save' capability; it cannot write a quantized dir")


def quantize_dir(model: str, quant: str, output_dir: str | Path, *, options: Mapping[str, Any] | None = None,
                 config: str | None = None, device: str | None = None, overwrite: bool = False,
                 quiet: bool = False) -> dict[str, Any]:
    """Write ``model`` quantized with the ``quant`` plugin to ``output_dir``; what was written (a report).

    Where the output goes is settled before the model is looked up, downloaded or loaded; the
    directory is written atomically and replaces only a previous dsr1 quantize output."""
    from dsr1.auto import AutoModel
    from dsr1.models.loading import resolve_model_dir, write_model_dir
    from dsr1.outputs import plan_output
    from dsr1.progress import progress
    from dsr1.registry import PluginRegistry

    out = Path(output_dir).expanduser()
    plan = plan_output(out, "quantize", overwrite=overwrite, inputs=[model] if model.strip() else [])
    model_dir = resolve_model_dir(model)
    plan.check_inputs([model_dir])
    registry = PluginRegistry.from_env()
    check_policy(quant, registry)
    overrides: dict[str, Any] = {"quant": {"name": quant, "options": dict(options or {})}}
    if device:
        overrides["device"] = device
    bytes_before = weight_bytes(model_dir)  # before anything is written
    started = time.perf_counter()
    with progress(f"loading and quantizing ({quant})", quiet=quiet):  # the bar follows the bytes read
        loaded = AutoModel.from_pretrained(model_dir, config, registry=registry, **overrides)
    with progress("writing", quiet=quiet), plan.writing() as tmp:
        write_model_dir(loaded, tmp)
    precision_map = getattr(loaded.pipeline.quant, "precision_map", None)
    layers = precision_map(loaded) if callable(precision_map) else {}
    return {
        "model": str(model_dir),
        "output_dir": str(out),
        "quant": loaded.pipeline.describe()["quant"],
        "quantized_layers": sum(1 for p in layers.values() if p not in ("fp32", "fp16", "bf16")),
        "linear_layers": len(layers),
        "bytes_before": bytes_before,
        "bytes_after": weight_bytes(out),
        "seconds": round(time.perf_counter() - started, 2),
    }


def weight_bytes(directory: Path) -> int:
    """Bytes of the weight files (safetensors, or the pickle files of an older checkpoint)."""
    files = list(directory.glob("*.safetensors")) or list(directory.glob("pytorch_model*.bin"))
    return sum(os.path.getsize(p) for p in files)
