"""Pipeline parallelism for the llama family: ``P`` stages each hold a contiguous range of the
layers, and a forward's hidden states travel from stage to stage (docs/parallel.md).

* **Layout.** ``tensor * pipeline`` ranks; rank ``r`` is tensor rank ``r % tensor`` of stage
  ``r // tensor`` (:func:`dsr1.parallel.topology.join` makes each stage's tensor group). Tensor
  rank ``i`` of stage ``s`` receives from tensor rank ``i`` of stage ``s - 1`` and sends to that of
  stage ``s + 1``: after a tensor-parallel layer every rank of a stage holds the whole hidden
  state, so the stages' pairs move it without another collective.
* **Layers.** :func:`split_layers` gives stage ``s`` the layers ``[lo, hi)``: ``L // P`` each, and
  the first ``L % P`` stages one more. A stage's model numbers its layers from 0 (its KV cache
  and paged pool hold only its own); what a layer is (sliding window, MoE or dense) follows its
  index in the whole model. Stage 0 also holds ``embed_tokens``, the last stage ``norm`` and
  ``lm_head`` (read from the embedding matrix when the embeddings are tied); no rank reads
  another stage's tensors from the checkpoint (:func:`stage_names`).
* **Forward** (:func:`pipelined_step`). Every rank calls the model with the same inputs (the
  engine runs in lockstep), so every shape is known everywhere: stage 0 embeds, the others
  receive; each runs its layers and sends on; the last stage applies ``norm`` + ``lm_head`` and
  its tensor rank 0 broadcasts the logits to every rank, so sampling, the scheduler and
  ``model.generate`` run unchanged on each.
* **Micro-batches.** A forward of ``B > 1`` rows is split into ``M`` (``parallel.micro_batches``,
  default ``P``, at most ``B``) slices of rows, sent with ``isend``/``irecv``, every receive
  posted up front: stage 0 computes slice ``i + 1`` while stage 1 computes slice ``i``. Rows
  split where what the layers read can be sliced by rows: no cache (``model(...)``) and the
  ``contiguous`` KV cache (``model.generate``, the static engine). An engine
  :class:`~dsr1.interfaces.AttentionContext` (the paged pool's steps, the packed prefill's single
  row), other kvcache plugins and recurrent attention states run as one micro-batch.
* **Failures.** Every send, receive and the broadcast fail with one line
  (:func:`~dsr1.parallel.topology.lost`) when a peer dies or hangs past ``parallel.timeout_s``.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dsr1.errors import Dsr1Error
from dsr1.kvcache.contiguous import ContiguousKVCache
from dsr1.parallel.topology import PP_MODEL_TYPES, TensorGroup, broadcast_, join, lost


@dataclass(frozen=True)
class PipelineStage:
    """This rank's stage: which layers it holds and whom it talks to (global ranks)."""

    index: int
    count: int
    #: the model's layers this stage holds (indices in the whole model)
    layers: range
    #: the rank this one receives hidden states from (None: the first stage embeds)
    prev: int | None
    #: the rank this one sends hidden states to (None: the last stage applies the head)
    next: int | None
    #: the rank whose logits every rank takes: tensor rank 0 of the last stage
    head_rank: int
    #: micro-batches per forward (before the cap at the forward's rows)
    micro_batches: int
    #: every rank of the launch (the broadcast of the logits; the one-line errors)
    world: TensorGroup

    @property
    def first(self) -> bool:
        return self.prev is None

    @property
    def last(self) -> bool:
        return self.next is None


