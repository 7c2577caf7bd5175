"""Hook implementation with an argument the hookspec does not have."""
from dsr1.hookspecs import hookimpl


@hookimpl
def dsr1_attention(layer_index):
    return None
