"""The engine loop: ``Engine.step()`` = ``scheduler.schedule()`` → ``runner.execute(plan)`` →
``scheduler.update(...)``.

Requests and KV blocks are plain data (:mod:`.request`, :mod:`.blocks`, :mod:`.plan`) that the
scheduler family works on; the runner (:mod:`.runner`) owns every tensor: the model, the paged
KV pool (:mod:`.paged`, with the CUDA kernel in :mod:`.paged_triton`) and sampling.
:class:`AsyncEngine` runs the loop in a background thread for servers and chat.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from dsr1.engine.async_engine import AsyncEngine
    from dsr1.engine.engine import Engine, RequestOutput
    from dsr1.interfaces import SamplingParams

# Lazy: the schedulers import dsr1.engine.{request,blocks,plan} and must not pull in torch.
_LAZY = {"Engine": "engine", "RequestOutput": "engine", "AsyncEngine": "async_engine"}


def __getattr__(name: str) -> Any:
    if name == "SamplingParams":
        from dsr1.decoding.params import SamplingParams

        return SamplingParams
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dsr1.engine.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dsr1.engine' has no attribute {name!r}")


__all__ = ["AsyncEngine", "Engine", "RequestOutput", "SamplingParams"]