def split_layers(n_layers: int, stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage: ``n_layers // stages`` each, the first
    ``n_layers % stages`` stages one more."""
    base, extra = divmod(n_layers, stages)
    out, lo = [], 0
    for s in range(stages):
        hi = lo + base + (1 if s < extra else 0)
        out.append(range(lo, hi))
        lo = hi
    return out


def check_pipeline(pipeline: int, model_type: str, n_layers: int) -> None:
    """The model against ``parallel.pipeline``: a type the llama builder splits, and a layer or more per stage."""
    if model_type not in PP_MODEL_TYPES:
        raise Dsr1Error(f"parallel.pipeline {pipeline}: pipeline parallelism supports {', '.join(PP_MODEL_TYPES)} "
                        f"(got {model_type})")
    if pipeline > n_layers:
        raise Dsr1Error(f"parallel.pipeline {pipeline} must be at most num_hidden_layers {n_layers} (config.json): "
                        f"every stage holds one layer or more")


def join_stages(parallel: Any, n_layers: int, device: torch.device) -> tuple[PipelineStage, TensorGroup]:
    """Join the ``tensor * pipeline`` ranks: this rank's stage and its stage's tensor group."""
    t, p = parallel.tensor, parallel.pipeline
    group = join(t, parallel.timeout_s, device, p)
    rank, size = dist.get_rank(), dist.get_world_size()
    index = rank // t
    stage = PipelineStage(
        index=index, count=p, layers=split_layers(n_layers, p)[index],
        prev=rank - t if index > 0 else None, next=rank + t if index < p - 1 else None,
        head_rank=(p - 1) * t, micro_batches=parallel.micro_batches or p,
        world=TensorGroup(rank, size, parallel.timeout_s),
    )
    return stage, group


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def stage_names(names: Mapping[str, str], stage: PipelineStage, tied: bool) -> dict[str, str]:
    """The stage model's tensor names (its layers numbered from 0) → checkpoint names, for this
    stage's tensors only; a tied ``lm_head`` on the last stage reads the embedding matrix."""
    out: dict[str, str] = {}
    lo = stage.layers.start
    for name, source in names.items():
        m = _LAYER.match(name)
        if m is not None:
            layer = int(m.group(1))
            if layer in stage.layers:
                out[f"model.layers.{layer - lo}.{name[m.end():]}"] = source
        elif name == "model.embed_tokens.weight":
            if stage.first:
                out[name] = source
            if stage.last and tied:
                out["lm_head.weight"] = source
        elif stage.last:  # model.norm, lm_head
            out[name] = source
    return out


# --- the forward ----------------------------------------------------------------------------------


class StageModel(Protocol):
    """What :func:`pipelined_step` calls on a stage's model (:class:`dsr1.models.common.CausalLM`)."""

    args: Any
    recurrent: bool

    @property
    def dtype(self) -> torch.dtype: ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def forward_layers(self, x: torch.Tensor, positions: torch.Tensor, start: int | torch.Tensor, cache: Any,
                       mask: torch.Tensor | None, window_mask: torch.Tensor | None) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, last_only: bool | torch.Tensor) -> torch.Tensor: ...


class _ContiguousRows:
    """Rows ``[a, b)`` of a :class:`ContiguousKVCache`: what one micro-batch's layers write and read
    (the same arithmetic as :meth:`ContiguousKVCache.update` on a slice of its buffers)."""

    compresses = False
    observes_queries = False

    def __init__(self, cache: ContiguousKVCache, rows: slice) -> None:
        self.cache, self.rows = cache, rows

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cache
        if cache.k is None or cache.v is None:
            raise RuntimeError("ContiguousKVCache.update before allocate")
        end = start + key.shape[2]
        k, v = cache.k[layer][self.rows], cache.v[layer][self.rows]  # (b, Hkv, Tcap, D) views
        k[:, :, start:end].copy_(key)
        v[:, :, start:end].copy_(value)
        if layer == 0:
            cache.length = end
        return k[:, :, :end], v[:, :, :end]  # (b, Hkv, S, D) views


