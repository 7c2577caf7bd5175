"""Reasoning models: the thinking block apart from the answer, and a budget on its length.

Models such as DeepSeek-R1, QwQ and Qwen3 write their reasoning between two markers
(``<think>`` … ``</think>`` by default) and the answer after it. This module is plain Python:

* :class:`ReasoningParser` splits text as it streams: ``feed(delta)`` returns the delta's
  reasoning part and answer part. Text that may be the beginning of a marker is held back until
  the next delta decides it, so a marker split over two deltas is still recognised and a stream
  never shows part of one. :func:`split_reasoning` is the same over a whole text, and any split
  of a text into deltas gives what the whole text gives.
* A model can start *inside* the thinking block: DeepSeek-R1's chat template ends the prompt
  with ``<think>\\n``, so the output has no opening marker. ``in_thinking=True`` says so;
  :func:`starts_in_thinking` tells it from the rendered prompt. A start marker written anyway
  at the very beginning of such a block is swallowed.
* Whitespace right after a marker is dropped (the ``\\n\\n`` models write after ``</think>``);
  text without any marker is all answer (all reasoning with ``in_thinking=True``).
* :func:`forced_token` is the thinking budget (``SamplingParams.max_thinking_tokens``): once a
  thinking block holds that many tokens, the end marker's ids are forced, one per step; the
  decoder calls it only for requests that set a budget. :func:`thinking_ids` finds the markers'
  ids in a tokenizer (markers must be tokens of the vocabulary, as they are in those models).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dsr1.errors import Dsr1Error, did_you_mean


@dataclass(frozen=True)
class ThinkMarkers:
    """The strings that open and close a thinking block."""

    start: str = "<think>"
    end: str = "</think>"

    def __post_init__(self) -> None:
        for name, value in (("start", self.start), ("end", self.end)):
            if not value or value != value.strip():
                raise Dsr1Error(f"thinking marker {name}={value!r} must be non-empty text without surrounding "
                                f"whitespace, e.g. '<think>'")
        if self.start == self.end:
            raise Dsr1Error(f"thinking markers start and end are both {self.start!r}; they must differ")


#: ``--reasoning-parser`` names (vLLM's names for the same markers).
PARSERS: dict[str, ThinkMarkers] = {"deepseek_r1": ThinkMarkers(), "qwen3": ThinkMarkers()}


class ThinkingBudgetWarning(UserWarning):
    """A thinking budget that cannot act (the tokenizer has no thinking markers)."""


def parser_markers(name: str) -> ThinkMarkers:
    """The markers of the reasoning parser ``name``; a one-line error naming the known ones."""
    try:
        return PARSERS[name]
    except KeyError:
        raise Dsr1Error(f"unknown reasoning parser {name!r}{did_you_mean(name, PARSERS)}") from None


def starts_in_thinking(prompt_text: str, markers: ThinkMarkers = ThinkMarkers()) -> bool:
    """Whether a rendered prompt opens a thinking block for the output (it ends with the start marker,
    trailing whitespace aside), as DeepSeek-R1's chat template does."""
    return prompt_text.rstrip().endswith(markers.start)


class ReasoningParser:
    """Incremental split of one output's text into reasoning and answer.

    ``feed(delta) -> (reasoning_delta, answer_delta)``; ``flush()`` at the end releases text held
    back as a possible marker start. :attr:`reasoning` and :attr:`answer` accumulate the deltas.
    """

    def __init__(self, markers: ThinkMarkers = ThinkMarkers(), in_thinking: bool = False) -> None:
        self.markers = markers
        self.in_thinking = in_thinking
        self.reasoning = ""
        self.answer = ""
        self._held = ""
        #: just past a marker (or at the start of an assumed block): leading whitespace is dropped
        self._fresh = in_thinking

    def _active(self, buf: str, at: int) -> tuple[str, ...]:
        """The markers that act at ``buf[at:]``: the end marker in a block (and a redundant start
        marker while the block has no reasoning text yet), the start marker outside."""
        m = self.markers
        if not self.in_thinking:
            return (m.start,)
        return (m.end, m.start) if self._fresh and not buf[:at].strip() else (m.end,)

    def feed(self, delta: str) -> tuple[str, str]:
        out = ["", ""]  # reasoning, answer
        buf = self._held + delta
        while True:
            hits = [(i, m) for m in self._active(buf, 0) if (i := buf.find(m)) >= 0]
            hits = [(i, m) for i, m in hits if m in self._active(buf, i)]
            if not hits:
                break
            i, m = min(hits)
            self._emit(buf[:i], out)
            buf = buf[i + len(m):]
            if m == self.markers.end:
                self.in_thinking = False
            self.in_thinking = self.in_thinking or m == self.markers.start
            self._fresh = True
        n = len(buf)
        longest = max(len(self.markers.start), len(self.markers.end))
        hold = max((k for k in range(1, min(n, longest - 1) + 1) for m in self._active(buf, n - k)
                    if k < len(m) and buf.endswith(m[:k])), default=0)
        self._held = buf[n - hold:] if hold else ""
        self._emit(buf[: n - hold], out)
        return out[0], out[1]

    def flush(self) -> tuple[str, str]:
        """Emit what is held back (it did not become a marker)."""
        out = ["", ""]
        held, self._held = self._held, ""
        self._emit(held, out)
        return out[0], out[1]

    def _emit(self, text: str, out: list[str]) -> None:
        if self._fresh:
            text = text.lstrip()
            if not text:
                return
            self._fresh = False
        if self.in_thinking:
            out[0] += text
            self.reasoning += text
        else:
            out[1] += text
            self.answer += text


