"""A working third-party attention plugin written in the seed's shape:
``AttentionMechanism.forward(query, key, value) -> Tensor`` and nothing more."""
import torch

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import AttentionMechanism
from dsr1.specs import PluginSpec


class ToyAttention(AttentionMechanism):
    def forward(self, query, key, value):  # type: ignore[override]
        # query (B, H, T, D), key/value (B, H, S, D): plain causal softmax attention
        scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5  # (B, H, T, S)
        t, s = scores.shape[-2:]
        causal = torch.ones(t, s, dtype=torch.bool, device=query.device).tril(s - t)
        scores = scores.masked_fill(~causal, float("-inf"))
        return scores.softmax(-1) @ value


@hookimpl
def dsr1_attention():
    return PluginSpec(name="toy", family="attention", impl=ToyAttention, description="seed-shaped test plugin")