def micro_batches(stage: PipelineStage, model: StageModel, rows: int, cache: Any,
                  start: int | torch.Tensor) -> list[tuple[slice, Any]]:
    """The forward's row slices, each with what its layers attend through; one slice where the
    cache cannot be split by rows (see the module's doc)."""
    m = min(stage.micro_batches, rows)
    splits = isinstance(start, int) and (cache is None or (type(cache) is ContiguousKVCache and not model.recurrent))
    if m <= 1 or not splits:
        return [(slice(0, rows), cache)]
    base, extra = divmod(rows, m)
    out, lo = [], 0
    for i in range(m):
        hi = lo + base + (1 if i < extra else 0)
        sl = slice(lo, hi)
        out.append((sl, None if cache is None else _ContiguousRows(cache, sl)))
        lo = hi
    return out


def _rows(t: torch.Tensor | None, sl: slice, rows: int) -> torch.Tensor | None:
    """``t``'s rows ``sl`` when its first dim is the batch (a mask broadcast over rows stays whole)."""
    return t if t is None or t.shape[0] != rows or (sl.start == 0 and sl.stop == rows) else t[sl]


def _wait(work: Any, stage: PipelineStage, what: str) -> None:
    try:
        work.wait()
    except RuntimeError as err:
        raise lost(stage.world, what, err) from None


def _p2p(op: Callable[..., Any], t: torch.Tensor, peer: int, stage: PipelineStage, what: str) -> Any:
    try:
        return op(t, peer)
    except RuntimeError as err:
        raise lost(stage.world, what, err) from None


def pipelined_step(model: StageModel, stage: PipelineStage, input_ids: torch.Tensor, positions: torch.Tensor,
                   start: int | torch.Tensor, cache: Any, mask: torch.Tensor | None,
                   window_mask: torch.Tensor | None, last_only: bool | torch.Tensor) -> torch.Tensor:
    """:meth:`CausalLM.forward_step` of one stage: the same logits on every rank of the launch."""
    b, t = input_ids.shape
    device, dtype = input_ids.device, model.dtype
    parts = micro_batches(stage, model, b, cache, start)
    hidden = model.args.hidden_size
    received: list[tuple[torch.Tensor, Any]] = []
    if stage.prev is not None:  # every receive posted up front: slice i + 1 arrives while slice i computes
        for sl, _ in parts:
            buf = torch.empty((sl.stop - sl.start, t, hidden), dtype=dtype, device=device)  # (b, T, C)
            received.append((buf, _p2p(dist.irecv, buf, stage.prev, stage, f"receive from rank {stage.prev}")))
    sent: list[tuple[torch.Tensor, Any]] = []
    outs: list[torch.Tensor] = []
    for i, (sl, kv) in enumerate(parts):
        if stage.prev is None:
            x = model.embed(input_ids[sl])  # (b, T, C)
        else:
            x, work = received[i]
            _wait(work, stage, f"receive from rank {stage.prev}")
        x = model.forward_layers(x, positions[sl] if positions.shape[0] == b else positions, start, kv,
                                 _rows(mask, sl, b), _rows(window_mask, sl, b))
        if stage.next is None:
            outs.append(model.forward_head(x, last_only))
        else:
            x = x.contiguous()  # kept alive until its send is done
            sent.append((x, _p2p(dist.isend, x, stage.next, stage, f"send to rank {stage.next}")))
    for _, work in sent:
        _wait(work, stage, f"send to rank {stage.next}")
    vocab = model.args.vocab_size
    if isinstance(last_only, torch.Tensor):
        shape: tuple[int, ...] = (last_only.shape[0], vocab)  # (R, V): the packed row's picked tokens
    else:
        shape = (b, vocab) if last_only else (b, t, vocab)
    if outs:  # the last stage; the head's dtype is the model's (what the other ranks expect)
        logits = (outs[0] if len(outs) == 1 else torch.cat(outs)).to(dtype).contiguous()
    else:
        logits = torch.empty(shape, dtype=dtype, device=device)
    return broadcast_(logits, stage.world, stage.head_rank)
