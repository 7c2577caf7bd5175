"""Claims the name 'eager' and declares that it overrides the original: it wins."""
from dsr1.hookspecs import hookimpl
from dsr1.specs import PluginSpec
from dsr1_test_dupe.toy import ImpostorAttention


class OverridingEager(ImpostorAttention):
    pass


@hookimpl
def dsr1_attention():
    return PluginSpec(name="eager", family="attention", impl=OverridingEager, overrides=True)
