"""The runner: where the engine's tensors live. It executes a scheduler's plan and never
decides what to run.

:class:`PagedRunner` runs any mix of prefill chunks and decodes over the paged KV pool. A step's
decodes (one token each) go through one forward, its prefill chunks through another, so a
decode never pays for a long prompt:

* prefill chunks are packed into one row without padding (:mod:`dsr1.engine.prefill`);
* decodes, where a paged decode kernel runs (CUDA), go through :mod:`dsr1.engine.paged_graph`:
  static shapes per batch bucket, block tables kept on the device, one CUDA graph replay;
* elsewhere (CPU), decodes go through :class:`~dsr1.engine.paged.PagedStep`, the gathering
  reference path.

With a host swap space (``host_blocks``), a plan's swap copies (:mod:`dsr1.engine.swap`) run
before its forwards.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsr1.engine.paged import DecodeKernel, PagedKV, PagedStep
from dsr1.engine.paged_graph import PagedDecode
from dsr1.engine.plan import ScheduledRequest, SchedulerOutput
from dsr1.engine.prefill import PackedPrefill
from dsr1.engine.request import Request
from dsr1.engine.swap import HostKV
from dsr1.errors import Dsr1Error
from dsr1.interfaces import SamplingParams


@dataclass
class Sampled:
    """One sampled token of one request, with its logprobs when the request asked for them."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def cuda_decode_kernel(device: torch.device, head_dim: int, block_size: int) -> DecodeKernel | None:
    """The Triton paged decode kernel where it can run here, else ``None`` (gathering reference)."""
    if device.type != "cuda" or head_dim & (head_dim - 1) or block_size < 16:
        return None
    try:
        import triton  # noqa: F401 - only whether it is there
    except ImportError:
        return None
    from dsr1.engine.paged_triton import paged_decode

    return paged_decode


def paged_plans(model: Any) -> tuple[Any, dict[str, Any] | None]:
    """The graph pass's chooser for the paged step and its ``torch.compile`` arguments; no chooser
    when the config names no graph pass (the runner's default: captured on CUDA)."""
    runtime = getattr(model, "runtime", None)
    if runtime is None or runtime.pipeline.config.graph is None:
        return None, None
    steps = runtime.steps
    return steps.paged, steps.compile_kwargs


