"""``dsr1 bench``: the command line of the benchmark library (:mod:`dsr1.benchmarks`).

This module only parses and checks options; the measuring lives in the library:
:mod:`dsr1.benchmarks.throughput` (``dsr1 bench``: prefill / decode tok/s and peak memory, against
transformers; under ``torchrun`` every rank measures its shards and rank 0 reports them all), and the
forms ``attention``, ``kvcache``, ``serve`` and ``precision`` in the modules of those names.
"""
from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from typing import Any

from dsr1.benchmarks import throughput
from dsr1.benchmarks.shapes import SHAPES
from dsr1.errors import Dsr1Error


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="measure prefill/decode tok/s and peak memory (optionally vs transformers)",
                              description=throughput.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    forms = p.add_subparsers(dest="bench_form", metavar="FORM",
                             title="other forms (dsr1 bench FORM --help)")
    from dsr1.benchmarks import attention, kvcache, precision, serve

    attention.add_parser(forms)
    kvcache.add_parser(forms)
    serve.add_parser(forms)
    precision.add_parser(forms)
    for form in forms.choices.values():  # every form checks its output files before it measures
        form.set_defaults(func=_outputs_checked(form.get_default("func")))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="model name or HF-format directory")
    src.add_argument("--shape", choices=sorted(SHAPES), help="a built-in model shape (use with --random-weights)")
    p.add_argument("--random-weights", action="store_true", help="random weights (normal, std 0.02) of --shape")
    p.add_argument("--config", help="engine config file (YAML/TOML/JSON)")
    p.add_argument("--batch-size", default="1,8", help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--rounds", type=int, default=1,
                   help="fresh worker processes per engine and batch size, alternating which engine goes "
                        "first (medians reported; peak memory is the highest)")
    p.add_argument("--compare", choices=["hf"], help="also run transformers generate on the same inputs")
    p.add_argument("--dtype", help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--device", default=None, help="device plugin (cpu, cuda); default from config")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--output", help="also write the JSON to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one engine and batch size, spawned by throughput.spawn
    p.set_defaults(func=_outputs_checked(run))


def _outputs_checked(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``func`` after the refusal of an ``--output`` or ``--plot`` that dsr1 may not write
    (:func:`dsr1.output_files.check_output`): a directory, or a file dsr1 did not write. Before any measuring."""
    @functools.wraps(func)
    def checked(args: argparse.Namespace) -> int:
        from dsr1.output_files import check_output

        if not getattr(args, "worker", None):
            for flag in ("output", "plot"):
                if getattr(args, flag, None):
                    check_output(getattr(args, flag), f"--{flag}")
        return func(args)

    return checked


def _check_engine(args: argparse.Namespace) -> None:
    """Refuse in one line, before any worker starts, what a worker would only fail on: a dtype dsr1 does not run,
    fewer than one thread, a config that does not parse or names no installed plugin, a device not here."""
    from dsr1.config import load_config
    from dsr1.models.loading import parse_dtype
    from dsr1.registry import PluginRegistry

    if args.dtype is not None:
        try:
            parse_dtype(args.dtype)
        except Dsr1Error:
            raise Dsr1Error(f"--dtype {args.dtype!r} is not a dtype dsr1 runs; use float32, float16 or bfloat16"
                            ) from None
    if args.threads is not None and args.threads < 1:
        raise Dsr1Error(f"--threads must be at least 1, got {args.threads} (leave it out for every core)")
    overrides = {"device": args.device} if args.device else {}
    PluginRegistry.from_env().resolve(load_config(args.config, **overrides)).require_device()


def run(args: argparse.Namespace) -> int:
    if args.worker:
        print(json.dumps(throughput.worker(json.loads(args.worker))))
        return 0
    if not (args.model or args.shape):
        raise Dsr1Error("dsr1 bench needs --model NAME_OR_PATH or --shape NAME, or a form: "
                        "dsr1 bench attention ... / dsr1 bench kvcache ...")
    if args.shape and not args.random_weights:
        raise Dsr1Error("--shape needs --random-weights (or give --model NAME_OR_PATH)")
    try:
        batches = [int(b) for b in str(args.batch_size).split(",") if b.strip()]
    except ValueError:
        raise Dsr1Error(f"--batch-size must be comma-separated integers, got {args.batch_size!r}") from None
    if (not batches or min(batches) < 1 or args.prompt_len < 1 or args.new_tokens < 2 or args.reps < 1
            or args.rounds < 1):
        raise Dsr1Error("--batch-size ≥ 1, --prompt-len ≥ 1, --new-tokens ≥ 2, --reps ≥ 1 and --rounds ≥ 1 are required")
    _check_engine(args)
    if args.model:  # an encoder is refused here, before any worker loads it
        from dsr1.auto import require_causal_lm

        require_causal_lm(args.model, args.config)
    from dsr1.cli import launched_rank

    rank = launched_rank()
    if rank is not None:  # torchrun with several ranks: each measures its shards in this process
        return throughput.run_launched(args, rank)
    return throughput.run(args)
