"""``dsr1 quantize``: write a quantized copy of a model as a Hugging Face-format dir.

The model is loaded through the plugin pipeline with ``--quant`` (and its ``--option``s), so
the quantization is exactly what ``AutoModel.from_pretrained(M, quant=...)`` does, then saved
with ``save_pretrained``: ``config.json`` (``model_type: dsr1_quantized`` with a
``quantization_config`` that names the policy, its distribution and options),
``model.safetensors`` (``X.qweight``/``X.scales``... per quantized layer; no pickles) and the
tokenizer files. ``dsr1`` loads the dir back with no quant setting; transformers and a dsr1
without the plugin refuse it instead of reading integers as plain weights.

The float casts (``fp32``, ``fp16``, ``bf16``) write plain weights of that dtype. ``dynamic``
decides per layer at run time and is refused.

--output-dir must be new, empty, or a previous dsr1 quantize output (replaced with --overwrite);
it is never the model dir or a dir that contains it, and --overwrite never deletes a file dsr1
did not write. It is checked before the model is loaded and written atomically (dsr1.outputs).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from dsr1.config import parse_option_items
from dsr1.errors import Dsr1Error


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("quantize", help="write a quantized copy of a model (HF-format dir, safetensors)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model name or HF-format directory")
    p.add_argument("--quant", required=True, help="a dsr1.quant plugin: int8, w8a8, int4, fp8 (or fp32/fp16/bf16)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the policy (repeatable; VALUE is JSON or a string), e.g. group_size=64")
    p.add_argument("--output-dir", required=True,
                   help="the directory to write: new, empty, or a previous dsr1 quantize output (with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous dsr1 quantize output in --output-dir (never files dsr1 did not write)")
    p.add_argument("--config", help="engine config file (YAML/TOML/JSON) for the other families")
    p.add_argument("--device", help="device plugin to quantize on (default from config: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    from dsr1.auto import AutoModel
    from dsr1.models.loading import resolve_model_dir, write_model_dir
    from dsr1.outputs import plan_output
    from dsr1.progress import progress
    from dsr1.registry import PluginRegistry

    out = Path(args.output_dir).expanduser()
    # where the output goes is settled before a model is looked up, downloaded or loaded
    plan = plan_output(out, "quantize", overwrite=args.overwrite, inputs=[args.model] if args.model.strip() else [])
    model_dir = resolve_model_dir(args.model)
    plan.check_inputs([model_dir])
    registry = PluginRegistry.from_env()
    check_policy(args.quant, registry)
    options = parse_option_items(args.option)
    overrides: dict[str, Any] = {"quant": {"name": args.quant, "options": options}}
    if args.device:
        overrides["device"] = args.device
    bytes_before = _weight_bytes(model_dir)  # before anything is written
    started = time.perf_counter()
    quiet = args.json or args.quiet
    with progress(f"loading and quantizing ({args.quant})", quiet=quiet):  # the bar follows the bytes read
        model = AutoModel.from_pretrained(model_dir, args.config, registry=registry, **overrides)
    with progress("writing", quiet=quiet), plan.writing() as tmp:
        write_model_dir(model, tmp)
    precision_map = getattr(model.pipeline.quant, "precision_map", None)
    layers = precision_map(model) if callable(precision_map) else {}
    report = {
        "model": str(model_dir),
        "output_dir": str(out),
        "quant": model.pipeline.describe()["quant"],
        "quantized_layers": sum(1 for p in layers.values() if p not in ("fp32", "fp16", "bf16")),
        "linear_layers": len(layers),
        "bytes_before": bytes_before,
        "bytes_after": _weight_bytes(out),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        ratio = report["bytes_after"] / max(report["bytes_before"], 1)
        print(f"wrote {out} ({args.quant}: {report['quantized_layers']} of {report['linear_layers']} linear layers "
              f"quantized; weights {report['bytes_before'] / 1e6:.1f} MB -> {report['bytes_after'] / 1e6:.1f} MB, "
              f"{ratio:.2f}x)")
    return 0


def _weight_bytes(directory: Path) -> int:
    """Bytes of the weight files (safetensors, or the pickle files of an older checkpoint)."""
    files = list(directory.glob("*.safetensors")) or list(directory.glob("pytorch_model*.bin"))
    return sum(os.path.getsize(p) for p in files)
