"""Builtin preprocess plugin ``tokenizers``: a tokenizer on the ``tokenizers`` library.

:class:`Tokenizer` reads ``tokenizer.json`` (+ ``tokenizer_config.json`` for special tokens
and the chat template, ``config.json`` for the context length) and offers the calls people
know from transformers: ``tok(text or list, return_tensors="pt", padding=True)``,
``decode``, ``batch_decode`` and ``apply_chat_template`` (rendered in jinja2's immutable
sandbox). Causal LMs are padded on the left by default, encoders on the right.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from dsr1.errors import Dsr1Error
from dsr1.hookspecs import hookimpl
from dsr1.input_files import is_regular, read_text
from dsr1.interfaces import Preprocessor
from dsr1.preprocess.chat_template import TEMPLATE_MAX_CHARS, TEMPLATE_TIME_LIMIT_S, ChatTemplate, TemplateLimits
from dsr1.specs import PluginSpec

#: model types that are encoders (padded on the right, with token type ids).
ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "xlm-roberta"})
#: transformers writes this "no limit" value as model_max_length.
_UNLIMITED = 10**12


class BatchEncoding(dict):  # type: ignore[type-arg]  # dict[str, Any], like transformers'
    """``input_ids`` / ``attention_mask`` (/ ``token_type_ids``), by key or attribute."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _read_json(path: Path) -> dict[str, Any]:
    if not is_regular(path, "tokenizer file"):  # a FIFO or directory in its place is an error, not "absent"
        return {}
    try:
        data = json.loads(read_text(path, "tokenizer file"))
    except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, a 5000-digit number, nesting past the stack
        raise Dsr1Error(f"{path} is not valid JSON: {str(err).splitlines()[0] if str(err) else type(err).__name__}") \
            from None
    return data if isinstance(data, dict) else {}


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A checkpoint's tokenizer (``tokenizer.json``) with transformers-like calls."""

    def __init__(
        self,
        backend: Any,
        special: Mapping[str, str | None],
        padding_side: str = "left",
        model_max_length: int | None = None,
        chat_template: str | None = None,
        token_type_ids: bool = False,
        chat_template_origin: str = "this tokenizer",
        template_limits: TemplateLimits | None = None,
    ) -> None:
        self.backend = backend  # tokenizers.Tokenizer
        self.backend.no_padding()
        self.backend.no_truncation()
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.chat_template = chat_template
        self.return_token_type_ids = token_type_ids
        self.bos_token = special.get("bos_token")
        self.eos_token = special.get("eos_token")
        self.unk_token = special.get("unk_token")
        self.pad_token = special.get("pad_token") or self.eos_token
        #: where the chat template came from, for errors (``'<model dir>'/tokenizer_config.json``).
        self.chat_template_origin = chat_template_origin
        self.template_limits = template_limits or TemplateLimits()
        self._template: ChatTemplate | None = None

    @classmethod
    def from_dir(cls, model_dir: Path, padding_side: str = "auto",
                 template_limits: TemplateLimits | None = None) -> Tokenizer:
        from tokenizers import Tokenizer as Backend

        path = Path(model_dir) / "tokenizer.json"
        if not is_regular(path, "tokenizer file"):
            raise Dsr1Error(f"no tokenizer.json in {str(model_dir)!r}; dsr1 reads tokenizers in the tokenizers-library "
                            f"format (save one with transformers' tokenizer.save_pretrained)")
        try:
            backend = Backend.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exception
            raise Dsr1Error(f"cannot read {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        cfg = _read_json(Path(model_dir) / "tokenizer_config.json")
        special_map = _read_json(Path(model_dir) / "special_tokens_map.json")
        model_cfg = _read_json(Path(model_dir) / "config.json")
        special = {k: _content(cfg.get(k)) or _content(special_map.get(k))
                   for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        if special["eos_token"] is None and isinstance(model_cfg.get("eos_token_id"), int):
            special["eos_token"] = backend.id_to_token(model_cfg["eos_token_id"])
        if special["bos_token"] is None and isinstance(model_cfg.get("bos_token_id"), int):
            special["bos_token"] = backend.id_to_token(model_cfg["bos_token_id"])
        model_type = model_cfg.get("model_type")
        if isinstance(model_cfg.get("quantization_config"), dict):  # a `dsr1 quantize` dir keeps the real type there
            model_type = model_cfg["quantization_config"].get("model_type", model_type)
        is_encoder = model_type in ENCODER_TYPES
        if padding_side == "auto":
            padding_side = "right" if is_encoder else "left"
        limits = [int(v) for v in (cfg.get("model_max_length"), model_cfg.get("max_position_embeddings"))
                  if isinstance(v, (int, float)) and 0 < v < _UNLIMITED]
        template = cfg.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = Path(model_dir) / "chat_template.jinja"
        if template is None and is_regular(jinja_file, "tokenizer file"):
            template = read_text(jinja_file, "tokenizer file")
        origin = str(Path(model_dir) / ("tokenizer_config.json" if cfg.get("chat_template") else "chat_template.jinja"))
        return cls(backend, special, padding_side, min(limits) if limits else None, template, is_encoder,
                   chat_template_origin=repr(origin), template_limits=template_limits)

    # --- special tokens --------------------------------------------------------------------

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        pad = self._id(self.pad_token)
        return pad if pad is not None else 0

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def __len__(self) -> int:
        return self.vocab_size

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> Any:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> Any:
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    # --- encoding ----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def __call__(
        self,
        text: str | Sequence[str],
        return_tensors: Literal["pt"] | None = None,
        padding: bool | str = True,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        padding_side: str | None = None,
        return_attention_mask: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a list; pads to the longest (``padding=True``) on ``padding_side``."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise Dsr1Error("tokenizer input must be a string or a non-empty list of strings")
        encs = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        ids = [list(e.ids) for e in encs]
        types = [list(e.type_ids) for e in encs]
        limit = max_length or self.model_max_length
        for i, row in enumerate(ids):
            if limit is not None and len(row) > limit:
                if not truncation:
                    raise Dsr1Error(f"prompt has {len(row)} tokens, longer than the model's context of {limit} tokens; "
                                    f"shorten it (from Python, truncation=True keeps its first {limit} tokens)")
                ids[i], types[i] = row[:limit], types[i][:limit]
        masks = [[1] * len(r) for r in ids]
        longest = max(len(r) for r in ids)
        if padding in (True, "longest", "max_length") and any(len(r) != longest for r in ids):
            width = (max_length or longest) if padding == "max_length" else longest
            left = (padding_side or self.padding_side) == "left"
            pad = self.pad_token_id
            for i in range(len(ids)):
                n = width - len(ids[i])
                fill = ([pad] * n, [0] * n)
                if left:
                    ids[i], masks[i], types[i] = fill[0] + ids[i], fill[1] + masks[i], fill[1] + types[i]
                else:
                    ids[i], masks[i], types[i] = ids[i] + fill[0], masks[i] + fill[1], types[i] + fill[1]
        out: dict[str, Any] = {"input_ids": ids}
        if return_attention_mask:
            out["attention_mask"] = masks
        if self.return_token_type_ids:
            out["token_type_ids"] = types
        if return_tensors == "pt":
            if len({len(r) for r in ids}) > 1:
                raise Dsr1Error("texts of different lengths need padding=True to become one tensor")
            return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in out.items()})
        if return_tensors is not None:
            raise Dsr1Error(f"return_tensors={return_tensors!r} is not supported; use 'pt' or None")
        if single:
            out = {k: v[0] for k, v in out.items()}
        return BatchEncoding(out)

    # --- decoding ----------------------------------------------------------------------------

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return str(self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [str(s) for s in self.backend.decode_batch(
            [[int(i) for i in seq] for seq in sequences], skip_special_tokens=skip_special_tokens)]

    # --- chat ----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_tensors: Literal["pt"] | None = None,
        return_dict: bool = True,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Render ``messages`` with the checkpoint's chat template in jinja2's immutable sandbox,
        within :attr:`template_limits` (see :mod:`dsr1.preprocess.chat_template`)."""
        if chat_template is not None:
            template = ChatTemplate(chat_template, "the chat_template argument", self.template_limits)
        elif self.chat_template is None:
            raise Dsr1Error("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        else:
            template = self._template or ChatTemplate(self.chat_template, self.chat_template_origin,
                                                      self.template_limits)
            self._template = template  # compiled once; rendering is thread-safe (each render has its own budget)
        text = template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs,
        )
        if not tokenize:
            return text
        enc = self(text, return_tensors=return_tensors, add_special_tokens=False)
        return enc if return_dict else enc["input_ids"]


class TokenizersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: ``auto``: left for causal LMs, right for encoders.
    padding_side: Literal["auto", "left", "right"] = "auto"
    #: seconds a chat template may take to render (:data:`~dsr1.preprocess.chat_template.TEMPLATE_TIME_LIMIT_S`).
    template_time_limit_s: float = Field(TEMPLATE_TIME_LIMIT_S, gt=0, le=3600)
    #: most characters a chat template may output or build (:data:`~dsr1.preprocess.chat_template.TEMPLATE_MAX_CHARS`).
    template_max_chars: int = Field(TEMPLATE_MAX_CHARS, ge=1, le=2**31)


class TokenizersPreprocessor(Preprocessor):
    Options = TokenizersOptions
    options: TokenizersOptions

    def load(self, model_dir: Path) -> Tokenizer:
        limits = TemplateLimits(self.options.template_time_limit_s, self.options.template_max_chars)
        return Tokenizer.from_dir(Path(model_dir), padding_side=self.options.padding_side, template_limits=limits)


@hookimpl
def dsr1_preprocess() -> PluginSpec:
    return PluginSpec(
        name="tokenizers",
        family="preprocess",
        impl=TokenizersPreprocessor,
        options=TokenizersOptions,
        capabilities=frozenset({"chat_template", "padding", "truncation"}),
        description="tokenizer.json via the tokenizers library; sandboxed jinja2 chat templates",
    )
