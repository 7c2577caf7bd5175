"""``dsr1 chat``: a multi-turn conversation with a model in the terminal.

The answer streams as it is generated, through the same engine loop the server uses
(:class:`~dsr1.engine.async_engine.AsyncEngine`, in a background thread), so Ctrl-C only stops
waiting for the current answer: the request is aborted, its KV blocks freed, and the prompt
comes back. The history is rendered with the model's chat template every turn; when it no
longer leaves room for an answer, the oldest exchanges are dropped (the system prompt stays).

A reasoning model (its tokenizer has ``<think>``/``</think>`` tokens) shows its thinking apart
from the answer: dim and italic on a terminal, after a ``thinking:`` line elsewhere, and only the
answer goes back into the history (as DeepSeek-R1's template expects).
"""
from __future__ import annotations

import argparse
import io
import signal
import sys
from typing import Any

from dsr1.errors import Dsr1Error

PROMPT = "you> "
HELP = "commands: /reset (forget the conversation), /exit (leave; Ctrl-D too), /help; Ctrl-C stops an answer"


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("chat", help="chat with a model in the terminal",
                              description="An interactive multi-turn chat: type a message, the answer streams. "
                                          + HELP + ".")
    p.add_argument("--model", default="dsr1-tiny", help="model name or HF-format directory (default dsr1-tiny)")
    p.add_argument("--config", help="engine config file (YAML/TOML/JSON)")
    p.add_argument("--system", help="a system prompt that starts the conversation (kept through /reset)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the model's generation_config)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-thinking-tokens", type=int,
                   help="a reasoning model's thinking budget per answer: then </think> is forced (default: none)")
    p.set_defaults(func=run)


