"""Per-request text as tokens arrive: incremental detokenization and stop conditions.

:class:`IncrementalDetokenizer` turns each new token into the text it adds without decoding
the whole output again (TGI's and vLLM's ``prefix_offset``/``read_offset`` technique): it
decodes a short window of recent ids twice, once without the newest ones, and the text
the newest ones add is the difference. A window that ends in an incomplete UTF-8 sequence
(byte-level BPE splits one character over several tokens) decodes to a trailing U+FFFD;
that text is held back until the character is complete.

:class:`StopChecker` decides when a request is finished: the model's eos ids (unless
``ignore_eos``), ``stop_token_ids``, ``stop`` strings (also those that span tokens; only
the new tail of the text is searched) and ``max_tokens``. It returns the *visible* text:
the output cut before a stop string, and, while running, without a tail that could still
become one, so a stream never shows part of a stop string it later takes back.

Both are plain Python over a tokenizer with ``decode(ids, skip_special_tokens=...)``:
dsr1's own (:class:`dsr1.preprocess.hf_tokenizer.Tokenizer`) or a transformers one.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from dsr1.errors import Dsr1Error
from dsr1.interfaces import SamplingParams

#: prompt ids decoded before the first output token (vLLM's initial offset): enough context for
#: decoders that strip a leading space at the start of a text (SentencePiece's "▁").
PROMPT_CONTEXT = 5
#: most tokens held back for an incomplete character. A UTF-8 character has at most 4 bytes, so a
#: text still incomplete after this many tokens holds invalid bytes that no token will complete
#: (or tokens that decode to nothing, as skipped special tokens): it is emitted as decoded, and the
#: window stays short whatever the model emits.
MAX_HELD = 8

FinishReason = Literal["stop", "length"]


class IncrementalDetokenizer:
    """Text deltas of one request's output ids, decoding only a window of recent ids.

    ``add(ids)`` returns the text the ids add (possibly ``""`` while a character is
    incomplete); ``text`` is all output text so far; ``flush()`` returns what is still held
    back (call it when the request finishes). Concatenated deltas + ``flush()`` equal
    ``tokenizer.decode(prompt_ids + output_ids)`` minus the prompt's text, which for the usual
    tokenizers is ``tokenizer.decode(output_ids)``.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        #: ids from vLLM's ``prefix_offset`` on: the already emitted context, then the unread ids.
        self._window: list[int] = [int(t) for t in list(prompt_ids)[-PROMPT_CONTEXT:]]
        #: ``read_offset - prefix_offset``: ids before it have been emitted as text.
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        self._text = ""
        #: output ids seen (by ``add``).
        self.num_tokens = 0
        #: output index of the first id of the latest ``add``, and where each of its ids' text starts.
        self._last_first = 0
        self._last_starts: list[int] = []

    @property
    def text(self) -> str:
        """All output text emitted so far (without text held back for an incomplete character)."""
        return self._text

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def add(self, token_ids: Sequence[int]) -> str:
        """Take new output ids; returns the text they add (the delta)."""
        start = len(self._text)
        self._last_first, self._last_starts = self.num_tokens, []
        for token in token_ids:
            self._last_starts.append(len(self._text))
            self._window.append(int(token))
            self.num_tokens += 1
            self._text += self._step(force=False)
        return self._text[start:]

    def flush(self) -> str:
        """Emit what is held back (text ending in an incomplete character, as decoded); ``""`` if nothing."""
        if self._read == len(self._window):
            return ""
        delta = self._step(force=True)
        self._text += delta
        return delta

    def text_before(self, index: int) -> str:
        """The text emitted before output id ``index`` (one of the latest ``add``'s ids) was added."""
        if not self._last_first <= index < self._last_first + len(self._last_starts):
            raise ValueError(f"text_before({index}): only ids of the latest add ({self._last_first} to "
                             f"{self._last_first + len(self._last_starts) - 1}) are remembered")
        return self._text[: self._last_starts[index - self._last_first]]

    def _step(self, force: bool) -> str:
        text = self._decode(self._window)  # the window: a few emitted ids of context + the unread ids
        held = len(self._window) - self._read
        complete = len(text) > len(self._prefix_text) and not text.endswith("\ufffd")
        if not (complete or force or held >= MAX_HELD):
            return ""  # an incomplete character (or nothing new yet): wait for the next id
        delta = text[len(self._prefix_text):]
        # the ids just read become the next window's context; older ids are never decoded again
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return delta


