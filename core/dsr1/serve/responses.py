"""OpenAI response bodies and server-sent-event chunks, built from the engine's ``RequestOutput``.

Plain dicts in the field layout of OpenAI's API (``choices``, ``finish_reason``, ``usage``,
``logprobs``), so the official client parses them. With a reasoning parser on (``dsr1 serve
--reasoning-parser``), a chat message or delta carries the thinking as ``reasoning_content`` and
only the answer as ``content`` (DeepSeek's API and vLLM's field). ``finish_reason`` is the engine's:
``stop`` (eos, a stop string or id), ``length``, or ``abort`` (the client went away or a drain's
deadline passed; vLLM's name, since OpenAI has none for it).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from dsr1.engine.engine import RequestOutput


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event; ``[DONE]`` ends a stream."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(out: RequestOutput) -> dict[str, int]:
    n_prompt, n_out = len(out.prompt_ids), len(out.output_ids)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


@dataclass
class Reply:
    """One request's reply as it is built: ids, the model name, and how many logprobs were sent."""

    kind: str  # "completion" or "chat"
    model: str
    tokenizer: Any
    want_logprobs: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    sent_logprobs: int = 0
    text_offset: int = 0
    role_sent: bool = False
    #: chat with a reasoning parser: the thinking goes to ``reasoning_content``
    reasoning: bool = False

    def __post_init__(self) -> None:
        self.id = new_id("cmpl" if self.kind == "completion" else "chatcmpl")

    # --- logprobs ----------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return str(self.tokenizer.decode([token_id]))

    def _logprobs(self, out: RequestOutput, final: bool) -> dict[str, Any] | None:
        """The logprobs of the tokens not sent yet (all of them for a whole reply)."""
        if not self.want_logprobs or out.logprobs is None:
            return None
        start = 0 if final else self.sent_logprobs
        items = out.logprobs[start:]
        ids = out.output_ids[start:start + len(items)]
        self.sent_logprobs = start + len(items)
        if self.kind == "chat":
            content = []
            for tid, (lp, top) in zip(ids, items):
                tok = self._token(tid)
                content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")),
                                "top_logprobs": [{"token": (t := self._token(i)), "logprob": p,
                                                  "bytes": list(t.encode("utf-8"))} for i, p in top]})
            return {"content": content}
        tokens = [self._token(t) for t in ids]
        offsets = []
        for tok in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(tok)
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in items],
                "top_logprobs": [{self._token(i): p for i, p in top} for _, top in items], "text_offset": offsets}

    # --- whole replies -----------------------------------------------------------------------

    def full(self, out: RequestOutput) -> dict[str, Any]:
        """The non-streaming body of a finished request."""
        lp = self._logprobs(out, final=True)
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": out.text}
            if self.reasoning and out.answer is not None:
                message = {"role": "assistant", "content": out.answer, "reasoning_content": out.reasoning or None}
            choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": lp,
                                      "finish_reason": out.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out.text, "logprobs": lp, "finish_reason": out.finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage(out)}

    # --- stream chunks ------------------------------------------------------------------------

    def chunk(self, out: RequestOutput) -> dict[str, Any]:
        """One streamed chunk: the text and logprobs this output added (and the finish reason)."""
        lp = self._logprobs(out, final=False)
        reason = out.finish_reason if out.finished else None
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": out.delta}
            if self.reasoning and out.answer_delta is not None:
                delta = {"content": out.answer_delta} if out.answer_delta or not out.reasoning_delta else {}
                if out.reasoning_delta:
                    delta["reasoning_content"] = out.reasoning_delta
            if not self.role_sent:  # the role rides on the first token's chunk, so its arrival is the TTFT
                delta = {"role": "assistant", **delta}
                self.role_sent = True
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": out.delta, "logprobs": lp, "finish_reason": reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, out: RequestOutput) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": usage(out)}


__all__ = ["Reply", "error_body", "new_id", "sse", "usage"]
