"""``model.generate`` on the engine loop: every row becomes a request of a fresh :class:`Engine`
sized for the call, the engine steps until all are done, and the padded ``(batch, prompt + new)``
tensor is assembled from their outputs (rows that finish early are padded with ``pad``).

* Scheduler ``static`` (the default): a :class:`BatchRunner` over the kvcache plugin's rows,
  handed the caller's own padded batch, sampling every row with one generator (``seed`` seeds the
  call) — transformers' ``generate`` semantics and dsr1's fast batch-1 path (captured decode).
* Any other scheduler (``continuous``): the paged runner; a sampled call seeded with ``seed`` gives
  row ``i`` the seed ``seed + i`` (each request owns its generator, so a row draws the same tokens
  whatever runs beside it).

Text is decoded only when it is needed (``stream=True``, stop strings).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dsr1.config import PluginChoice
from dsr1.engine.batch_runner import BatchRunner
from dsr1.engine.engine import Engine
from dsr1.interfaces import SamplingParams
from dsr1.scheduler.static import StaticScheduler


def _requests(input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
    ids = input_ids.tolist()
    if mask is None:
        return ids
    return [[t for t, m in zip(row, mrow) if m] for row, mrow in zip(ids, mask.tolist())]


def _scheduler(model: Any) -> Any:
    """A fresh instance of the configured scheduler: the call's engine owns it (the pipeline's stays idle)."""
    pipeline = model.runtime.pipeline
    choice = pipeline.config.choice("scheduler")
    return pipeline.registry.make("scheduler", PluginChoice.model_validate({"name": choice.name,
                                                                            "options": choice.options}))


def generate_on_engine(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor | None, params: SamplingParams, n_new: int,
    seed: int | None, stops: Sequence[str], eos: list[int], pad: int, ignore_eos: bool, stream: bool,
) -> Any:
    prompts = _requests(input_ids, mask)
    scheduler = _scheduler(model)
    common = {"max_tokens": n_new, "stop": list(stops), "ignore_eos": ignore_eos}
    if isinstance(scheduler, StaticScheduler):
        generator = None
        if seed is not None:
            generator = torch.Generator(device=model.device).manual_seed(int(seed))
        runner = BatchRunner(model, pad, (params, generator))
        engine = Engine(model, num_blocks=len(prompts), scheduler=scheduler, eos_ids=eos, runner=runner,
                        detokenize=stream)
        per_row = [params.model_copy(update=common)] * len(prompts)
    else:
        runner = None
        kv_options = model.runtime.pipeline.kvcache.options
        block = int(getattr(kv_options, "block_size", 16))
        blocks = sum(-(-(len(p) + n_new) // block) for p in prompts) + 1
        engine = Engine(model, num_blocks=blocks, scheduler=scheduler, eos_ids=eos, detokenize=stream)
        per_row = [params.model_copy(update={
            **common, "seed": (seed + i) % 2**64 if seed is not None and not params.greedy else None,
        }) for i in range(len(prompts))]
    if stream:
        return _stream(model, engine, runner, prompts[0], per_row[0], input_ids, mask)
    with model.run_lock.hold():
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, per_row)]
        if runner is not None:
            runner.stage(ids, input_ids, mask)
        try:
            final = engine.run()
        finally:
            _drop(engine, runner)
    outs = [final[i].output_ids for i in ids]
    n = max(len(o) for o in outs)
    new = torch.tensor([o + [pad] * (n - len(o)) for o in outs], dtype=torch.long)  # (B, n), one host copy
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)  # (B, T0 + n)


def _drop(engine: Engine, runner: BatchRunner | None) -> None:
    """After the call (or an error in it): abort what is left, record the batch in flight."""
    for rid in list(engine.requests):
        if engine.scheduler.get(rid) is not None:
            engine.abort(rid)
    if runner is not None:
        runner.close()


def _stream(model: Any, engine: Engine, runner: BatchRunner | None, prompt: list[int], params: SamplingParams,
            input_ids: torch.Tensor, mask: torch.Tensor | None) -> Iterator[str]:
    with model.run_lock.hold():
        rid = engine.add_request(prompt, params)
        if runner is not None:
            runner.stage([rid], input_ids, mask)
        try:
            while engine.has_unfinished():
                for out in engine.step():
                    if out.delta:
                        yield out.delta
        finally:
            _drop(engine, runner)
