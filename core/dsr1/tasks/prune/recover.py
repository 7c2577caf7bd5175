"""``--recover-steps N``: a short fine-tuning between stages, on the calibration text.

Only the prunable linear layers train (embeddings, norms and the head stay frozen), with AdamW.
After every optimizer step each weight is multiplied by its keep-mask, taken from the weight's
zeros when recovery starts, so a pruned weight stays exactly zero (the 2:4 pattern survives, and
the realized sparsity does not move). Structured stages have no zeros to keep: they just train.

* causal LM: next-token cross-entropy on batches of 4 calibration-text windows, fresh ones for every
  step while the text lasts (``4 · steps`` windows of ``--calibration-len`` tokens, evenly spaced);
* encoder: distillation, ``1 - cos(embedding, dense embedding)`` on batches of 8 calibration
  sentences, fresh ones per step while the text lasts (the dense targets are computed once,
  before the first stage).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dsr1.pruning.metrics import prunable_linears


def recover_(
    model: Any,
    kind: str,
    steps: int,
    lr: float,
    batches: list[Any],
    targets: list[torch.Tensor] | None = None,
    on_step: Any = None,
) -> dict[str, float]:
    """Fine-tune ``model`` in place for ``steps`` steps; returns the first and last loss.

    :param batches: causal: id tensors ``(b, T)``; encoder: tokenized batches (``BatchEncoding``).
    :param targets: encoder only: dense embeddings ``(b, C)`` of each batch.
    :param on_step: called after each step (progress bars).
    """
    if steps <= 0 or not batches:
        return {}
    layers = [m for _, m in prunable_linears(model)]
    params = [m.weight for m in layers]
    keep = [p.ne(0) for p in params]  # (out, in) each
    device = params[0].device
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    try:
        with torch.enable_grad():
            for step in range(steps):
                i = step % len(batches)
                if kind == "causal":
                    ids = batches[i].to(device)  # (b, T)
                    logits = model(ids).logits  # (b, T, V)
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                else:
                    assert targets is not None
                    emb = model(**batches[i].to(device)).sentence_embedding  # (b, C)
                    loss = 1.0 - F.cosine_similarity(emb.float(), targets[i].to(device), dim=1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]  # untyped in torch 2.13's stubs
                optimizer.step()
                with torch.no_grad():
                    for p, k in zip(params, keep, strict=True):
                        p.mul_(k)
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step()
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return {"steps": steps, "lr": lr, "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5)}
