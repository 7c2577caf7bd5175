"""The seed's dynamic mixed precision, step by step.

One *step* is one forward of the model (``forward_step``: the prefill, then each decode
token; or one ``forward`` call), counted by a wrapper around that method.

1. **Warm-up** (``warmup_steps``): every layer runs in high precision and observes the
   SQNR its int8 output would have on the live activations.
2. **Decide**: layers whose SQNR is at least ``sqnr_threshold_db`` switch to int8; the
   sensitive ones stay in high precision.
3. **Guard**: every ``guard_every``-th step the same inputs run once with all layers in
   high precision and once as they are; the top-1 tokens of every position are compared.
   Agreement is taken over the most recent ``guard_window_tokens`` compared tokens (at
   batch 1 one sampled step adds one token; a 256-token window adds 256). When it falls
   below ``guard_agreement`` - or earlier, as soon as the disagreements already exceed what a
   full window may hold - the least accurate ``fallback_fraction`` of the int8 layers switch
   back to high precision (all of them by default) and the window starts over.

Every switch and every tripped guard is recorded through the monitor (``quant.switch``,
``quant.guard``) and kept in :attr:`PrecisionController.events`. The sampled step writes the
KV cache twice at the same positions (high precision first, then as-is), which the
contiguous cache allows; caches that evict on write should set ``guard_every`` high.
"""
from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from dsr1_quant_dynamic.layer import DynamicLinear


def top1(output: Any) -> torch.Tensor | None:
    """Argmax over the last dim of logits (a tensor, or an output with ``.logits``); ``None`` otherwise."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    return logits.argmax(dim=-1) if isinstance(logits, torch.Tensor) else None


class PrecisionController:
    """Drives the :class:`DynamicLinear` layers of one model (see the module docstring)."""

    def __init__(self, layers: dict[str, DynamicLinear], options: Any, monitor: Any = None) -> None:
        self.layers, self.options, self.monitor = layers, options, monitor
        self.phase = "warmup"  # → "running" → "held" (nothing left in int8)
        self.step = 0
        self.window: deque[tuple[int, int]] = deque()  # (agreeing, compared) tokens per sampled step
        self.events: list[dict[str, Any]] = []
        self.guard_checks = 0
        for layer in layers.values():
            layer.mode = "observe"

    # --- the wrapped step ------------------------------------------------------------------

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` (a bound ``forward_step`` or ``forward``) with the policy around each call."""

        @functools.wraps(fn)
        def step(*args: Any, **kwargs: Any) -> Any:
            return self.run(fn, *args, **kwargs)

        step.__dsr1_dynamic__ = True  # type: ignore[attr-defined]  # marks the wrapper (no double wrapping)
        return step

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.step += 1
        if self.phase == "warmup":
            out = fn(*args, **kwargs)
            if self.step >= self.options.warmup_steps:
                self.decide()
            return out
        if self.phase == "running" and self.step % self.options.guard_every == 0:
            with self.all_high_precision():
                reference = fn(*args, **kwargs)
            out = fn(*args, **kwargs)  # last, so a KV cache holds what this precision map computes
            self.check(reference, out)
            return out
        return fn(*args, **kwargs)

    # --- decisions ---------------------------------------------------------------------------

    def decide(self) -> None:
        """End of warm-up: int8 for every layer whose live SQNR reaches the threshold."""
        threshold = self.options.sqnr_threshold_db
        for name, layer in self.layers.items():
            layer.measured_db = layer.sqnr_db()
            layer.mode = "int8" if layer.measured_db >= threshold else "hp"
            layer.reset_stats()
            if layer.mode == "int8":
                self.switch(name, layer, f"live SQNR {layer.measured_db:.1f} dB >= {threshold:g} dB after "
                                         f"{self.step} warm-up steps")
        self.phase = "running" if self.int8_layers() else "held"

    def check(self, reference: Any, out: Any) -> None:
        """One guard sample: top-1 agreement of ``out`` with the high-precision ``reference``."""
        a, b = top1(reference), top1(out)
        if a is None or b is None:
            return
        self.guard_checks += 1
        self.window.append((int((a == b).sum()), a.numel()))
        size, need = self.options.guard_window_tokens, self.options.guard_agreement
        while len(self.window) > 1 and sum(t for _, t in self.window) - self.window[0][1] >= size:
            self.window.popleft()  # keep the newest samples that still cover the window
        agree, total = (sum(x) for x in zip(*self.window))
        if total >= size and agree / total < need:
            self.trip(agree / total)
        elif total < size and total - agree > math.floor((1 - need) * size + 1e-9):  # a full window can't recover
            self.trip(agree / total)

    def trip(self, agreement: float) -> None:
        """Switch the least accurate int8 layers back to high precision."""
        int8 = sorted(self.int8_layers().items(), key=lambda kv: kv[1].measured_db or -math.inf)
        count = max(1, math.ceil(self.options.fallback_fraction * len(int8)))
        compared = sum(t for _, t in self.window)
        reason = (f"guard: top-1 agreement {agreement:.3f} < {self.options.guard_agreement:g} over the last "
                  f"{compared} compared tokens ({len(self.window)} sampled steps)")
        self.record("quant.guard", agreement=round(agreement, 4), step=self.step, switched_back=count, reason=reason)
        for name, layer in int8[:count]:
            layer.mode = "hp"
            self.switch(name, layer, reason)
        self.window.clear()
        if not self.int8_layers():
            self.phase = "held"

    # --- helpers -----------------------------------------------------------------------------

    def int8_layers(self) -> dict[str, DynamicLinear]:
        return {n: m for n, m in self.layers.items() if m.mode == "int8"}

    @contextmanager
    def all_high_precision(self) -> Iterator[None]:
        """Temporarily run the int8 layers in high precision (the guard's reference)."""
        int8 = list(self.int8_layers().values())
        for layer in int8:
            layer.mode = "hp"
        try:
            yield
        finally:
            for layer in int8:
                layer.mode = "int8"

    def switch(self, name: str, layer: DynamicLinear, reason: str) -> None:
        sqnr = layer.measured_db if layer.measured_db is not None and math.isfinite(layer.measured_db) else None
        self.record("quant.switch", layer=name, precision=layer.precision, step=self.step, sqnr_db=sqnr,
                    reason=reason)

    def record(self, event: str, **values: Any) -> None:
        self.events.append({"event": event, **values})
        if self.monitor is not None:
            self.monitor.record(event, **values)

    def report(self) -> dict[str, Any]:
        """Plain data: phase, steps, the per-layer map with measured SQNR, counts."""
        return {
            "phase": self.phase,
            "steps": self.step,
            "guard_checks": self.guard_checks,
            "int8_layers": len(self.int8_layers()),
            "layers": len(self.layers),
            "switches": sum(1 for e in self.events if e["event"] == "quant.switch"),
            "guard_trips": sum(1 for e in self.events if e["event"] == "quant.guard"),
            "sqnr_db": {n: (round(m.measured_db, 2) if m.measured_db is not None and math.isfinite(m.measured_db)
                            else m.measured_db) for n, m in self.layers.items()},
        }
