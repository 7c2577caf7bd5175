"""Declares a plugin API version this core does not support."""
from dsr1.hookspecs import hookimpl
from dsr1.interfaces import AttentionMechanism
from dsr1.specs import PluginSpec


class FutureAttention(AttentionMechanism):
    def forward(self, query, key, value, mask=None, scale=None):
        return query


@hookimpl
def dsr1_attention():
    return PluginSpec(name="oldapi", family="attention", impl=FutureAttention, api_version=99)
