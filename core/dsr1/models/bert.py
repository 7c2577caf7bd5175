"""The ``bert`` encoder (BERT / MiniLM): ``last_hidden_state``, the tanh pooler when the
checkpoint has one, and sentence embeddings pooled like sentence-transformers'
all-MiniLM-L6-v2 (mean over real tokens, then L2-normalized).

Data flows: ids → word + position + token-type embeddings → LayerNorm → N × [attention
(no causality; padding keys masked) → dense → LayerNorm(residual) → dense → GELU → dense →
LayerNorm(residual)].
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsr1.errors import Dsr1Error
from dsr1.hookspecs import hookimpl
from dsr1.models.common import AttentionCall, Dsr1Model, EncoderOutput, bind_attention
from dsr1.models.hf_fields import integer, positive_number
from dsr1.models.loading import CheckpointBuilder, LoadOptions, check_names, choose_dtype
from dsr1.parallel.topology import refuse_tensor_parallel
from dsr1.specs import PluginSpec

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertArgs:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    eps: float
    act: str
    #: per-head size; ``hidden_size // n_heads`` unless config.json has ``head_dim`` (structured pruning
    #: removes heads but keeps their size, which transformers' BertConfig cannot express).
    head_dim: int = 0

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.n_heads)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> BertArgs:
        args = cls(
            vocab_size=integer(hf, "vocab_size"),
            hidden_size=integer(hf, "hidden_size"),
            n_layers=integer(hf, "num_hidden_layers"),
            n_heads=integer(hf, "num_attention_heads"),
            intermediate_size=integer(hf, "intermediate_size"),
            max_positions=integer(hf, "max_position_embeddings", 512),
            type_vocab_size=integer(hf, "type_vocab_size", 2),
            eps=positive_number(hf, "layer_norm_eps", 1e-12),
            act=str(hf.get("hidden_act", "gelu")),
            head_dim=integer(hf, "head_dim", 0, minimum=0),
        )
        if args.act not in ACTIVATIONS:
            raise Dsr1Error(f"config.json: hidden_act {args.act!r} not supported; supported: {', '.join(ACTIVATIONS)}")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise Dsr1Error("config.json: only absolute position embeddings are supported by the bert builder")
        return args

    def hf_tensor_shapes(self, pooler: bool) -> dict[str, tuple[int, ...]]:
        c, f, a = self.hidden_size, self.intermediate_size, self.n_heads * self.head_dim
        out: dict[str, tuple[int, ...]] = {
            "embeddings.word_embeddings.weight": (self.vocab_size, c),
            "embeddings.position_embeddings.weight": (self.max_positions, c),
            "embeddings.token_type_embeddings.weight": (self.type_vocab_size, c),
            "embeddings.LayerNorm.weight": (c,),
            "embeddings.LayerNorm.bias": (c,),
        }
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."
            for name in ("query", "key", "value"):
                out[p + f"attention.self.{name}.weight"] = (a, c)
                out[p + f"attention.self.{name}.bias"] = (a,)
            layer = {
                "attention.output.dense": (c, a), "intermediate.dense": (f, c), "output.dense": (c, f),
            }
            for name, shape in layer.items():
                out[p + name + ".weight"] = shape
                out[p + name + ".bias"] = (shape[0],)
            for name in ("attention.output.LayerNorm", "output.LayerNorm"):
                out[p + name + ".weight"] = (c,)
                out[p + name + ".bias"] = (c,)
        if pooler:
            out["pooler.dense.weight"] = (c, c)
            out["pooler.dense.bias"] = (c,)
        return out


class BertSelfAttention(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.query = nn.Linear(a.hidden_size, a.n_heads * a.head_dim)
        self.key = nn.Linear(a.hidden_size, a.n_heads * a.head_dim)
        self.value = nn.Linear(a.hidden_size, a.n_heads * a.head_dim)


class BertDenseNorm(nn.Module):
    """``LayerNorm(dense(x) + residual)``: BERT's two sub-layer outputs."""

    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.self = BertSelfAttention(a)
        self.output = BertDenseNorm(a.n_heads * a.head_dim, a.hidden_size, a.eps)


