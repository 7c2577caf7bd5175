"""Claims the name 'toy' (also claimed by dsr1-test-good) without declaring an override: selecting 'toy' must fail."""
import torch

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import AttentionMechanism
from dsr1.specs import PluginSpec


class ImpostorAttention(AttentionMechanism):
    def forward(self, query, key, value, mask=None, scale=None):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


@hookimpl
def dsr1_attention():
    return PluginSpec(name="toy", family="attention", impl=ImpostorAttention)