class Conversation:
    """The messages so far, and the prompt ids that fit the context with room for an answer."""

    def __init__(self, tokenizer: Any, context: int, max_tokens: int, system: str | None) -> None:
        self.tokenizer, self.context, self.max_tokens = tokenizer, context, max_tokens
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []

    def reset(self) -> None:
        self.turns = []

    def ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt(self, user: str) -> tuple[list[int], int, int]:
        """Add ``user``; the prompt ids, the answer's token budget and how many old messages were
        dropped. A message that cannot fit even alone is refused (and not kept)."""
        message = {"role": "user", "content": user}
        reserve = min(self.max_tokens, self.context // 2)  # the answer's room, never more than half the context
        alone = len(self.ids([*self.system, message]))
        if alone + reserve > self.context:  # refused before any history is given up for it
            raise Dsr1Error(f"this message makes a prompt of {alone} tokens; with {reserve} for the answer that is "
                            f"more than the model's context of {self.context}: shorten it")
        self.turns.append(message)
        dropped = 0
        while True:
            ids = self.ids(self.system + self.turns)
            if len(ids) + reserve <= self.context:
                return ids, min(self.max_tokens, self.context - len(ids)), dropped
            del self.turns[:2]  # the oldest exchange: a user message and its answer
            dropped += 2

    def answered(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise Dsr1Error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    from dsr1.engine import AsyncEngine, Engine
    from dsr1.interfaces import SamplingParams

    engine = Engine.from_pretrained(args.model, args.config)
    tokenizer = engine.tokenizer
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        raise Dsr1Error(f"model {args.model!r} has no chat template (tokenizer_config.json or chat_template.jinja); "
                        f"use dsr1 generate instead")
    sampling: dict[str, Any] = {}
    if args.temperature is not None:
        sampling.update(temperature=args.temperature, do_sample=args.temperature > 0)
    for name in ("top_p", "top_k", "seed", "max_thinking_tokens"):
        if getattr(args, name) is not None:
            sampling[name] = getattr(args, name)
    base = engine.default_params.model_dump(exclude_unset=True)
    SamplingParams(**{**base, **sampling})  # a bad value fails now, not at the first message
    convo = Conversation(tokenizer, engine.max_model_len, args.max_tokens, args.system)
    from dsr1.decoding.reasoning import ThinkMarkers, thinking_ids

    if thinking_ids(tokenizer) is not None:  # a reasoning model: its thinking is shown apart
        engine.reasoning = ThinkMarkers()
    if sys.stdin.isatty():
        # Ctrl-C stops an answer: a chat started from a job that ignores SIGINT (a shell's background
        # job, some launchers) inherits the ignore, and Python then raises no KeyboardInterrupt
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:  # pragma: no cover - platforms without readline
            pass
    # a line that is not UTF-8 reaches input() as text with surrogate escapes, refused per message below
    # (a strict decoder would raise mid-read and lose the rest of the line)
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")
    async_engine = AsyncEngine(engine)
    print(f"dsr1 chat with {args.model} ({HELP})", flush=True)
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                print()
                continue
            text = line.strip()
            if not text:
                continue
            problem = not_utf8(line)
            if problem is not None:
                print(f"dsr1: {problem}", flush=True)
                continue
            if text.startswith("/"):
                if text in ("/exit", "/quit"):
                    return 0
                if text == "/reset":
                    convo.reset()
                    print("(conversation cleared)", flush=True)
                else:
                    print(HELP, flush=True)
                continue
            try:
                ids, budget, dropped = convo.prompt(line)
            except Dsr1Error as err:
                print(f"dsr1: {err}", flush=True)
                continue
            if dropped:
                print(f"(dropped the {dropped} oldest messages to stay within the context)", flush=True)
            params = SamplingParams(**{**base, **sampling, "max_tokens": budget})
            convo.answered(_answer(async_engine, ids, params))
    finally:
        async_engine.shutdown()


def not_utf8(line: str) -> str | None:
    """Why ``line`` (read with surrogate escapes) is refused, or None when it is valid UTF-8."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as err:
        offset = len(line[:err.start].encode("utf-8", "surrogateescape"))
        return f"this message is not valid UTF-8 (byte {offset}); type or pipe it in UTF-8 (it was not sent)"
    return None


#: how thinking is set apart: dim italic on a terminal (ANSI), a labelled line elsewhere.
THINK_STYLE, THINK_RESET = "\x1b[2;3m", "\x1b[0m"
THINK_LABEL, ANSWER_LABEL = "thinking: ", "\nanswer: "


class _Shown:
    """Writes a reasoning model's deltas: thinking set apart from the answer."""

    def __init__(self, tty: bool) -> None:
        self.tty, self.thinking, self.thought = tty, False, False

    def write(self, reasoning: str, answer: str) -> None:
        if reasoning:
            if not self.thinking:
                sys.stdout.write(THINK_STYLE if self.tty else THINK_LABEL)
                self.thinking = self.thought = True
            sys.stdout.write(reasoning)
        if answer:
            self.end_thinking()
            sys.stdout.write(answer)

    def end_thinking(self) -> None:
        if self.thinking:
            sys.stdout.write(THINK_RESET + "\n" if self.tty else ANSWER_LABEL)
            self.thinking = False


def _answer(engine: Any, ids: list[int], params: Any) -> str:
    """Stream one answer to stdout; Ctrl-C stops it (what came so far is kept as the answer).
    A reasoning model's thinking is shown, but only its answer is returned (for the history)."""
    stream = engine.stream_sync(ids, params)
    text = ""
    shown = _Shown(sys.stdout.isatty())
    try:
        for out in stream:
            if out.answer_delta is not None:
                shown.write(out.reasoning_delta or "", out.answer_delta)
                text = out.answer or ""
            else:
                sys.stdout.write(out.delta)
                text = out.text
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()  # aborts the request: its KV blocks are freed now
        shown.end_thinking()
        sys.stdout.write(" [stopped]")
    if shown.tty and shown.thinking:
        sys.stdout.write(THINK_RESET)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return text
