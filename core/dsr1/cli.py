"""The ``dsr1`` command line.

Each sub-command lives in its own module under :mod:`dsr1.commands` with an
``add_parser(subparsers)`` function that sets ``func`` on its parser. User errors
(:class:`~dsr1.errors.Dsr1Error`) print one line and exit 2; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dsr1 import __version__
from dsr1.errors import Dsr1Error

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS = ("plugins", "config", "generate", "bench", "prune", "quantize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsr1", description="dsr1: a pluggable LLM inference engine")
    parser.add_argument("--version", action="version", version=f"dsr1 {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dsr1.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"dsr1.commands.{name}":
                raise
            continue  # command not built yet in this release
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Dsr1Error as err:
        if args.debug:
            raise
        print(f"dsr1: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dsr1: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