class BertIntermediate(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(a.hidden_size, a.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, a: BertArgs, attn: AttentionCall) -> None:
        super().__init__()
        self.attention = BertAttention(a)
        self.intermediate = BertIntermediate(a)
        self.output = BertDenseNorm(a.intermediate_size, a.hidden_size, a.eps)
        self.attn, self.h, self.d = attn, a.n_heads, a.head_dim
        self.act = ACTIVATIONS[a.act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        sa = self.attention.self
        q = sa.query(x).view(b, t, self.h, self.d).transpose(1, 2)  # (B, H, T, D)
        k = sa.key(x).view(b, t, self.h, self.d).transpose(1, 2)
        v = sa.value(x).view(b, t, self.h, self.d).transpose(1, 2)
        o = self.attn(q, k, v, mask, self.d**-0.5).transpose(1, 2).reshape(b, t, self.h * self.d)  # (B, T, H·D)
        x = self.attention.output(o, x)
        return self.output(self.act(self.intermediate.dense(x)), x)


class BertEmbeddings(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.position_embeddings = nn.Embedding(a.max_positions, a.hidden_size)
        self.token_type_embeddings = nn.Embedding(a.type_vocab_size, a.hidden_size)
        self.LayerNorm = nn.LayerNorm(a.hidden_size, eps=a.eps)


class BertEncoderStack(nn.Module):
    def __init__(self, a: BertArgs, attn: AttentionCall) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(a, attn) for _ in range(a.n_layers))


class BertPooler(nn.Module):
    def __init__(self, a: BertArgs) -> None:
        super().__init__()
        self.dense = nn.Linear(a.hidden_size, a.hidden_size)


class BertModel(Dsr1Model):
    def __init__(self, a: BertArgs, attn: AttentionCall, pooler: bool) -> None:
        super().__init__()
        self.args = a
        self.embeddings = BertEmbeddings(a)
        self.encoder = BertEncoderStack(a, attn)
        self.pooler = BertPooler(a) if pooler else None
        self.context_length = a.max_positions

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> EncoderOutput:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        if t == 0:
            raise Dsr1Error("empty input: input_ids has no tokens")
        if t > self.context_length:
            raise Dsr1Error(f"input has {t} tokens, longer than the model's context of {self.context_length} tokens")
        device = self.embeddings.word_embeddings.weight.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
        attention_mask = attention_mask.to(device)
        if position_ids is None:
            position_ids = torch.arange(t, device=device)[None]  # (1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        e = self.embeddings
        x = e.word_embeddings(input_ids) + e.token_type_embeddings(token_type_ids.to(device))
        x = e.LayerNorm(x + e.position_embeddings(position_ids.to(device)))  # (B, T, C)
        mask = attention_mask.bool()[:, None, None, :].expand(b, 1, t, t)  # (B, 1, T, S): keys only, no causality
        for layer in self.encoder.layer:
            x = layer(x, mask)
        pooled = torch.tanh(self.pooler.dense(x[:, 0])) if self.pooler is not None else None
        weights = attention_mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        mean = (x * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (B, C)
        return EncoderOutput(last_hidden_state=x, pooler_output=pooled, sentence_embedding=F.normalize(mean, p=2, dim=1))

    def encode(self, texts: str | list[str], batch_size: int = 32) -> torch.Tensor:
        """Sentence embeddings ``(N, C)`` of ``texts`` (needs ``model.tokenizer``)."""
        if self.tokenizer is None:
            raise Dsr1Error("encode() needs a tokenizer: load the model from a dir with tokenizer.json")
        texts = [texts] if isinstance(texts, str) else list(texts)
        chunks = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True)
                chunks.append(self(**enc).sentence_embedding)
        return torch.cat(chunks)

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.state_dict().items()


class BertBuilder(CheckpointBuilder):
    """BERT-family checkpoints (``BertModel`` tensor names, with or without a ``bert.`` prefix)."""

    Options = LoadOptions
    options: LoadOptions

    def build_model(self, hf_config: Mapping[str, Any], reader: Any, pipeline: Any) -> BertModel:
        a = BertArgs.from_hf(hf_config)

        def rename(name: str) -> str:
            return name.removeprefix("bert.")  # BertForX checkpoints prefix the encoder

        pooler = any(rename(n).startswith("pooler.") for n in reader.names())
        names = check_names(
            reader,
            a.hf_tensor_shapes(pooler),
            ignorable=lambda n: n.endswith("position_ids") or n.startswith("cls."),
            rename=rename,
        )
        refuse_tensor_parallel(pipeline, str(hf_config.get("model_type")))
        dtype = choose_dtype(self.options, pipeline, reader)
        device = pipeline.pool.weight_device(pipeline.device)  # the pool decides where the weights live
        attn = bind_attention(pipeline, a.n_heads, a.n_heads)
        with torch.device("meta"):
            model = BertModel(a, attn, pooler)
        state = {name: reader.read(names[name], dtype, device) for name in model.state_dict()}
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model.config = dict(hf_config)
        return model


@hookimpl
def dsr1_model() -> PluginSpec:
    return PluginSpec(
        name="bert",
        family="model",
        impl=BertBuilder,
        options=LoadOptions,
        capabilities=frozenset({"model_type:bert", "encoder"}),  # no generate: see ENCODER_CAPABILITY
        description="BERT / MiniLM encoders: last_hidden_state, pooler and normalized mean-pooled embeddings",
    )
