"""``SamplingParams``: one request's sampling, stopping and output settings (plain data).

Lives below :mod:`dsr1.interfaces` (which re-exports it) so that the scheduler's request
state, the decoders and the detokenizer share one validated type without an import
circle. Every bad value is refused when the params are made, with one line that names
the parameter and its valid range; the per-token path then trusts them.

Semantics follow the references people compare with: transformers' ``generate`` for
``do_sample``/``temperature``/``top_k``/``top_p``/``min_p``/``repetition_penalty`` (the
same order and edge cases), OpenAI's API for ``presence_penalty``/``frequency_penalty``,
and vLLM's ``SamplingParams`` for ``stop``/``stop_token_ids``/``ignore_eos``/``logprobs``/
``skip_special_tokens``/``include_stop_str_in_output``/``logits_processors``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from dsr1.errors import Dsr1Error, did_you_mean, quote

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

#: ``(output_ids, logits (V,)) -> logits (V,)``: vLLM's logits-processor signature, the hook that
#: constrained-output libraries plug into. Called per row, before any penalty or warper.
LogitsProcessor = Callable[[list[int], Any], Any]

#: most top logprobs one token may ask for (OpenAI's and vLLM's default limit).
MAX_LOGPROBS = 20

#: field → (low, high or None, low included, high included, what a bad value is told)
RANGES: dict[str, tuple[float, float | None, bool, bool, str]] = {
    "temperature": (0, None, True, True, "must be >= 0 (0 = greedy)"),
    "top_k": (0, None, True, True, "must be an integer >= 0 (0 turns it off)"),
    "top_p": (0, 1, False, True, "must be in (0, 1] (1 turns it off)"),
    "min_p": (0, 1, True, True, "must be in [0, 1] (0 turns it off)"),
    "repetition_penalty": (0, None, False, True, "must be > 0 (1 turns it off)"),
    "presence_penalty": (-2, 2, True, True, "must be in [-2, 2] (0 turns it off)"),
    "frequency_penalty": (-2, 2, True, True, "must be in [-2, 2] (0 turns it off)"),
    "seed": (0, 2**64, True, False, "must be an integer in [0, 2**64) or None"),
    "max_tokens": (1, None, True, True, "must be an integer >= 1 or None"),
    "logprobs": (0, MAX_LOGPROBS, True, True, f"must be an integer in [0, {MAX_LOGPROBS}] or None"),
    "max_thinking_tokens": (0, None, True, True, "must be an integer >= 0 or None (None: no budget)"),
}
#: ``generation_config.json`` keys that give sampling defaults (eos/pad ids are the engine's business).
GENERATION_CONFIG_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _int(value: Any) -> Any:
    # pydantic's lax mode turns True into 1; a bool where a count or id belongs is a caller's mistake
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a bool")
    return value


Int = Annotated[int, BeforeValidator(_int)]


class SamplingParams(BaseModel):
    """Per-request sampling settings; immutable once made (rows of a batch may share one).

    Greedy unless ``do_sample`` and ``temperature > 0``. With ``do_sample`` the order is
    transformers': logits processors → repetition penalty → presence/frequency penalty →
    temperature → top-k → top-p → min-p → multinomial draw.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    do_sample: bool = False
    #: divides the logits before sampling; 0 means greedy (as ``do_sample=False``).
    temperature: float = 1.0
    #: keep the k most likely tokens (and ties with the k-th); 0 turns it off.
    top_k: Int = 0
    #: keep the smallest most-likely set whose probability reaches top_p; 1 turns it off.
    top_p: float = 1.0
    #: keep tokens whose probability is at least ``min_p`` times the top one's (after temperature); 0 off.
    min_p: float = 0.0
    #: transformers' (CTRL) penalty over prompt + output ids: divides positive logits, multiplies negative.
    repetition_penalty: float = 1.0
    #: OpenAI: subtracted once from the logit of every token already in the output.
    presence_penalty: float = 0.0
    #: OpenAI: subtracted from a token's logit once per time it occurs in the output.
    frequency_penalty: float = 0.0
    #: seeds this request's own generator: the same seed gives the same tokens in any batch.
    seed: Int | None = None
    #: most output tokens (finish reason ``"length"``); ``None``: up to the context.
    max_tokens: Int | None = None
    #: strings that end the output (not included in it unless ``include_stop_str_in_output``).
    stop: list[str] = Field(default_factory=list)
    #: token ids that end the output, in addition to the model's eos ids.
    stop_token_ids: list[Int] = Field(default_factory=list)
    #: keep going past the model's eos ids (``stop``/``stop_token_ids`` still stop).
    ignore_eos: bool = False
    #: how many top logprobs per output token to return; 0: only the sampled token's; None: none.
    logprobs: Int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    #: most tokens a thinking block may hold before its end marker is forced (reasoning models;
    #: :mod:`dsr1.decoding.reasoning`). ``None``: no budget. Needs the markers' ids below, which the
    #: engine and ``model.generate`` fill from the tokenizer (a tokenizer without markers: a warning,
    #: and the budget is dropped).
    max_thinking_tokens: Int | None = None
    #: the ids that open and close a thinking block, for ``max_thinking_tokens`` (empty: from the tokenizer).
    think_start_ids: list[Int] = Field(default_factory=list)
    think_end_ids: list[Int] = Field(default_factory=list)
    #: ``(output_ids, logits (V,)) -> logits (V,)`` callables, applied in order (not serialised).
    logits_processors: list[LogitsProcessor] = Field(default_factory=list, exclude=True)

    # --- validation: one line per bad value -------------------------------------------------

    @model_validator(mode="wrap")
    @classmethod
    def _one_line_errors(cls, data: Any, handler: Any) -> Any:
        try:
            return handler(data)
        except ValidationError as err:
            raise Dsr1Error(_format(err)) from None

    @field_validator("stop", mode="before")
    @classmethod
    def _wrap_stop(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @field_validator(*RANGES)
    @classmethod
    def _check_range(cls, value: float | None, info: ValidationInfo) -> float | None:
        low, high, closed_low, closed_high, message = RANGES[str(info.field_name)]
        if value is None:  # only the fields typed `| None` get here with None
            return value
        below = value < low if closed_low else value <= low
        above = high is not None and (value > high if closed_high else value >= high)
        if below or above:
            raise ValueError(message)
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("must hold non-empty strings (an empty one would stop before the first token)")
        return value

    @field_validator("stop_token_ids", "think_start_ids", "think_end_ids")
    @classmethod
    def _check_stop_token_ids(cls, value: list[int]) -> list[int]:
        if any(t < 0 for t in value):
            raise ValueError("must hold token ids >= 0")
        return value

    # --- derived ----------------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        """The next token is the most likely one (after processors and penalties)."""
        return not self.do_sample or self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Logits depend on the request's history: processors or a penalty are on."""
        return bool(self.logits_processors) or self.repetition_penalty != 1.0 or (
            self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)

    def make_generator(self, device: str | torch.device = "cpu") -> torch.Generator | None:
        """This request's generator on ``device`` seeded with :attr:`seed` (``None`` without a seed:
        draws then come from torch's global generator)."""
        if self.seed is None:
            return None
        import torch

        return torch.Generator(device=device).manual_seed(self.seed)

    @classmethod
    def from_generation_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> SamplingParams:
        """Params whose defaults are a model's ``generation_config.json`` sampling keys
        (:data:`GENERATION_CONFIG_KEYS`; other keys are not sampling settings and are left
        alone), with ``overrides`` (the caller's own settings) taking precedence."""
        defaults = {k: cfg[k] for k in GENERATION_CONFIG_KEYS if cfg.get(k) is not None}
        try:
            base = cls(**defaults)
        except Dsr1Error as err:
            raise Dsr1Error(f"generation_config.json: {err}") from None
        return cls(**{**base.model_dump(exclude_unset=True), **overrides})


def _format(err: ValidationError) -> str:
    """The first error of ``err`` as one line naming the parameter and what would be right."""
    first = err.errors(include_url=False, include_context=False)[0]
    loc = first["loc"]
    name = str(loc[0]) if loc else "<params>"
    where = f"{name}[{loc[1]}]" if len(loc) > 1 else name
    if first["type"] == "extra_forbidden":
        return f"unknown sampling parameter {name!r}{did_you_mean(name, SamplingParams.model_fields)}"
    value = first.get("input")
    shown = f", got {quote(value)}" if isinstance(value, (str, int, float, bool, list, tuple)) or value is None else ""
    if first["type"] == "value_error":  # our own range checks: "must be ..."
        return f"sampling parameter {where!r} {first['msg'].removeprefix('Value error, ')}{shown}"
    msg = first["msg"]  # pydantic's type errors: "Input should be a valid integer"
    return f"sampling parameter {where!r}: {msg[:1].lower()}{msg[1:]}{shown}"
