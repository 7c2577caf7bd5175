"""Its entry point is named 'wrongname' but the spec it returns says 'other'."""
from dsr1.hookspecs import hookimpl
from dsr1.specs import PluginSpec
from dsr1_test_badhooks.oldapi import FutureAttention


@hookimpl
def dsr1_attention():
    return PluginSpec(name="other", family="attention", impl=FutureAttention)
