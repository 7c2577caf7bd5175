"""Hook implementation whose name matches no hookspec (a typo of dsr1_attention)."""
from dsr1.hookspecs import hookimpl


@hookimpl
def dsr1_atention():
    return None