class StopChecker:
    """Whether one request is finished, and which of its text may be shown.

    ``check(output_ids, detok)`` after each step: it feeds ``detok`` the ids it has not seen
    (so callers need not call ``detok.add`` themselves; ids they did add are not added
    again, but then a stop id's text is cut off together with anything still held back
    before it, half a character at most), then looks at each new id in order and returns
    ``(finish_reason, visible_text)``:

    - ``"stop"`` on an eos id (unless ``ignore_eos``) or a ``stop_token_ids`` id: that id's text
      is left out of the visible text unless ``include_stop_str_in_output``;
    - ``"stop"`` on a ``stop`` string: the visible text ends before it (after it with
      ``include_stop_str_in_output``); the earliest occurrence wins;
    - ``"length"`` once ``max_tokens`` ids are out;
    - ``None`` otherwise; the visible text then leaves out a tail that is the start of a stop
      string (it may still become one), so visible texts only ever grow.

    When several ids are checked at once and one finishes the request, :attr:`num_tokens`
    says how many output ids count; the caller drops the rest. ``detok`` may be ``None``
    (no tokenizer): the visible text is then ``""`` and stop strings are refused.
    """

    def __init__(self, params: SamplingParams, eos_ids: Sequence[int]) -> None:
        self.params = params
        eos = frozenset() if params.ignore_eos else frozenset(int(t) for t in eos_ids)
        self.stop_ids = eos | frozenset(params.stop_token_ids)
        self.stops = list(params.stop)
        self._longest = max((len(s) for s in self.stops), default=0)
        #: text length already searched for stop strings.
        self._searched = 0
        #: output ids looked at (the ones that count once finished).
        self.num_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._visible = ""

    def check(self, output_ids: Sequence[int], detok: IncrementalDetokenizer | None) -> tuple[FinishReason | None, str]:
        if self.finish_reason is not None:
            return self.finish_reason, self._visible
        if detok is None and self.stops:
            raise Dsr1Error("stop strings need a tokenizer to read the text: load the model from a dir with "
                            "tokenizer.json, or use stop_token_ids")
        if detok is not None and detok.num_tokens > len(output_ids):
            raise ValueError(f"the detokenizer has seen {detok.num_tokens} ids, the request has {len(output_ids)}")
        include = self.params.include_stop_str_in_output
        for j in range(self.num_tokens, len(output_ids)):
            token = int(output_ids[j])
            self.num_tokens = j + 1
            fed = detok is not None and detok.num_tokens > j
            if token in self.stop_ids:
                if detok is None:
                    return self._finish("stop", "")
                if include and not fed:
                    detok.add([token])
                if include or not fed:
                    detok.flush()
                    return self._finish("stop", detok.text)
                return self._finish("stop", detok.text_before(j))  # added by the caller: cut its text off
            if detok is not None:
                if not fed:
                    detok.add([token])
                hit = self._find_stop(detok.text)
                if hit is not None:
                    return self._finish("stop", hit)
            max_tokens = self.params.max_tokens
            if max_tokens is not None and j + 1 >= max_tokens:
                if detok is None:
                    return self._finish("length", "")
                detok.flush()
                hit = self._find_stop(detok.text)
                return self._finish("stop", hit) if hit is not None else self._finish("length", detok.text)
        if detok is None:
            return None, ""
        self._visible = self._without_partial_stop(detok.text)
        return None, self._visible

    def _finish(self, reason: FinishReason, visible: str) -> tuple[FinishReason, str]:
        self.finish_reason, self._visible = reason, visible
        return reason, visible

    def _find_stop(self, text: str) -> str | None:
        """The visible text if a stop string ends in the text added since the last search, else None."""
        if not self.stops:
            return None
        start = max(0, self._searched - self._longest + 1)  # an occurrence may begin in the old text's tail
        self._searched = len(text)
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        return text[: i + len(s)] if self.params.include_stop_str_in_output else text[:i]

    def _without_partial_stop(self, text: str) -> str:
        """``text`` less its longest tail that begins a stop string (with the stop string in the
        output nothing is taken back later, so nothing is held)."""
        if not self.stops or self.params.include_stop_str_in_output:
            return text
        for k in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return text[:-k]
        return text
