"""What the quant plugins share: quantization math, quantized-layer plumbing, checkpoints.

* :mod:`.schemes` - int8 per channel, int4 group-wise, fp8 e4m3 and per-token activation
  quantization in plain torch: the reference every kernel is checked against.
* :mod:`.modules` - :class:`~.modules.QuantizedLinear` (canonical ``state_dict``), swapping
  ``nn.Linear`` layers one at a time, the per-layer precision map.
* :mod:`.policy` - :class:`~.policy.StaticQuantPolicy`, the shape of the static policies.
* :mod:`.checkpoint` - loading dirs written by ``dsr1 quantize`` (``quantization_config``).

Plugins reach the first three through :mod:`dsr1_sdk.quant`. The accuracy and speed figures are
the benchmark library's (:mod:`dsr1.benchmarks.quant`, :mod:`dsr1.benchmarks.quant_accuracy`); the
``dsr1 quantize`` driver is :mod:`dsr1.tasks.quantize`. The kernels themselves live in the plugins
(``dsr1-quant-int8`` ...), one policy per package.
"""
from __future__ import annotations

from dsr1.quantization.modules import QuantizedLinear, precision_map
from dsr1.quantization.policy import QUANT_METHOD, QuantOptions, StaticQuantPolicy

__all__ = ["QUANT_METHOD", "QuantOptions", "QuantizedLinear", "StaticQuantPolicy", "precision_map"]
