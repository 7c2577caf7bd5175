"""``dsr1 serve``: an OpenAI-compatible HTTP server (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``, ``/metrics``) over one engine.

Under ``torchrun`` with several ranks, rank 0 serves HTTP and schedules; every other rank builds the
same engine and follows rank 0's plans (:mod:`dsr1.parallel.lockstep`) without opening a socket.
Stopping rank 0 stops them; a rank that dies stops rank 0's server with a one-line error."""
from __future__ import annotations

import argparse
import os
from typing import Any

from dsr1.errors import Dsr1Error, did_you_mean


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a model over an OpenAI-compatible HTTP API (FastAPI + uvicorn). "
                                          "SIGTERM or Ctrl-C drains: new requests get 503, running ones finish "
                                          "up to --drain-timeout, then the server exits 0.")
    p.add_argument("--model", default="dsr1-tiny", help="model name or HF-format directory (default dsr1-tiny)")
    p.add_argument("--shape", help="a built-in shape (see dsr1 bench) instead of --model, with --random-weights; "
                                   "no tokenizer: prompts are token ids (what dsr1 bench serve --url sends)")
    p.add_argument("--random-weights", action="store_true", help="random weights (normal, std 0.02) of --shape")
    p.add_argument("--config", help="engine config file (YAML/TOML/JSON)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one and prints it)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes (default: $DSR1_API_KEY, "
                                     "else none; the variable keeps the key out of the process list)")
    p.add_argument("--max-queue", type=int, help="most requests waiting for admission; more get 429 (default: "
                                                 "unbounded)")
    p.add_argument("--served-model-name", help="the model id clients send and /v1/models lists (default: --model)")
    p.add_argument("--num-blocks", type=int, help="KV blocks in the pool (default: from free memory)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM lets running requests finish before aborting them (default 30)")
    p.add_argument("--reasoning-parser", metavar="NAME",
                   help="a reasoning model's thinking markers: chat replies carry the <think> block as "
                        "reasoning_content and the answer as content (deepseek_r1, qwen3; default: off)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level; info and debug log every request (default warning)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_queue is not None and args.max_queue < 1:
        raise Dsr1Error(f"--max-queue must be >= 1 (requests allowed to wait), got {args.max_queue}")
    if not 0 <= args.port <= 65535:
        raise Dsr1Error(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    if args.drain_timeout < 0:
        raise Dsr1Error(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    if bool(args.shape) != bool(args.random_weights):
        raise Dsr1Error("--shape and --random-weights go together: a built-in shape has no trained weights "
                        "(e.g. dsr1 serve --shape tiny-125m --random-weights)")
    if args.reasoning_parser is not None:
        from dsr1.decoding.reasoning import parser_markers

        parser_markers(args.reasoning_parser)  # a bad name: one line, before anything loads
    if args.api_key is None:  # read here, not as the option's default: --help would print it
        args.api_key = os.environ.get("DSR1_API_KEY")
    if args.api_key is not None and not args.api_key.strip():
        raise Dsr1Error("--api-key is empty; give a non-empty key or leave the option out")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise Dsr1Error(f"--served-model-name must not be empty or blank, got {args.served_model_name!r}; give the "
                        f"model id clients send, e.g. 'my-model', or leave the option out to serve it as --model")
    if args.num_blocks is not None and args.num_blocks < 1:
        raise Dsr1Error(f"--num-blocks must be >= 1 (KV blocks in the pool), got {args.num_blocks}; leave it out "
                        f"to size the pool from free memory")
    try:
        import fastapi  # noqa: F401 - only checking that the extra is installed
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise Dsr1Error(f"dsr1 serve needs the serve extra ({err.name} is missing): "
                        f"pip install 'dsr1[serve]'") from None
    from dsr1.cli import launched_rank

    rank = launched_rank()
    if rank:  # a follower: the same engine, rank 0's plans, no socket
        from dsr1.parallel.lockstep import follow

        follow(_build(args))
        return 0
    from dsr1.serve.server import bind, serve
    from dsr1.serve.state import ServeSettings, ServeState

    # A taken port or an unknown host is told before the model is looked at, let alone loaded; the socket
    # is bound, not listening, so a client that comes early is refused rather than left waiting.
    sockets = bind(args.host, args.port)
    try:
        _check_model(args)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    name = args.served_model_name or (args.shape if args.shape else args.model)
    state = ServeState(ServeSettings(model_name=name, api_key=args.api_key, max_queue=args.max_queue,
                                     drain_timeout_s=args.drain_timeout,
                                     reasoning_parser=args.reasoning_parser,
                                     exit_on_engine_error=rank is not None))
    serve(state, lambda: _engine(args), sockets, args.log_level)
    if state.load_error is not None:
        err = state.load_error
        raise err if isinstance(err, Dsr1Error) else Dsr1Error(f"loading {name!r} failed: {type(err).__name__}: {err}")
    if state.engine is not None and state.engine.error is not None:
        err = state.engine.error
        raise err if isinstance(err, Dsr1Error) else Dsr1Error(f"the engine loop failed: {type(err).__name__}: {err}")
    return 0


def _check_model(args: argparse.Namespace) -> None:
    """Refuse, in one line and before the server opens, what would only fail once the model loads: an
    unknown shape, a config that does not parse or names no installed plugin, a device that is not here,
    a model that is not found. A hub name not on this machine is fetched here, as loading would."""
    from dsr1.config import load_config
    from dsr1.engine.engine import ENGINE_DEFAULTS
    from dsr1.registry import PluginRegistry

    if args.shape:
        from dsr1.benchmarks.shapes import SHAPES

        if args.shape not in SHAPES:
            raise Dsr1Error(f"unknown --shape {args.shape!r}{did_you_mean(args.shape, SHAPES)}")
    chosen = load_config(args.config)
    overrides = {f: n for f, n in ENGINE_DEFAULTS.items() if getattr(chosen, f) is None}
    PluginRegistry.from_env().resolve(load_config(args.config, **overrides)).require_device()
    if not args.shape:
        from dsr1.models.loading import read_hf_config, resolve_model_dir

        try:
            model_dir = resolve_model_dir(args.model, download=False)
        except Dsr1Error:  # not on this machine: the hub's copy, or the one-line reason there is none
            model_dir = resolve_model_dir(args.model)
        read_hf_config(model_dir)
        from dsr1.auto import require_causal_lm

        require_causal_lm(args.model, args.config)  # an encoder (BERT, MiniLM) cannot serve completions


def _engine(args: argparse.Namespace) -> Any:
    from dsr1.engine import AsyncEngine
    from dsr1.parallel.lockstep import lead

    engine = _build(args)
    if args.reasoning_parser is not None:
        from dsr1.decoding.reasoning import parser_markers

        engine.reasoning = parser_markers(args.reasoning_parser)
    lead(engine)  # under a launch: the other ranks follow this engine's plans (None alone)
    return AsyncEngine(engine)


def _build(args: argparse.Namespace) -> Any:
    from dsr1.engine import Engine

    if args.shape:
        from dsr1.benchmarks.common import random_model
        from dsr1.config import load_config
        from dsr1.engine.engine import ENGINE_DEFAULTS

        chosen = load_config(args.config)
        overrides = {f: n for f, n in ENGINE_DEFAULTS.items() if getattr(chosen, f) is None}
        engine = Engine(random_model(args.shape, args.config, overrides), num_blocks=args.num_blocks)
    else:
        engine = Engine.from_pretrained(args.model, args.config, num_blocks=args.num_blocks)
    return engine  # an encoder never gets here: _check_model and Engine refuse it
