"""What the quant plugins share: quantization math, quantized-layer plumbing, checkpoints, evaluation.

* :mod:`.schemes` - int8 per channel, int4 group-wise, fp8 e4m3 and per-token activation
  quantization in plain torch: the reference every kernel is checked against.
* :mod:`.modules` - :class:`~.modules.QuantizedLinear` (canonical ``state_dict``), swapping
  ``nn.Linear`` layers one at a time, the per-layer precision map.
* :mod:`.policy` - :class:`~.policy.StaticQuantPolicy`, the shape of the static policies.
* :mod:`.checkpoint` - loading dirs written by ``dsr1 quantize`` (``quantization_config``).
* :mod:`.evaluate` - perplexity, per-layer SQNR on live activations, embedding cosine.
* :mod:`.bench` - ``python -m dsr1.quantization.bench``: the accuracy and speed figures.

The kernels themselves live in the plugins (``dsr1-quant-int8`` ...), one policy per package.
"""
from __future__ import annotations

from dsr1.quantization.modules import QuantizedLinear, precision_map
from dsr1.quantization.policy import QUANT_METHOD, QuantOptions, StaticQuantPolicy

__all__ = ["QUANT_METHOD", "QuantOptions", "QuantizedLinear", "StaticQuantPolicy", "precision_map"]
