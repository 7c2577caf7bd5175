"""The engine's decode step with static shapes, captured as a CUDA graph per batch bucket.

An eager decode step of a 28-layer model launches several hundred kernels and builds its
metadata (slots, block tables, lengths) on the host; at a few milliseconds of GPU work per
step the launches and copies dominate. :class:`PagedDecode` removes both, the way vLLM v1's
persistent batch and CUDA graphs do:

* **one copy in per step**: the rows' ids, positions, slots, table rows and lengths travel in
  one ``(5, bucket)`` tensor; the ``bucket`` is the smallest of :data:`BUCKETS` that holds the
  step's rows, and the rows beyond the real ones point at a scratch block the block manager
  never hands out (they compute, and their results are never read);
* **block tables stay on the device**: every running request owns a row of ``tables``
  ``(rows, max_blocks)`` that is written only when the request gains blocks (once per
  ``block_size`` tokens) or is scheduled again after preemption; the step gathers its rows
  with an ``index_select`` inside the graph;
* **one replay per step**: the forward (embeddings, layers writing K/V at their slots and
  reading the pool through the Triton kernel, logits) is captured per bucket on first use,
  into one memory pool kept open for the runner's life, and replayed after.

With ``capture=False`` the same static step runs eagerly (the CPU tests check it decodes
exactly what the reference :class:`~dsr1.engine.paged.PagedStep` does). The graph pass decides
how each bucket's step runs (:mod:`dsr1.graph.paged_plans`): eager, compiled, captured, or
compiled and captured, fixed or measured per bucket on its first step (graph ``adaptive``).
"""
from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from dsr1.engine.paged import DecodeKernel, PagedKV
from dsr1.engine.plan import ScheduledRequest
from dsr1.interfaces import AttentionContext

#: batch sizes a graph is captured for; a step runs in the smallest bucket that holds its rows.
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
#: a prefill chunk of at most this many tokens may run as decode rows (see :meth:`PagedDecode.as_rows`)
ROW_CHUNK_TOKENS = 64
#: ... when its rows read at most this many cached tokens in all (rows x context)
ROW_CHUNK_READS = 1 << 17
#: warm-up runs before capture (Triton compiles and cuBLAS picks its kernels here).
WARMUP_STEPS = 2


class _Bucket(AttentionContext):
    """Fixed device buffers of one bucket and the static step that reads them."""

    def __init__(self, owner: PagedDecode, size: int) -> None:
        self.owner, self.size = owner, size
        self.meta = torch.zeros((5, size), dtype=torch.long, device=owner.device)  # ids, pos, slot, row, len
        #: captured graphs and their output buffers, by plan (``cudagraph``, ``cudagraph+compile``)
        self.graphs: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        #: the plan this bucket runs (None: not decided yet, see :meth:`PagedDecode.plan_for`)
        self.plan: str | None = None
        self.table32 = self.lens32 = torch.empty(0)

    def forward(self, compiled: bool = False) -> torch.Tensor:
        """The static step: logits ``(bucket, V)``."""
        o = self.owner
        self.table32 = o.tables.index_select(0, self.meta[3])  # (bucket, max_blocks) int32
        self.lens32 = self.meta[4].to(torch.int32)  # (bucket,)
        ids, pos = self.meta[0].view(-1, 1), self.meta[1].view(-1, 1)  # (bucket, 1)
        step = o.compiled_step() if compiled else o.model.forward_step
        return step(ids, pos, 0, self, None, None, True)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: Any, scale: float,
        windowed: bool,
    ) -> torch.Tensor:
        kv = self.owner.kv
        hkv, d = kv.n_kv_heads, kv.head_dim
        kv.k[layer].view(-1, hkv, d).index_copy_(0, self.meta[2], k[:, :, 0])  # (bucket, Hkv, D)
        kv.v[layer].view(-1, hkv, d).index_copy_(0, self.meta[2], v[:, :, 0])
        window = self.owner.window if windowed else None
        kernel = self.owner.kernel
        if torch.compiler.is_compiling():  # a kernel may offer an opaque form that compiled code calls as one op
            kernel = getattr(kernel, "opaque", kernel)
        o = kernel(q[:, :, 0], kv.k[layer], kv.v[layer], self.table32, self.lens32, scale, window)
        return o[:, :, None]  # (bucket, H, 1, D)

    def run(self, plan: str, pool: Any) -> torch.Tensor:
        """One step with ``plan`` (one of :data:`~dsr1.graph.paged_plans.PLANS`)."""
        compiled = plan.endswith("compile")
        if not plan.startswith("cudagraph"):
            return self.forward(compiled)
        entry = self.graphs.get(plan)
        if entry is None:
            # warm-up and capture write this step's keys at this step's slots, as the replay
            # that follows does again: the pool is left as the real step leaves it
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.forward(compiled)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.forward(compiled)
            entry = self.graphs[plan] = (graph, logits)
        entry[0].replay()
        return entry[1]


