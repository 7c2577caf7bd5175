"""What ``dsr1.quant`` plugins share: quantization schemes, quantized-layer plumbing, policy bases.

Stable API (SDK API version 1, :data:`dsr1_sdk.API_VERSION`): every name in ``__all__`` keeps
its name, signature and meaning while the API version stays; a change that would break a plugin
comes with a new API version. The implementations live in the core (``dsr1.quantization``),
whose module layout is not an API: import these names from here, never from ``dsr1.*``.

* Schemes, plain torch on any device and the reference every kernel is checked against: int8
  per output channel (:func:`int8_per_channel`, :func:`int8_dequantize`, :func:`int8_error_bound`),
  int8 per token for activations (:func:`int8_per_token`), int4 group-wise with zeros
  (:func:`int4_groupwise`, :func:`int4_dequantize`, :func:`int4_error_bound`, :func:`pack_nibbles`,
  :func:`unpack_nibbles`), fp8 e4m3 per channel (:func:`fp8_per_channel`, :func:`fp8_dequantize`,
  :func:`fp8_error_bound`), and :func:`round_up_to` (scales rounded up so nothing clips).
* Layers: :class:`QuantizedLinear`, the base of every quantized ``nn.Linear`` replacement (its
  ``state_dict`` holds the canonical checkpoint tensors, ``FORMAT`` names their layout), and
  :class:`Int8PerChannelLinear` (int8 ``qweight`` and per-row ``scales``; implement ``matmul``).
* Model plumbing: :func:`linear_layers` (what a policy would quantize; refuses packed models),
  :func:`replace_linears_`, :func:`cast_floats_`, :func:`precision_map`, :func:`device_type`,
  :func:`refuse_unless_valid` (a policy's own ``validate`` reasons as one error), :func:`flat`
  (``(..., K)`` → ``(M, K)`` for the aten kernels) and :data:`DTYPES` (``"bf16"`` → ``torch.bfloat16`` ...).
* Block-scaled fp8 checkpoints (DeepSeek's ``quant_method: fp8`` with ``weight_block_size``):
  :func:`block_fp8_reader` (the checkpoint a model was built from, when it is one: its
  ``read_block_fp8(name, device)`` gives a weight's stored e4m3 values and block scales),
  :func:`block_dequantize`, :func:`block_quantize`, :func:`block_row_scales`, and
  :func:`hf_sources` / :func:`fused_modules` (the checkpoint layers behind a fused model layer).
* Policies: :class:`QuantOptions` (``compute_dtype``, ``skip``), :class:`StaticQuantPolicy` (set
  ``name``, ``distribution`` and ``FORMAT``, implement ``make_layer``) and
  :class:`Int8PerChannelPolicy`. The family base :class:`~dsr1_sdk.QuantPolicy` is in ``dsr1_sdk``.

This module imports torch; ``import dsr1_sdk`` does not, so only quant plugins pay for it.
"""
from __future__ import annotations

from dsr1.models.checkpoint import block_fp8_reader
from dsr1.models.fp8_blocks import dequantize as block_dequantize
from dsr1.models.fp8_blocks import quantize as block_quantize
from dsr1.models.fp8_blocks import row_scales as block_row_scales
from dsr1.quantization.checkpoint import fused_modules, hf_sources
from dsr1.quantization.modules import (
    DTYPES,
    Int8PerChannelLinear,
    QuantizedLinear,
    cast_floats_,
    device_type,
    flat,
    linear_layers,
    precision_map,
    refuse_unless_valid,
    replace_linears_,
)
from dsr1.quantization.policy import Int8PerChannelPolicy, QuantOptions, StaticQuantPolicy
from dsr1.quantization.schemes import (
    FP8_E4M3_MAX,
    INT4_LEVELS,
    INT8_QMAX,
    fp8_dequantize,
    fp8_error_bound,
    fp8_per_channel,
    int4_dequantize,
    int4_error_bound,
    int4_groupwise,
    int8_dequantize,
    int8_error_bound,
    int8_per_channel,
    int8_per_token,
    pack_nibbles,
    round_up_to,
    unpack_nibbles,
)

__all__ = [
    "DTYPES",
    "FP8_E4M3_MAX",
    "INT4_LEVELS",
    "INT8_QMAX",
    "Int8PerChannelLinear",
    "Int8PerChannelPolicy",
    "QuantOptions",
    "QuantizedLinear",
    "StaticQuantPolicy",
    "block_dequantize",
    "block_fp8_reader",
    "block_quantize",
    "block_row_scales",
    "cast_floats_",
    "device_type",
    "flat",
    "fp8_dequantize",
    "fp8_error_bound",
    "fp8_per_channel",
    "fused_modules",
    "hf_sources",
    "int4_dequantize",
    "int4_error_bound",
    "int4_groupwise",
    "int8_dequantize",
    "int8_error_bound",
    "int8_per_channel",
    "int8_per_token",
    "linear_layers",
    "pack_nibbles",
    "precision_map",
    "refuse_unless_valid",
    "replace_linears_",
    "round_up_to",
    "unpack_nibbles",
]