def split_reasoning(text: str, markers: ThinkMarkers = ThinkMarkers(), in_thinking: bool = False) -> tuple[str, str]:
    """``(reasoning, answer)`` of a whole text: what :class:`ReasoningParser` gives for it."""
    parser = ReasoningParser(markers, in_thinking)
    parser.feed(text)
    parser.flush()
    return parser.reasoning, parser.answer


# --- the thinking budget --------------------------------------------------------------------------


def marker_id(tokenizer: Any, marker: str) -> int | None:
    """The id of ``marker`` when it is one token of the tokenizer's vocabulary, else None."""
    if tokenizer is None:
        return None
    try:
        tid = tokenizer.convert_tokens_to_ids(marker)
    except (KeyError, ValueError, TypeError):
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0 or (unk is not None and tid == unk):
        return None
    return tid


def thinking_ids(tokenizer: Any, markers: ThinkMarkers = ThinkMarkers()) -> tuple[list[int], list[int]] | None:
    """``(start ids, end ids)`` of the markers in ``tokenizer``, or None when it lacks either."""
    start, end = marker_id(tokenizer, markers.start), marker_id(tokenizer, markers.end)
    return None if start is None or end is None else ([start], [end])


def with_thinking_ids(params: Any, tokenizer: Any, markers: ThinkMarkers = ThinkMarkers()) -> Any:
    """``params`` ready for the decoder: a budget gets the markers' ids from ``tokenizer`` (ids the
    caller gave are kept); a budget the tokenizer has no markers for is dropped with a
    :class:`ThinkingBudgetWarning`. Params without a budget come back as they are."""
    if params.max_thinking_tokens is None or params.think_end_ids:
        return params
    ids = thinking_ids(tokenizer, markers)
    if ids is None:
        warnings.warn(f"max_thinking_tokens is ignored: the tokenizer has no thinking markers ({markers.start!r} "
                      f"and {markers.end!r} as tokens of its vocabulary)", ThinkingBudgetWarning, stacklevel=3)
        return params.model_copy(update={"max_thinking_tokens": None})
    return params.model_copy(update={"think_start_ids": ids[0], "think_end_ids": ids[1]})


def budget_window(budget: int, start: Sequence[int], end: Sequence[int]) -> int:
    """How many trailing ids :func:`forced_token` reads: a block is closed by force before it grows
    longer, so its start marker is always within reach (a few ids of slack for a template's newline)."""
    return budget + len(start) + len(end) + 8


def _last(ids: Sequence[int], marker: Sequence[int]) -> int:
    """Where the last complete occurrence of ``marker`` in ``ids`` ends, or -1."""
    n, k = len(ids), len(marker)
    for i in range(n, k - 1, -1):
        if ids[i - 1] == marker[-1] and list(ids[i - k : i]) == list(marker):
            return i
    return -1


def forced_token(ids: Sequence[int], budget: int, start: Sequence[int], end: Sequence[int]) -> int | None:
    """The id the next token must be under a thinking budget, or None (free choice).

    ``ids`` are a request's last ids (prompt then output; :func:`budget_window` of them suffice).
    The thinking block is open when the last marker in them is ``start``; it holds the ids after
    that marker (prompt ids after it included). Once they reach ``budget``, the end marker's ids
    come next, one per step (a started end marker is continued where it is).
    """
    if not end:
        return None
    s = _last(ids, start) if start else -1
    e = _last(ids, end)
    if s < 0 or e > s:
        return None
    after = ids[s:]
    partial = next((k for k in range(min(len(end) - 1, len(after)), 0, -1)
                    if list(after[len(after) - k:]) == list(end[:k])), 0)
    if len(after) - partial < budget:
        return None
    return int(end[partial])


__all__ = ["PARSERS", "ReasoningParser", "ThinkMarkers", "ThinkingBudgetWarning", "budget_window", "forced_token",
           "parser_markers", "split_reasoning", "starts_in_thinking", "thinking_ids", "with_thinking_ids"]
