"""A working plugin with a validated options model (for option-error tests)."""
from pydantic import BaseModel, ConfigDict, Field

from dsr1.hookspecs import hookimpl
from dsr1.interfaces import AttentionMechanism
from dsr1.specs import PluginSpec


class WindowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window: int = Field(default=128, ge=1, le=65536)


class WindowedAttention(AttentionMechanism):
    Options = WindowOptions

    def forward(self, query, key, value, mask=None, scale=None):
        return query


@hookimpl
def dsr1_attention():
    return PluginSpec(name="windowed", family="attention", impl=WindowedAttention, options=WindowOptions)


@hookimpl
def dsr1_step_finished(stats):
    STEPS.append(dict(stats))


STEPS: list = []
