"""``model.generate`` on the engine loop, for a model whose config selects a scheduler other than
``static`` (``continuous``): every row becomes a request of a fresh :class:`Engine` sized for the
call, and the padded ``(batch, prompt + new)`` tensor is assembled from their outputs.

Semantics follow the batch path of :func:`dsr1.generation.generate`: rows that finish early are
padded with ``pad``; a sampled call seeded with ``seed`` gives row ``i`` the seed ``seed + i``
(each request owns its generator, so a row draws the same tokens whatever runs beside it).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dsr1.engine.engine import Engine
from dsr1.interfaces import SamplingParams


def _requests(input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    ids = input_ids.tolist()
    if mask is None:
        return ids
    return [[t for t, m in zip(row, mrow) if m] for row, mrow in zip(ids, mask.tolist())]


def _engine(model: Any, prompts: list[list[int]], n_new: int, eos: list[int]) -> Engine:
    block = int(getattr(model.pipeline.kvcache.options, "block_size", 16))
    blocks = sum(-(-(len(p) + n_new) // block) for p in prompts) + 1
    choice = model.pipeline.config.choice("scheduler")
    return Engine.with_scheduler(model, {"name": choice.name, "options": choice.options}, num_blocks=blocks,
                                 eos_ids=eos)


def generate_on_engine(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor | None, params: SamplingParams, n_new: int,
    seed: int | None, stops: Sequence[str], eos: list[int], pad: int, ignore_eos: bool, stream: bool,
) -> Any:
    prompts = _requests(input_ids, mask)
    engine = _engine(model, prompts, n_new, eos)
    per_row = [params.model_copy(update={
        "max_tokens": n_new, "stop": list(stops), "ignore_eos": ignore_eos,
        "seed": (seed + i) % 2**64 if seed is not None and not params.greedy else None,
    }) for i in range(len(prompts))]
    if stream:
        return _stream(model, engine, prompts[0], per_row[0])
    with model.run_lock.hold():
        outs = engine.generate(prompts, per_row)
    t0 = input_ids.shape[1]
    width = t0 + max(len(o.output_ids) for o in outs)
    full = torch.full((len(outs), width), pad, dtype=torch.long, device=input_ids.device)
    full[:, :t0] = input_ids
    for i, o in enumerate(outs):
        full[i, t0 : t0 + len(o.output_ids)] = torch.tensor(o.output_ids, dtype=torch.long)
    return full


def _stream(model: Any, engine: Engine, prompt: list[int], params: SamplingParams) -> Iterator[str]:
    with model.run_lock.hold():
        rid = engine.add_request(prompt, params)
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    if out.delta:
                        yield out.delta
        finally:
            if engine.has_unfinished():
                engine.abort(rid)
