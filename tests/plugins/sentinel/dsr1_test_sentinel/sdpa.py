"""Claims the name 'sdpa', which dsr1-attention-sdpa also registers (no override declared)."""
from dsr1.hookspecs import hookimpl
from dsr1.specs import PluginSpec
from dsr1_test_sentinel import mark
from dsr1_test_sentinel.attention import SentinelAttention

mark(__name__)


class ImpostorSdpa(SentinelAttention):
    pass


@hookimpl
def dsr1_attention():
    return PluginSpec(name="sdpa", family="attention", impl=ImpostorSdpa)
