"""The ``dsr1`` command line.

Each sub-command lives in its own module under :mod:`dsr1.commands` with an
``add_parser(subparsers)`` function that sets ``func`` on its parser. User errors
(:class:`~dsr1.errors.Dsr1Error`) print one line and exit 2; ``--debug`` shows the
traceback instead. So do errors of the operating system on the user's paths (``OSError``:
permission denied, a directory where a file was expected, a symlink loop, a full disk),
arguments that are not valid UTF-8, and seeds outside 64 bits. Every other exception is a
bug in dsr1 and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import importlib
import io
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

from dsr1 import __version__
from dsr1.errors import Dsr1Error, quote
from dsr1.hugepages import enable_huge_pages  # noqa: F401 - also dsr1.cli's public name

#: the seeds torch generators take (``torch.Generator.manual_seed``: an unsigned 64-bit integer).
SEED_MIN, SEED_MAX = 0, 2**64 - 1

#: Sub-command modules, in the order ``--help`` lists them.
COMMANDS = ("plugins", "config", "generate", "chat", "serve", "bench", "profile", "prune", "quantize")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (the commands' docstrings), and every option's default in its help:
    ``(default: X)`` is appended unless the help already says its default, or there is none to say
    (``None``, a plain flag's ``False``)."""

    @staticmethod
    def _says_default(action: argparse.Action) -> bool:
        default = action.default
        return bool(action.option_strings) and not (default is None or default is False or default == []
                                                    or default is argparse.SUPPRESS)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not self._says_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._says_default(action):  # an option without help still shows its default
            action = copy.copy(action)
            action.help = "default: %(default)s"
        return super()._format_action(action)


class Dsr1ArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help shows defaults (:class:`HelpFormatter`); every sub-command's
    parser is one too (argparse makes sub-parsers of the parent's class), whatever formatter it names."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]  # argparse's own keyword types


def build_parser() -> argparse.ArgumentParser:
    parser = Dsr1ArgumentParser(prog="dsr1", description="dsr1: a pluggable LLM inference engine")
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


def check_argv(argv: Sequence[str]) -> None:
    """Refuse arguments that are not valid UTF-8 (Python hands them over with surrogate escapes,
    which no file name, model name or prompt can use further on)."""
    for i, arg in enumerate(argv, start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            shown = shown if len(shown) <= 80 else f"{shown[:80]}... ({len(shown)} characters)"
            raise Dsr1Error(f"argument {i} ('{shown}') is not valid UTF-8; pass text in UTF-8 (check the "
                            f"terminal's or the script's encoding)") from None


def check_seed(args: argparse.Namespace) -> None:
    """A ``--seed`` of any command must fit the generators: an integer in ``SEED_MIN..SEED_MAX``."""
    seed = getattr(args, "seed", None)
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise Dsr1Error(f"--seed {quote(seed, 40)} is out of range; a seed is an integer from {SEED_MIN} to "
                        f"{SEED_MAX} (2**64 - 1)")


def os_error_line(err: OSError) -> str:
    """An ``OSError`` as one line: the path(s) it names and the cause."""
    cause = err.strerror or str(err) or type(err).__name__
    code = errno.errorcode.get(err.errno) if isinstance(err.errno, int) else None
    cause = f"{cause} ({code})" if code else cause
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    if not paths:
        return cause
    shown = " -> ".join(quote(p if isinstance(p, str) else str(p), 500) for p in paths)
    return f"{shown}: {cause}"


def launched_rank(environ: dict[str, str] | None = None) -> int | None:
    """This process's rank when ``torchrun`` started several (``WORLD_SIZE`` above 1), else ``None``."""
    env = os.environ if environ is None else environ
    try:
        size, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
    except ValueError:
        return None  # dsr1.parallel.topology refuses it, with the values, when a model joins the ranks
    return rank if size > 1 else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Under ``torchrun`` with several ranks only rank 0 prints; the others stay
    silent except for their own errors (``dsr1: error (rank N): ...``), and the process group a model
    joined is destroyed at the end."""
    rank = launched_rank()
    if not rank:
        return _main(argv, "dsr1: error", sys.stderr)
    out, err = sys.stdout, sys.stderr
    with open(os.devnull, "w") as silent:
        sys.stdout = sys.stderr = silent
        try:
            return _main(argv, f"dsr1: error (rank {rank})", err)
        finally:
            sys.stdout, sys.stderr = out, err


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  line: str | None = None) -> str:
    """A warning as the command line prints it: ``dsr1: warning: ...``, one line (``--debug`` keeps Python's
    form, with the file, line and source it came from)."""
    return f"dsr1: warning: {str(message).strip()}\n"


def entry() -> None:
    """The process entry point (the ``dsr1`` script, ``python -m dsr1``): :func:`main`, then exit with its code.

    A rank that ``torchrun`` started leaves by ``os._exit`` once its outputs are flushed and its process group
    destroyed: torch's C++ teardown at interpreter exit now and then aborted a rank whose command had succeeded
    ("terminate called without an active exception", SIGABRT), and torchrun then failed the whole run. Its
    files are closed by then (every writer replaces its file before the command returns)."""
    if "--debug" not in sys.argv[1:]:
        warnings.formatwarning = _warning_line
    code = main()
    if launched_rank() is None or "torch.distributed" not in sys.modules:
        sys.exit(code)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _main(argv: Sequence[str] | None, label: str, errors: TextIO) -> int:
    try:
        return _run(argv, label, errors)
    finally:
        if "torch.distributed" in sys.modules:  # a model may have joined a process group (dsr1.parallel)
            from dsr1.parallel.topology import shutdown

            shutdown()


def _run(argv: Sequence[str] | None, label: str, errors: TextIO) -> int:
    enable_huge_pages()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        check_argv(argv)
    except Dsr1Error as err:
        print(f"{label}: {err}", file=errors)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        check_seed(args)
        return int(args.func(args) or 0)
    except Dsr1Error as err:
        if args.debug:
            raise
        print(f"{label}: {err}", file=errors)
        return 2
    except KeyboardInterrupt:
        print("dsr1: interrupted", file=errors)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as err:  # the environment refused (a path, the disk): the user's to fix, not a bug
        if args.debug or isinstance(err, io.UnsupportedOperation):  # that one is a bug in dsr1
            raise
        print(f"{label}: {Dsr1Error(os_error_line(err))}", file=errors)
        return 2


if __name__ == "__main__":  # pragma: no cover
    entry()
