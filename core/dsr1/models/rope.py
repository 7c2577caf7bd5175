"""Rotary position embeddings: the rope types of HF configs (default, linear, llama3, yarn), the cos/sin
tables, and applying them to queries and keys.

Shapes: ``B`` batch, ``T`` new tokens this forward, ``H`` heads, ``D`` head dim.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from dsr1.errors import Dsr1Error, quote
from dsr1.models.hf_fields import positive_number

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


#: the numeric rope settings, each a positive number where present (``factor`` and the llama3 ones
#: are required by the rope types that use them, below)
ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "partial_rotary_factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
#: the settings each rope type cannot do without
ROPE_NEEDS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of a ``config.json``: transformers 5 ``rope_parameters`` or 4.x
    ``rope_theta`` + ``rope_scaling``, as one dict with ``rope_type`` and ``rope_theta``.
    A setting of the wrong type is refused naming where it came from (``rope_parameters.rope_theta``)."""
    sources = {"rope_scaling": hf.get("rope_scaling") or {}, "rope_parameters": hf.get("rope_parameters") or {}}
    for name, source in sources.items():
        if not isinstance(source, dict):
            raise Dsr1Error(f"config.json {name} must be an object (or null), got {quote(source)}")
        for key in ROPE_NUMBERS:
            positive_number(source, key, None, where=f"config.json {name}.")
    positive_number(hf, "rope_theta", None)
    params = {**sources["rope_scaling"], **sources["rope_parameters"]}
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if params["rope_theta"] is None:
        params["rope_theta"] = 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    params["rope_type"] = rope_type
    if rope_type not in ROPE_TYPES:
        raise Dsr1Error(f"unsupported rope_type {quote(rope_type)} in config.json; supported: {', '.join(ROPE_TYPES)}")
    missing = [key for key in ROPE_NEEDS.get(rope_type, ()) if params.get(key) is None]
    if missing:
        raise Dsr1Error(f"config.json rope_type {rope_type!r} needs {', '.join(missing)} in rope_parameters (or "
                        f"rope_scaling)")
    if not 0 < float(params.get("partial_rotary_factor") or 1.0) <= 1:
        raise Dsr1Error(f"config.json partial_rotary_factor must be in (0, 1], got {params['partial_rotary_factor']}")
    return params


def rope_inv_freq(params: dict[str, Any], head_dim: int, max_positions: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``(D/2,)`` fp32 and the cos/sin scale, as transformers computes them."""
    base = float(params["rope_theta"])
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float()  # never on meta
    inv_freq = 1.0 / (base ** (steps / dim))
    rope_type = params["rope_type"]
    if rope_type == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_len = float(params.get("original_max_position_embeddings", max_positions))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope_type == "yarn":
        return _yarn(params, inv_freq, dim, base, max_positions)
    return inv_freq, 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched ``factor`` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(
    params: dict[str, Any], inv_freq: torch.Tensor, dim: int, base: float, max_positions: int
) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) as transformers computes it: frequencies that rotate fewer than
    ``beta_slow`` times over the original context are interpolated by ``factor``, those that rotate
    more than ``beta_fast`` times are kept, with a linear ramp between; cos/sin are scaled by the
    attention factor (DeepSeek: the ratio of two mscales)."""
    old_len = float(params.get("original_max_position_embeddings") or max_positions)
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_positions / old_len
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all:
            attention = yarn_mscale(factor, float(mscale)) / yarn_mscale(factor, float(mscale_all))
        else:
            attention = yarn_mscale(factor)
    beta_fast, beta_slow = float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dimension whose wavelength fits ``rotations`` times
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)  # (D/2,)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention)


class RotaryEmbedding:
    """cos/sin tables, grown on demand, gathered by position ids.

    Not an ``nn.Module``: it holds no weights and is rebuilt on the model's device at load.
    The three tables are swapped in as one tuple, so a forward in another thread sees either the
    old set or the new one, never a grown ``cos`` with the old, shorter ``sin``.
    """

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0) -> None:
        self.inv_freq = inv_freq  # (D/2,) fp32
        self.scaling = scaling
        empty = torch.empty(0, device=inv_freq.device)
        self.tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = (empty, empty, empty)  # cos, sin, sin_signed

    @property
    def cos(self) -> torch.Tensor:
        return self.tables[0]

    @property
    def sin(self) -> torch.Tensor:
        return self.tables[1]

    @property
    def sin_signed(self) -> torch.Tensor:
        return self.tables[2]

    def to(self, device: torch.device) -> RotaryEmbedding:
        self.inv_freq = self.inv_freq.to(device)
        empty = torch.empty(0, device=device)
        self.tables = (empty, empty, empty)
        return self

    def ensure(self, n: int, dtype: torch.dtype) -> None:
        """Make the tables cover positions ``[0, n)`` in ``dtype`` (call before a forward)."""
        cos = self.tables[0]
        if cos.shape[0] >= n and cos.dtype == dtype:
            return
        n = max(n, 2 * cos.shape[0], 256)
        t = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
        freqs = t[:, None] * self.inv_freq[None, :]  # (n, D/2), the same fp32 products as transformers
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, D)
        cos = (emb.cos() * self.scaling).to(dtype)
        sin = (emb.sin() * self.scaling).to(dtype)
        half = sin.shape[-1] // 2
        sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # rotate_half's sign folded in
        self.tables = (cos, sin, sin_signed)

    def __call__(self, positions: torch.Tensor, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` ``(B, T)`` → cos, sin ``(B, T, 1, D)`` (broadcast over heads).

        ``signed``: the sine table with rotate_half's minus sign folded in (for :func:`apply_rope_fast`).
        """
        cos, sin, sin_signed = self.tables
        return cos[positions].unsqueeze(2), (sin_signed if signed else sin)[positions].unsqueeze(2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, T, h, D)`` rotated by position; cos/sin ``(B, T, 1, D)`` (reference, as transformers)."""
    return x * cos + rotate_half(x) * sin


def apply_rope_fast(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Same as :func:`apply_rope` in three kernels: ``rotate_half(x) * sin == roll(x, D/2) * sin_signed``."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)
