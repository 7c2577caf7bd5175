"""The base of every plugin's options model (re-exported as ``dsr1_sdk.PluginOptions``)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["PluginOptions"]


class PluginOptions(BaseModel):
    """Base for a plugin's options model: unknown keys are refused, JSON round-trips.

    Subclass it and declare typed fields with defaults; constrain ranges with
    :func:`Field` (``threads: int | None = Field(None, ge=1)``) so that a bad value in a
    user's config is a one-line error naming the key.
    """

    model_config = ConfigDict(extra="forbid")