class PagedDecode:
    """Decode steps over ``kv`` with static shapes; ``kv`` holds one spare block past the
    block manager's ``num_blocks`` (the scratch block of padding rows)."""

    def __init__(
        self, model: Any, kv: PagedKV, num_blocks: int, max_model_len: int, max_rows: int,
        kernel: DecodeKernel, window: int | None, capture: bool, chooser: Any = None,
        compile_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """``chooser``: the graph pass's ``GraphSteps.paged`` (None: ``capture`` decides, the step is
        never compiled); ``compile_kwargs``: the pass's ``torch.compile`` arguments."""
        self.model, self.kv, self.kernel, self.window, self.capture = model, kv, kernel, window, capture
        self.chooser = chooser
        self.compile_kwargs = compile_kwargs or {}
        self._compiled: Any = None
        self.device = model.device
        self.scratch = num_blocks  # the spare block
        self.max_blocks = -(-max_model_len // kv.block_size)
        self.max_rows = max_rows
        # row max_rows is the padding rows' table: every entry the scratch block
        self.tables = torch.full((max_rows + 1, self.max_blocks), self.scratch, dtype=torch.int32, device=self.device)
        self.free_rows = list(range(max_rows - 1, -1, -1))
        self.rows: dict[str, tuple[int, list[int]]] = {}  # request id -> (table row, blocks written there)
        self.buckets: dict[int, _Bucket] = {}
        self.mempool = torch.cuda.MemPool() if capture else None

    def compiled_step(self) -> Any:
        """``model.forward_step`` through ``torch.compile`` (made on first use, shared by the buckets)."""
        if self._compiled is None:
            import torch._dynamo

            # one compiled graph per bucket size: past dynamo's default recompile limit the larger
            # buckets would fall back to eager without a word
            config = torch._dynamo.config
            name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
            setattr(config, name, max(getattr(config, name), 2 * len(BUCKETS)))
            self._compiled = torch.compile(self.model.forward_step, **self.compile_kwargs)
        return self._compiled

    def plan_for(self, bucket: _Bucket) -> str:
        """The bucket's plan: the chooser's (graph ``adaptive`` measures every plan here, on this
        step's rows: a step repeated writes the same keys at the same slots, so the trials leave
        the pool as one step does), else captured or eager by ``capture``."""
        if self.chooser is None:
            return "cudagraph" if self.capture else "eager"
        pool = self.mempool.id if self.mempool is not None else None

        def trial(plan: str) -> Any:
            return lambda: bucket.run(plan, pool)

        plan = str(self.chooser(bucket.size, trial))
        for other in [p for p in bucket.graphs if p != plan]:  # the losers' graphs go
            del bucket.graphs[other]
        return plan

    def fits(self, group: Sequence[ScheduledRequest]) -> bool:
        """Whether a bucket holds ``group``'s tokens and there are table rows for its new requests."""
        new = sum(1 for s in group if s.request_id not in self.rows)
        return sum(len(s.token_ids) for s in group) <= BUCKETS[-1] and new <= len(self.free_rows)

    @staticmethod
    def as_rows(s: ScheduledRequest) -> bool:
        """Whether a prefill chunk is cheaper as decode rows (one per token) than as a prefill.

        Row ``i`` of a chunk attends to the first ``start + i + 1`` tokens of the request: the
        kernel's causal prefill, exact because every row's key and value are written (one
        ``index_copy_`` per layer) before any row reads. Each row reads its whole context, so
        only short chunks over moderate contexts qualify."""
        n = len(s.token_ids)
        return n <= ROW_CHUNK_TOKENS and n * (s.start + n) <= ROW_CHUNK_READS

    def release(self, request_ids: Sequence[str]) -> None:
        """Give back the table rows of requests that finished, were aborted or preempted."""
        for rid in request_ids:
            entry = self.rows.pop(rid, None)
            if entry is not None:
                self.free_rows.append(entry[0])

    def _sync_tables(self, group: Sequence[ScheduledRequest]) -> list[int]:
        """Each request's table row, after writing the blocks it gained since last step."""
        rows, cols, vals = [], [], []
        out = []
        for s in group:
            entry = self.rows.get(s.request_id)
            blocks = s.block_ids
            if entry is None:
                entry = (self.free_rows.pop(), [])
            row, known = entry
            if len(blocks) != len(known) or blocks[: len(known)] != known:
                first = len(known) if blocks[: len(known)] == known else 0  # rescheduled: new blocks from 0
                rows += [row] * (len(blocks) - first)
                cols += range(first, len(blocks))
                vals += blocks[first:]
                entry = (row, list(blocks))
            self.rows[s.request_id] = entry
            out.append(row)
        if vals:
            upd = torch.tensor([rows, cols, vals], dtype=torch.long).to(self.device)  # (3, M)
            self.tables.index_put_((upd[0], upd[1]), upd[2].to(torch.int32))
        return out

    def __call__(self, group: Sequence[ScheduledRequest]) -> torch.Tensor:
        """Logits ``(B, V)`` of the last token of each of ``group``'s ``B`` requests; each token is
        a row (decodes have one, short chunks several). With one token per request the tensor is
        the bucket's output buffer: read it before the next call."""
        bs = self.kv.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        lens: list[int] = []
        table_rows: list[int] = []
        last: list[int] = []
        for s, row in zip(group, self._sync_tables(group)):
            for j, token in enumerate(s.token_ids):
                p = s.start + j
                ids.append(token)
                pos.append(p)
                slots.append(s.block_ids[p // bs] * bs + p % bs)
                lens.append(p + 1)
                table_rows.append(row)
            last.append(len(ids) - 1)
        n = len(ids)
        size = BUCKETS[bisect.bisect_left(BUCKETS, n)]
        pad = size - n
        bucket = self.buckets.get(size)
        if bucket is None:
            bucket = self.buckets[size] = _Bucket(self, size)
        meta = [ids + [0] * pad, pos + [0] * pad, slots + [self.scratch * bs] * pad,
                table_rows + [self.max_rows] * pad, lens + [1] * pad]
        bucket.meta.copy_(torch.tensor(meta, dtype=torch.long))
        pool = self.mempool.id if self.mempool is not None else None
        if bucket.plan is None:
            bucket.plan = self.plan_for(bucket)
            try:
                logits = bucket.run(bucket.plan, pool)
            except Exception as err:  # a plan read from graph adaptive's cache that cannot run here any more
                if not hasattr(self.chooser, "exclude"):
                    raise
                self.chooser.exclude(bucket.size, bucket.plan, err)
                bucket.plan = self.plan_for(bucket)
                logits = bucket.run(bucket.plan, pool)
        else:
            logits = bucket.run(bucket.plan, pool)
        if n == len(group):
            return logits[:n]
        return logits[torch.tensor(last, device=logits.device)]  # (B, V)