class PagedRunner:
    """Executes :class:`SchedulerOutput` plans on ``model`` over a :class:`PagedKV` pool.

    ``host_blocks``: size of the host swap space in blocks (0: none), pinned with ``pin_host``."""

    def __init__(
        self, model: Any, decoder: Any, num_blocks: int, block_size: int, max_model_len: int,
        decode_kernel: DecodeKernel | None | str = "auto", max_rows: int = 512, capture: bool | None = None,
        host_blocks: int = 0, pin_host: bool = False,
    ) -> None:
        a = model.args
        self.model, self.decoder = model, decoder
        self.device = model.device
        # one block past the manager's: the scratch block that a graph's padding rows write to
        self.kv = PagedKV(a.n_layers, num_blocks + 1, block_size, a.n_kv_heads, a.head_dim, model.dtype, self.device,
                          shared=getattr(a, "kv_shared", False))
        self.host: HostKV | None = HostKV(self.kv, host_blocks, pin_host) if host_blocks > 0 else None
        model.rope.ensure(max_model_len, model.dtype)
        if decode_kernel == "auto":
            decode_kernel = cuda_decode_kernel(self.device, a.head_dim, block_size)
        self.decode_kernel: DecodeKernel | None = decode_kernel  # type: ignore[assignment]
        self.window = model.min_window
        #: static-shape decode (captured on CUDA unless ``capture`` is False); None: the reference path
        self.static_decode: PagedDecode | None = None
        if self.decode_kernel is not None:
            # a pool that streams weights in per layer runs its copies from Python hooks: no graph can hold them
            streams = getattr(model, "streams_weights", False)
            capture = self.device.type == "cuda" and not streams if capture is None else capture
            chooser, kwargs = paged_plans(model)
            if chooser is not None and streams and getattr(chooser, "plan", "").startswith("cudagraph"):
                raise Dsr1Error("graph 'cudagraph' captures the decode step, and pool 'tiered' streams weights in "
                                "per layer from Python (no graph can hold the copies); use graph 'eager' or "
                                "'adaptive' (which measures only what can run)")
            self.static_decode = PagedDecode(model, self.kv, num_blocks, max_model_len, max_rows,
                                             self.decode_kernel, self.window, capture, chooser, kwargs)
        self.generators: dict[str, torch.Generator] = {}
        self.shared_generator = torch.Generator(device=self.device)

    def forget(self, request_ids: Sequence[str]) -> None:
        """Drop per-request state (seeded generators, table rows) of finished or aborted requests."""
        for rid in request_ids:
            self.generators.pop(rid, None)
        if self.static_decode is not None:
            self.static_decode.release(request_ids)

    def execute(self, plan: SchedulerOutput, requests: Mapping[str, Request],
                params: Mapping[str, SamplingParams]) -> dict[str, Sampled]:
        """Run the plan's forwards and sample the rows that end their known tokens."""
        self.forget(plan.finished)
        if self.static_decode is not None:
            # their blocks are gone; a new table comes with the recompute or the swap-in
            self.static_decode.release(plan.preempted)
        if plan.swap_out or plan.swap_in:
            if self.host is None:
                raise RuntimeError("the plan moves KV blocks to or from the host, but this runner has no swap space")
            self.host.apply(plan.swap_out, plan.swap_in)  # before any forward writes the blocks it frees or fills
        decodes = [s for s in plan.scheduled if len(s.token_ids) == 1]
        prefills = [s for s in plan.scheduled if len(s.token_ids) > 1]
        if self.static_decode is not None and prefills:
            # short chunks (a prefix-cache hit's suffix, a short prompt) run as decode rows of the
            # captured step, one row per token, instead of an eager forward of their own
            short: list[ScheduledRequest] = []
            long: list[ScheduledRequest] = []
            for s in prefills:
                (short if self.static_decode.as_rows(s) else long).append(s)
            if short and self.static_decode.fits([*decodes, *short]):
                decodes, prefills = [*decodes, *short], long
        out: dict[str, Sampled] = {}
        with torch.inference_mode():
            for group, forward in ((decodes, self._decode), (prefills, self._prefill)):
                if group:
                    logits = forward(group)  # (B, V)
                    rows = [i for i, s in enumerate(group) if s.sample]
                    if rows:
                        out.update(self._sample(logits, [group[i] for i in rows], rows, requests, params))
        return out

    def _decode(self, group: Sequence[ScheduledRequest]) -> torch.Tensor:
        if self.static_decode is not None and self.static_decode.fits(group):
            return self.static_decode(group)  # (B, V)
        return self._padded(group)

    def _prefill(self, group: Sequence[ScheduledRequest]) -> torch.Tensor:
        step = PackedPrefill(self.kv, [s.block_ids for s in group], [s.start for s in group],
                             [len(s.token_ids) for s in group], self.window, self.device)
        ids = torch.tensor([[t for s in group for t in s.token_ids]], dtype=torch.long).to(self.device)  # (1, N)
        return self.model.forward_step(ids, step.positions, 0, step, None, None, step.last)  # (R, V)

    def _padded(self, group: Sequence[ScheduledRequest]) -> torch.Tensor:
        """The reference forward: rows left-padded to the longest, masks built on the host."""
        t = max(len(s.token_ids) for s in group)
        ids = torch.zeros((len(group), t), dtype=torch.long)  # (B, T), left-padded
        for i, s in enumerate(group):
            ids[i, t - len(s.token_ids) :] = torch.tensor(s.token_ids, dtype=torch.long)
        step = PagedStep(self.kv, [s.block_ids for s in group], [s.start for s in group],
                         [len(s.token_ids) for s in group], t, self.window, self.device, self.decode_kernel)
        ids = ids.to(self.device)
        return self.model.forward_step(ids, step.positions, 0, step, None, None, True)  # (B, V)

    def _generator(self, rid: str, p: SamplingParams) -> torch.Generator | None:
        if p.greedy:
            return None
        if p.seed is None:
            return self.shared_generator
        gen = self.generators.get(rid)
        if gen is None:
            gen = self.generators[rid] = torch.Generator(device=self.device).manual_seed(int(p.seed))
        return gen

    def _sample(
        self, logits: torch.Tensor, group: Sequence[ScheduledRequest], rows: list[int],
        requests: Mapping[str, Request], params: Mapping[str, SamplingParams],
    ) -> dict[str, Sampled]:
        logits = logits[rows].float()  # (R, V)
        reqs = [requests[s.request_id] for s in group]
        ps = [params[s.request_id] for s in group]
        outputs = [r.output_ids for r in reqs]
        prompts = [r.prompt_ids for r in reqs]
        gens = [self._generator(r.request_id, p) for r, p in zip(reqs, ps)]
        tokens = self.decoder.next_tokens(logits, outputs, prompts, ps, gens)  # (R,)
        picked = tokens.tolist()
        result = {r.request_id: Sampled(tok) for r, tok in zip(reqs, picked)}
        want = [i for i, p in enumerate(ps) if p.logprobs is not None]
        if want:
            n = max(int(ps[i].logprobs or 0) for i in want)
            chosen, top_ids, top_lp = self.decoder.logprobs(logits[want], tokens[want], n)
            for j, i in enumerate(want):
                k = int(ps[i].logprobs or 0)
                s = result[reqs[i].request_id]
                s.logprob = float(chosen[j])
                s.top = list(zip(top_ids[j, :k].tolist(), top_lp[j, :k].tolist()))
        return result
