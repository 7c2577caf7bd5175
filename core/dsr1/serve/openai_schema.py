"""The OpenAI request bodies ``dsr1 serve`` takes, and their mapping onto :class:`SamplingParams`.

Every field the server accepts is declared here; anything else in a body is refused with a 400
that names the field (``extra="forbid"``), so a client never believes a setting acted when it
did not. Fields that OpenAI defines but dsr1 supports only at their default (``n``, ``best_of``,
``echo``, ``logit_bias``, ``response_format``) are declared so that the default is accepted and
any other value is a 400 saying so. ``top_k``, ``min_p``, ``repetition_penalty``,
``stop_token_ids`` and ``ignore_eos`` are extensions (vLLM's names), and so is
``max_thinking_tokens``: a reasoning model's thinking budget (a model without thinking markers
ignores it, with a warning in the server's log).

Sampling defaults: a field left out takes the model's ``generation_config.json`` value, so a
checkpoint without sampling defaults decodes greedily unless the request sets ``temperature > 0``.
A truncation knob (``top_p``, ``top_k``, ``min_p``) set to something other than "off" while
decoding is greedy would do nothing, and is a 400 instead.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from dsr1.errors import Dsr1Error, did_you_mean, quote
from dsr1.interfaces import SamplingParams

#: OpenAI's default ``max_tokens`` for ``/v1/completions`` (chat generates up to the context).
COMPLETIONS_MAX_TOKENS = 16
#: most stop strings one request may give.
MAX_STOP = 16


class BadRequest(Dsr1Error):
    """A request the server refuses with a 4xx; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = "invalid_value", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code, self.headers = param, status, code, headers


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a bool")
    return value


Int = Annotated[int, BeforeValidator(_no_bool)]
Float = Annotated[float, BeforeValidator(_no_bool)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: Float | None = Field(default=None, ge=0, le=2)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    top_k: Int | None = Field(default=None, ge=-1)  # extension; -1 and 0 turn it off
    min_p: Float | None = Field(default=None, ge=0, le=1)  # extension
    repetition_penalty: Float | None = Field(default=None, gt=0)  # extension
    presence_penalty: Float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: Float | None = Field(default=None, ge=-2, le=2)
    seed: Int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None  # extension
    ignore_eos: bool = False  # extension
    max_thinking_tokens: Int | None = Field(default=None, ge=0)  # extension: the thinking budget
    n: Int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    #: an end-user id for the caller's own abuse tracking (OpenAI): recorded nowhere, changes nothing.
    user: str | None = None


class CompletionRequest(_Common):
    prompt: str | list[Int] | list[str] | list[list[Int]]
    logprobs: Int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: Int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "function-before", "function-after"})


def parse(model: type[BaseModel], body: Any) -> Any:
    """``body`` (decoded JSON) as ``model``; the first problem as a :class:`BadRequest` naming its field."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors(include_url=False, include_context=False)[0]
        # a union's error names the member type it tried ('str', 'list[int]'): not a place in the body
        loc = [p for p in first["loc"] if isinstance(p, int) or (p not in _TYPE_TAGS and "[" not in p)]
        param = ".".join(str(p) for p in loc) if loc else None
        top = param
        if first["type"] == "extra_forbidden":
            fields = model.model_fields if len(loc) == 1 else {}
            raise BadRequest(f"unsupported field {param!r}: dsr1 serve does not implement it"
                             f"{did_you_mean(str(loc[-1]), fields)}", param=param, code="unsupported_field") from None
        if first["type"] == "missing":
            raise BadRequest(f"missing required field {param!r}", param=param, code="missing_field") from None
        value = first.get("input")
        shown = f", got {quote(value)}" if isinstance(value, (str, int, float, bool)) or value is None else ""
        msg = first["msg"].removeprefix("Value error, ")
        raise BadRequest(f"field {top!r}: {msg[:1].lower()}{msg[1:]}{shown}", param=top) from None


def check_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """Fields that only their default value may take."""
    if req.n not in (None, 1):
        raise BadRequest(f"n={req.n} is not supported: dsr1 serve returns one choice per request (n=1); send "
                         f"several requests instead", param="n", code="unsupported_value")
    if req.logit_bias:
        raise BadRequest("logit_bias is not supported by dsr1 serve; leave it out", param="logit_bias",
                         code="unsupported_value")
    if req.stream_options is not None and not req.stream:
        raise BadRequest("stream_options needs stream: true", param="stream_options")
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise BadRequest("echo=true is not supported by dsr1 serve", param="echo", code="unsupported_value")
        if req.best_of not in (None, 1):
            raise BadRequest(f"best_of={req.best_of} is not supported: dsr1 serve returns one choice (best_of=1)",
                             param="best_of", code="unsupported_value")
    else:
        if req.response_format not in (None, {"type": "text"}):
            raise BadRequest("response_format other than {'type': 'text'} is not supported by dsr1 serve",
                             param="response_format", code="unsupported_value")
        if req.top_logprobs is not None and not req.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")


def prompt_of(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text or token ids."""
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise BadRequest(f"prompt holds {len(p)} prompts; dsr1 serve takes one prompt per request",
                             param="prompt", code="unsupported_value")
        p = p[0]
    if not p:
        raise BadRequest("prompt is empty; give the text (or token ids) to continue", param="prompt")
    return p  # type: ignore[return-value]  # str or list[int] after the checks above


