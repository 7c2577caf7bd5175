"""The device's kernel choice applies after the quant policy (issue 20): ``quant: fp32`` keeps the
CPU fast path of leaving quant unset, and a policy that leaves some layers plain fp32 hands exactly
those to the device."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsr1.auto import AutoModel
from dsr1.models.packing import PackedLinear


def _generate_and_watch(quant: Any) -> tuple[list[str], dict[str, str]]:
    """Load dsr1-tiny with ``quant``, generate 2 rows; the names of the layers the device's
    ``pack_linear`` was offered, and every linear layer's class afterwards."""
    model = AutoModel.from_pretrained("dsr1-tiny", quant=quant) if quant else AutoModel.from_pretrained("dsr1-tiny")
    names = {id(m): n for n, m in model.named_modules()}
    seen: list[str] = []
    device = model.pipeline.device
    offer = device.pack_linear

    def watched(linear: Any) -> Any:
        seen.append(names[id(linear)])
        return offer(linear)

    device.pack_linear = watched  # this instance only (the pipeline is the model's own)
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    model.generate(ids, max_new_tokens=2)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, PackedLinear)) or "Linear" in type(m).__name__}
    return seen, kinds


def test_fp32_policy_hands_the_device_the_same_layers_as_no_policy() -> None:
    unset_seen, unset_kinds = _generate_and_watch(None)
    fp32_seen, fp32_kinds = _generate_and_watch("fp32")
    assert unset_seen, "the device was offered no layer with quant unset"
    assert fp32_seen == unset_seen
    assert fp32_kinds == unset_kinds
    assert all(kind != "Linear" for kind in fp32_kinds.values())  # device panels or oneDNN-packed, not plain


def test_layers_a_policy_leaves_in_fp32_reach_the_device_kernel() -> None:
    seen, kinds = _generate_and_watch({"name": "int8", "options": {"compute_dtype": "fp32", "skip": ["lm_head"]}})
    assert seen == ["lm_head"]
    assert kinds["lm_head"] != "Linear"
    assert kinds["model.layers.0.mlp.down_proj"] == "Int8WeightOnlyLinear"


def test_a_policy_without_fp32_weights_offers_the_device_nothing() -> None:
    seen, kinds = _generate_and_watch("bf16")
    assert seen == []
    # bf16 keeps its layers its own (the plugin's CPU GEMV layer by default), none is the device's
    assert set(kinds.values()) == {"GemvLinear"}
