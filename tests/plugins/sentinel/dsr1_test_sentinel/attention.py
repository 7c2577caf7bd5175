"""A valid attention plugin named 'sentinel'."""
import torch

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import AttentionMechanism
from dsr1.specs import PluginSpec
from dsr1_test_sentinel import mark

mark(__name__)


class SentinelAttention(AttentionMechanism):
    def forward(self, query, key, value, mask=None, scale=None):  # type: ignore[override]
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


@hookimpl
def dsr1_attention():
    return PluginSpec(name="sentinel", family="attention", impl=SentinelAttention)
