"""Registers a class that is not an AttentionMechanism."""
from dsr1.hookspecs import hookimpl
from dsr1.specs import PluginSpec


class NotAttention:
    pass


@hookimpl
def dsr1_attention():
    return PluginSpec(name="notattention", family="attention", impl=NotAttention)