def messages_of(req: ChatCompletionRequest) -> list[dict[str, str]]:
    """The messages as the chat template takes them: role and text content."""
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                     f"are supported, got type {quote(part.get('type'))}",
                                     param=f"messages.{i}.content", code="unsupported_value")
                texts.append(part["text"])
            content = "".join(texts)
        out.append({"role": m.role, "content": content or ""})
    return out


def sampling_params(req: CompletionRequest | ChatCompletionRequest, defaults: SamplingParams,
                    max_tokens: int) -> SamplingParams:
    """The request's sampling settings over the model's defaults (``max_tokens`` already decided)."""
    fields: dict[str, Any] = defaults.model_dump(exclude_unset=True)
    if req.temperature is not None:
        fields["temperature"] = req.temperature
        fields["do_sample"] = req.temperature > 0
    greedy = not fields.get("do_sample", False) or fields.get("temperature", 1.0) == 0
    neutral = {"top_p": 1.0, "top_k": (0, -1), "min_p": 0.0}
    for name, off in neutral.items():
        value = getattr(req, name)
        if value is None:
            continue
        if greedy and value not in (off if isinstance(off, tuple) else (off,)):
            raise BadRequest(f"{name}={value} has no effect with greedy decoding (temperature 0, or the model's "
                             f"default); set temperature > 0 to sample, or leave {name} out", param=name)
        fields[name] = 0 if name == "top_k" and value == -1 else value
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            fields[name] = value
    stop = req.stop
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise BadRequest(f"stop holds {len(stops)} strings; at most {MAX_STOP}", param="stop")
    if req.stop_token_ids:
        fields["stop_token_ids"] = req.stop_token_ids
    if isinstance(req, CompletionRequest):
        logprobs = req.logprobs
    else:
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    try:
        return SamplingParams(**fields, stop=stops, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                              logprobs=logprobs, max_thinking_tokens=req.max_thinking_tokens)
    except Dsr1Error as err:  # a value SamplingParams refuses: its one line names the parameter
        raise BadRequest(str(err)) from None


def requested_max_tokens(req: CompletionRequest | ChatCompletionRequest) -> int | None:
    """``max_tokens`` (or chat's ``max_completion_tokens``) as given, or None."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != req.max_completion_tokens:
            raise BadRequest(f"max_tokens={req.max_tokens} and max_completion_tokens={req.max_completion_tokens} "
                             f"disagree; give one of them", param="max_tokens")
        return req.max_completion_tokens
    return req.max_tokens


def decide_max_tokens(req: CompletionRequest | ChatCompletionRequest, prompt_len: int, context: int) -> int:
    """The output budget: as asked (refused with both numbers past the context), else the
    endpoint's default within the room the prompt leaves."""
    param = "messages" if isinstance(req, ChatCompletionRequest) else "prompt"
    if prompt_len >= context:
        raise BadRequest(f"the prompt has {prompt_len} tokens, but the model's context is {context} tokens; "
                         f"shorten it to at most {context - 1} tokens", param=param, code="context_length_exceeded")
    room = context - prompt_len
    asked = requested_max_tokens(req)
    if asked is not None:
        if asked > room:
            raise BadRequest(f"the prompt has {prompt_len} tokens and max_tokens is {asked}: {prompt_len + asked} "
                             f"tokens, more than the model's context of {context}; lower max_tokens to at most "
                             f"{room}", param="max_tokens", code="context_length_exceeded")
        return asked
    return min(COMPLETIONS_MAX_TOKENS, room) if isinstance(req, CompletionRequest) else room


__all__ = ["BadRequest", "ChatCompletionRequest", "CompletionRequest", "check_unsupported", "decide_max_tokens",
           "messages_of", "parse", "prompt_of", "sampling_params"]
