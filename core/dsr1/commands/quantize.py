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
from typing import Any

from dsr1.config import parse_option_items


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


def run(args: argparse.Namespace) -> int:
    from dsr1.tasks.quantize import quantize_dir

    report = quantize_dir(args.model, args.quant, args.output_dir, options=parse_option_items(args.option),
                          config=args.config, device=args.device, overwrite=args.overwrite,
                          quiet=args.json or args.quiet)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        ratio = report["bytes_after"] / max(report["bytes_before"], 1)
        print(f"wrote {report['output_dir']} ({args.quant}: {report['quantized_layers']} of {report['linear_layers']} "
              f"linear layers quantized; weights {report['bytes_before'] / 1e6:.1f} MB -> "
              f"{report['bytes_after'] / 1e6:.1f} MB, {ratio:.2f}x)")
    return 0
