"""KV-cache conformance: the cache driven like a model drives it, against references.

The kit plays a small "model": for each case it writes random keys/values for a prompt and
then one token at a time into ``layers`` layers, asks ``select_mask`` for padded batches,
attends with the float64 reference and, for caches that observe queries, calls ``observe``.

* Non-compressing caches: every ``update`` returns exactly the keys/values ``contiguous``
  returns (capability ``quantized``: within the int8 absmax bound, ``scale / 2`` per element).
* Caches with a :class:`dsr1.kvcache.paged.BlockAllocator` (found among their attributes):
  the attention output does not change under any permutation of the physical blocks
  (hypothesis), and the allocator keeps its invariants under a hypothesis state machine.
* Compressing caches (``compresses = True``) must expose ``kept_positions(layer) -> (B, n)``
  (``-1`` at slots that hold no token of their row: padding, or a token the row evicted while
  a longer row kept more); a prefill returns all of itself, a decode step returns exactly the
  kept tokens + the new one, and what each row keeps after every step equals a slow per-row
  reference selection for the policy their capabilities name (``policy:streaming``,
  ``policy:heavy-hitter``; override :meth:`KVCacheConformance.reference_keep` for another
  policy). Budgets count a row's real tokens, never its padding.
* Every cache is batch-invariant (as the attention kit checks for attention): each row of a
  left-padded batch of different lengths, run alone, gets the same attention output (and, for
  compressing caches, keeps the same tokens) as inside the batch (:data:`BATCH_CASES`).
* ``nbytes()`` equals the bytes of the tensors the cache holds (found by walking it).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import dsr1_sdk.reference.attention as ref
from dsr1.interfaces import CacheShape, KVCache
from dsr1.kvcache.paged import BlockAllocator
from dsr1.registry import PluginRegistry
from dsr1_sdk.testing.base import PluginConformance
from dsr1_sdk.testing.tolerances import close_problem


@dataclass(frozen=True)
class KVCase:
    """One drive of a cache: a prompt, then ``decode`` single-token steps."""

    layers: int = 2
    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 8
    prompt: int = 7
    decode: int = 6
    padded: bool = False
    seed: int = 0
    #: left padding of each row (with ``padded``); empty: drawn at random, row 0 unpadded.
    pads: tuple[int, ...] = ()

    @property
    def total(self) -> int:
        return self.prompt + self.decode


CASES: dict[str, KVCase] = {
    "prefill_decode": KVCase(),
    "padded_gqa": KVCase(batch=3, heads=6, kv_heads=2, padded=True),
    "mqa_batch1": KVCase(batch=1, heads=4, kv_heads=1, prompt=11, decode=9),
    "single_token_prompt": KVCase(prompt=1, decode=12),
    "long_prompt": KVCase(batch=2, heads=2, kv_heads=2, head_dim=16, prompt=40, decode=8, padded=True),
    "head_dim_64": KVCase(batch=1, heads=2, kv_heads=2, head_dim=64, prompt=9, decode=4),
}

#: Batches of rows of different real lengths (left padding), each row also run alone.
BATCH_CASES: dict[str, KVCase] = {
    "mixed_lengths": KVCase(batch=3, prompt=12, decode=8, padded=True, pads=(0, 7, 4)),
    "long_next_to_short_gqa": KVCase(batch=3, heads=6, kv_heads=2, head_dim=16, prompt=30, decode=10, padded=True,
                                     pads=(22, 0, 11), seed=1),
    "one_token_prompt": KVCase(batch=2, prompt=9, decode=6, padded=True, pads=(8, 0), seed=2),
}

#: (atol, rtol) of a row's attention output alone against the same row in a batch: K/V are
#: exact copies (float64 reference attention), quantized caches within their kit tolerance.
BATCH_TOLERANCES: dict[str, tuple[float, float]] = {"exact": (1e-10, 1e-10), "quantized": (5e-2, 5e-2)}


@dataclass
class Inputs:
    k: torch.Tensor  # (L, B, Hkv, N, D)
    v: torch.Tensor  # (L, B, Hkv, N, D)
    q: torch.Tensor  # (L, B, H, N, D)
    valid: torch.Tensor  # (B, N) real tokens (left padding in the prompt)
    case: KVCase = field(default_factory=KVCase)


def make_inputs(case: KVCase) -> Inputs:
    gen = torch.Generator().manual_seed(case.seed)
    n, (l_, b) = case.total, (case.layers, case.batch)
    k = torch.randn(l_, b, case.kv_heads, n, case.head_dim, generator=gen)
    v = torch.randn(l_, b, case.kv_heads, n, case.head_dim, generator=gen)
    q = torch.randn(l_, b, case.heads, n, case.head_dim, generator=gen)
    valid = torch.ones(b, n, dtype=torch.bool)
    if case.pads:
        assert case.padded and len(case.pads) == b and all(0 <= p < case.prompt for p in case.pads), case
        valid[:, : case.prompt] = torch.arange(case.prompt)[None] >= torch.tensor(case.pads)[:, None]
    elif case.padded and b > 1:
        pad = torch.randint(0, max(case.prompt - 1, 1), (b,), generator=gen)
        pad[0] = 0
        valid[:, : case.prompt] = torch.arange(case.prompt)[None] >= pad[:, None]
    return Inputs(k, v, q, valid, case)


def row_alone(inp: Inputs, row: int) -> tuple[Inputs, int]:
    """Row ``row`` of a left-padded batch as a batch of its own, without its padding; and the padding."""
    c = inp.case
    pad = int((~inp.valid[row, : c.prompt]).sum())
    case = replace(c, batch=1, prompt=c.prompt - pad, padded=False, pads=())
    k, v, q = (x[:, row : row + 1, :, pad:] for x in (inp.k, inp.v, inp.q))  # (L, 1, h, N - pad, D)
    return Inputs(k, v, q, torch.ones(1, c.total - pad, dtype=torch.bool), case), pad


def model_mask(inp: Inputs, start: int, t: int) -> torch.Tensor | None:
    """The mask a model passes: None unpadded, else ``(B, 1, T, end)`` causal & valid | diagonal."""
    if not inp.case.padded:
        return None
    end = start + t
    qpos = torch.arange(start, end)[:, None]  # (T, 1)
    kpos = torch.arange(end)[None, :]  # (1, S)
    m = (kpos <= qpos)[None, None] & inp.valid[:, None, None, :end]  # (B, 1, T, S)
    return m | (kpos == qpos)[None, None]


@dataclass
class Step:
    start: int
    t: int
    k: list[torch.Tensor]  # per layer, (B, Hkv, S, D) as returned
    v: list[torch.Tensor]
    out: list[torch.Tensor]  # per layer, (B, H, T, D) float64 reference attention
    kept: list[torch.Tensor | None]  # per layer, kept positions after the step (compressing caches)


def drive(cache: KVCache, inp: Inputs, on_step: Callable[[Step], None] | None = None) -> list[Step]:
    """Prefill then decode through ``cache`` the way a model does; returns every step."""
    c = inp.case
    cache.allocate(CacheShape(c.layers, c.batch, c.total, c.kv_heads, c.head_dim), torch.float32,
                   torch.device("cpu"))
    return drive_allocated(cache, inp, on_step)


def drive_allocated(cache: KVCache, inp: Inputs, on_step: Callable[[Step], None] | None = None) -> list[Step]:
    c, steps = inp.case, []
    scale = c.head_dim**-0.5
    spans = [(0, c.prompt)] + [(c.prompt + i, 1) for i in range(c.decode)]
    for start, t in spans:
        step = Step(start, t, [], [], [], [])
        for layer in range(c.layers):
            sl = slice(start, start + t)
            k, v = cache.update(layer, inp.k[layer, :, :, sl], inp.v[layer, :, :, sl], start)  # (B, Hkv, S, D)
            mask = model_mask(inp, start, t)
            if mask is not None and cache.compresses:
                mask = cache.select_mask(layer, mask)  # (B, 1, T, S)
            q = inp.q[layer, :, :, sl]  # (B, H, T, D)
            step.out.append(ref.softmax_attention(q, k, v, mask=mask, scale=scale))
            step.k.append(k.clone())
            step.v.append(v.clone())
            if cache.observes_queries:
                cache.observe(layer, q, k, mask, scale)
        for layer in range(c.layers):
            step.kept.append(cache.kept_positions(layer) if cache.compresses else None)  # type: ignore[attr-defined]
        steps.append(step)
        if on_step is not None:
            on_step(step)
    return steps


def check_kv_round_trip(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    """Symmetric absmax int8: each element within half a step, ``max|x| / 254`` of its token and head."""
    bound = want.abs().amax(dim=-1, keepdim=True) / 254  # (..., 1)
    err = (got.double() - want.double()).abs()
    worst = (err - bound * (1 + 1e-5) - 1e-7).max().item()
    assert worst <= 0, f"{where}: int8 round-trip error exceeds max|x|/254 by {worst:.3g}"


def tensor_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the tensors ``obj`` holds (attributes, lists, dicts, nested caches/allocators)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        ptr = obj.untyped_storage().data_ptr()
        if ptr in seen:
            return 0
        seen.add(ptr)
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(x, seen) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x, seen) for x in obj.values())
    if isinstance(obj, (KVCache, BlockAllocator)):
        return sum(tensor_bytes(x, seen) for name, x in vars(obj).items() if name not in ("_states", "_pending"))
    return 0


def allocators(cache: Any) -> list[BlockAllocator]:
    """The block allocators among the cache's attributes (nested caches included)."""
    found: list[BlockAllocator] = []
    for x in vars(cache).values():
        if isinstance(x, BlockAllocator):
            found.append(x)
        elif isinstance(x, KVCache):
            found.extend(allocators(x))
    return found


# --- reference eviction policies ---------------------------------------------------------------


class ReferencePolicy:
    """A slow, per-row re-statement of an eviction policy, fed the same inputs as the cache."""

    def __init__(self, impl: Any, inp: Inputs) -> None:
        self.impl, self.inp = impl, inp
        c = inp.case
        self.kept: dict[tuple[int, int], list[int]] = {(l_, b): [] for l_ in range(c.layers) for b in range(c.batch)}
        self.score: dict[tuple[int, int, int], float] = {}

    def budget(self, written: int) -> int:
        raise NotImplementedError

    def rank(self, layer: int, row: int, ret: list[int], end: int) -> list[tuple[Any, ...]]:
        """Sort keys (descending) of the returned positions ``ret``; the first ``budget`` are kept."""
        raise NotImplementedError

    def observe(self, layer: int, row: int, ret: list[int], start: int, t: int) -> None:
        """Update scores from the queries of this step (default: none)."""

    def step(self, s: Step) -> list[list[list[int]]]:
        """The real positions each layer and row keeps after step ``s``: the best ``budget`` of the
        row's kept + new real tokens, its budget counting its real tokens written so far."""
        end = s.start + s.t
        valid = self.inp.valid
        for (layer, row), kept in self.kept.items():
            ret = kept + [p for p in range(s.start, end) if bool(valid[row, p])]
            self.observe(layer, row, ret, s.start, s.t)
            keep = min(self.budget(int(valid[row, :end].sum())), len(ret))
            order = sorted(ret, key=lambda p, ly=layer, r=row: self.rank(ly, r, ret, end)[ret.index(p)], reverse=True)
            self.kept[(layer, row)] = sorted(order[:keep])
        c = self.inp.case
        return [[self.kept[(layer, row)] for row in range(c.batch)] for layer in range(c.layers)]


class StreamingReference(ReferencePolicy):
    def budget(self, written: int) -> int:
        return int(self.impl.options.sinks + self.impl.options.window)

    def rank(self, layer: int, row: int, ret: list[int], end: int) -> list[tuple[Any, ...]]:
        valid = [bool(self.inp.valid[row, p]) for p in ret]
        sinks = {p for p in [p for p, ok in zip(ret, valid) if ok][: self.impl.options.sinks]}
        return [(0 if not ok else 2 if p in sinks else 1, p) for p, ok in zip(ret, valid)]


class HeavyHitterReference(ReferencePolicy):
    def budget(self, written: int) -> int:
        b = self.impl.options.budget
        return max(math.ceil(b * written), 1) if isinstance(b, float) else int(b)

    def rank(self, layer: int, row: int, ret: list[int], end: int) -> list[tuple[Any, ...]]:
        keys = []
        for p in ret:
            if not bool(self.inp.valid[row, p]):
                keys.append((0, p, p))
            elif p >= end - self.impl.options.recent:
                keys.append((2, p, p))
            else:
                keys.append((1, self.score.get((layer, row, p), 0.0), p))
        return keys

    def observe(self, layer: int, row: int, ret: list[int], start: int, t: int) -> None:
        c, inp = self.inp.case, self.inp
        scale, g = c.head_dim**-0.5, c.heads // c.kv_heads
        for i in range(t):
            qp = start + i
            if not bool(inp.valid[row, qp]):
                continue  # a padding query: attends only its own (padding) key
            seen = [p for p in ret if p <= qp]
            for h in range(c.heads):
                q = inp.q[layer, row, h, qp].double()  # (D,)
                k = inp.k[layer, row, h // g, seen].double()  # (S, D)
                w = torch.softmax(k @ q * scale, dim=0)
                for p, x in zip(seen, w.tolist()):
                    self.score[(layer, row, p)] = self.score.get((layer, row, p), 0.0) + x


REFERENCES: dict[str, type[ReferencePolicy]] = {
    "policy:streaming": StreamingReference,
    "policy:heavy-hitter": HeavyHitterReference,
}


def check_policy(impl: Any, reference: ReferencePolicy, inp: Inputs, tol: float = 1e-4) -> None:
    """Drive ``impl``; after every step its kept positions equal the reference's (scores within ``tol`` may swap)."""
    c = inp.case
    before: list[list[list[int]]] = [[[] for _ in range(c.batch)] for _ in range(c.layers)]  # with -1: dead slots

    def on_step(s: Step) -> None:
        want = reference.step(s)
        for layer in range(c.layers):
            got_kept = s.kept[layer]
            assert got_kept is not None
            for row in range(c.batch):
                ret = before[layer][row] + list(range(s.start, s.start + s.t))
                live = [i for i, p in enumerate(ret) if p >= 0]
                returned = s.k[layer][row]  # (Hkv, S, D)
                assert returned.shape[1] == len(ret) and torch.equal(
                    returned[:, live], inp.k[layer, row][:, [ret[i] for i in live]]
                ), (
                    f"step at {s.start}, layer {layer}, row {row}: update did not return the kept keys "
                    f"{before[layer][row]} + the new ones"
                )
                full = got_kept[row].tolist()
                got = [p for p in full if p >= 0]
                if got != want[layer][row]:
                    differ = set(got) ^ set(want[layer][row])
                    scores = [reference.score.get((layer, row, p)) for p in differ]
                    near = all(x is not None for x in scores) and max(scores) - min(scores) < tol  # type: ignore
                    assert near, (
                        f"step at {s.start}, layer {layer}, row {row}: keeps {got}, the policy says "
                        f"{want[layer][row]}"
                    )
                    reference.kept[(layer, row)] = got  # a near tie: follow the cache from here
                before[layer][row] = full

    drive(impl, inp, on_step)


def check_kv_batch_invariance(
    make: Callable[[], KVCache], case: KVCase, tolerance: tuple[float, float] = BATCH_TOLERANCES["exact"]
) -> None:
    """Each row of ``case`` (left-padded rows of different lengths) driven alone through a fresh cache
    gives the attention output of its real queries, and keeps the same tokens, as inside the batch."""
    inp = make_inputs(case)
    batch = drive(make(), inp)
    atol, rtol = tolerance
    for row in range(case.batch):
        alone_inp, pad = row_alone(inp, row)
        alone = drive(make(), alone_inp)
        for s_b, s_a in zip(batch, alone, strict=True):
            for layer in range(case.layers):
                where = f"batch row {row} (left padding {pad}), step at {s_b.start}, layer {layer}"
                kept_b, kept_a = s_b.kept[layer], s_a.kept[layer]
                if kept_b is not None and kept_a is not None:
                    got = [p - pad for p in kept_b[row].tolist() if p >= 0]
                    want = [p for p in kept_a[0].tolist() if p >= 0]
                    assert got == want, f"{where}: keeps positions {got} in the batch but {want} alone"
                n = s_a.t  # the row's real queries: the last n of the batch step's
                problem = close_problem(s_b.out[layer][row : row + 1, :, -n:], s_a.out[layer], atol, rtol,
                                        f"{where}: attention output in the batch vs alone")
                assert problem is None, problem


# --- allocator state machine ---------------------------------------------------------------------


def allocator_machine(num_blocks: int, block_size: int) -> type[RuleBasedStateMachine]:
    """A hypothesis state machine over :class:`BlockAllocator` (used + free = total, no double free, no leak)."""

    class AllocatorMachine(RuleBasedStateMachine):
        seqs = Bundle("seqs")

        def __init__(self) -> None:
            super().__init__()
            self.alloc = BlockAllocator(num_blocks, block_size)
            self.next_id = 0
            self.model_len: dict[int, int] = {}

        @rule(target=seqs)
        def add(self) -> int:
            seq, self.next_id = self.next_id, self.next_id + 1
            self.alloc.add_sequence(seq)
            self.model_len[seq] = 0
            return seq

        @rule(seq=seqs, n=st.integers(0, 3 * block_size))
        def append(self, seq: int, n: int) -> None:
            if seq not in self.model_len:
                return
            need = -(-(self.model_len[seq] + n) // block_size) - len(self.alloc.tables[seq])
            free = self.alloc.num_free
            if need > free:
                with pytest.raises(Exception, match="out of blocks"):
                    self.alloc.append(seq, n)
                assert self.alloc.num_free == free, "a failed append leaked blocks"
            else:
                new = self.alloc.append(seq, n)
                assert len(new) == max(need, 0)
                self.model_len[seq] += n

        @rule(seq=consumes(seqs))
        def finish(self, seq: int) -> None:
            self.alloc.free_sequence(seq)
            del self.model_len[seq]
            with pytest.raises(Exception, match="not in the paged kvcache"):
                self.alloc.free_sequence(seq)  # a double free is refused

        @invariant()
        def used_plus_free(self) -> None:
            self.alloc.check()
            assert self.alloc.num_used + self.alloc.num_free == num_blocks
            assert self.alloc.lengths == self.model_len

        def teardown(self) -> None:
            for seq in list(self.model_len):
                self.alloc.free_sequence(seq)
            assert self.alloc.num_free == num_blocks and self.alloc.num_used == 0, "blocks leaked"

    return AllocatorMachine


# --- the kit -------------------------------------------------------------------------------------


class KVCacheConformance(PluginConformance):
    """Conformance kit of the ``kvcache`` family. Subclass it and set ``plugin`` (and ``options``)."""

    family: ClassVar[str] = "kvcache"
    CASES: ClassVar[dict[str, KVCase]] = CASES
    BATCH_CASES: ClassVar[dict[str, KVCase]] = BATCH_CASES

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "case_name" in metafunc.fixturenames:
            metafunc.parametrize("case_name", list(type(self).CASES))
        if "batch_case" in metafunc.fixturenames:
            metafunc.parametrize("batch_case", list(type(self).BATCH_CASES))

    def contiguous(self) -> KVCache:
        spec = PluginRegistry().load("kvcache", "contiguous")
        impl: KVCache = spec.make(spec.options())
        return impl

    def quantized(self) -> bool:
        return "quantized" in self.capabilities()

    def reference_keep(self, impl: Any, inp: Inputs) -> ReferencePolicy:
        """The slow reference of this cache's eviction policy (from its ``policy:`` capability)."""
        for cap in self.capabilities():
            if cap in REFERENCES:
                return REFERENCES[cap](impl, inp)
        pytest.fail(f"{self.plugin} compresses but declares no policy the kit knows ({sorted(REFERENCES)}); "
                    "override reference_keep")

    def compare_steps(self, got: list[Step], want: list[Step], where: str) -> None:
        for s_got, s_want in zip(got, want, strict=True):
            for layer, (kg, kw, vg, vw, og, ow) in enumerate(
                zip(s_got.k, s_want.k, s_got.v, s_want.v, s_got.out, s_want.out, strict=True)
            ):
                at = f"{where}, step at {s_got.start}, layer {layer}"
                assert kg.shape == kw.shape, f"{at}: returned keys {tuple(kg.shape)}, contiguous {tuple(kw.shape)}"
                if self.quantized():
                    check_kv_round_trip(kg, kw, f"{at} keys")
                    check_kv_round_trip(vg, vw, f"{at} values")
                    torch.testing.assert_close(og, ow, atol=5e-2, rtol=5e-2, msg=lambda m, a=at: f"{a}: {m}")
                else:
                    assert torch.equal(kg, kw) and torch.equal(vg, vw), f"{at}: K/V differ from contiguous"
                    assert torch.equal(og, ow), f"{at}: attention output differs from contiguous"

    # --- tests ---------------------------------------------------------------------------------

    def test_same_as_contiguous(self, case_name: str) -> None:
        impl = self.make_impl()
        if impl.compresses:
            pytest.skip(f"{self.plugin} compresses: checked against its policy instead")
        inp = make_inputs(type(self).CASES[case_name])
        self.compare_steps(drive(impl, inp), drive(self.contiguous(), inp), f"case {case_name}")

    def test_batch_invariance(self, batch_case: str) -> None:
        tolerance = BATCH_TOLERANCES["quantized" if self.quantized() else "exact"]
        check_kv_batch_invariance(self.make_impl, type(self).BATCH_CASES[batch_case], tolerance)

    def test_batch_invariance_hypothesis(self) -> None:
        tolerance = BATCH_TOLERANCES["quantized" if self.quantized() else "exact"]

        @settings(max_examples=self.max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(data=st.data(), prompt=st.integers(2, 16), decode=st.integers(0, 6), seed=st.integers(0, 2**16))
        def run(data: st.DataObject, prompt: int, decode: int, seed: int) -> None:
            pads = data.draw(st.lists(st.integers(0, prompt - 1), min_size=2, max_size=3), label="pads")
            case = KVCase(layers=1, batch=len(pads), prompt=prompt, decode=decode, padded=True, pads=tuple(pads),
                          seed=seed)
            check_kv_batch_invariance(self.make_impl, case, tolerance)

        run()

    def test_reset_replays(self) -> None:
        impl = self.make_impl()
        inp = make_inputs(CASES["padded_gqa"])
        first = drive(impl, inp)
        impl.reset()
        again = drive_allocated(impl, inp)
        for a, b in zip(first, again, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a.out, b.out)), "a reset cache does not replay the same"

    def test_nbytes_is_real_storage(self) -> None:
        impl = self.make_impl()
        assert impl.nbytes() == 0 or impl.nbytes() == tensor_bytes(impl)
        inp = make_inputs(CASES["long_prompt"])
        bytes_seen: list[int] = []
        drive(impl, inp, lambda s: bytes_seen.append(impl.nbytes()))
        assert all(isinstance(n, int) and n > 0 for n in bytes_seen)
        assert bytes_seen[-1] == tensor_bytes(impl), (
            f"nbytes() = {bytes_seen[-1]} but the cache holds {tensor_bytes(impl)} bytes of tensors"
        )
        drive(impl, inp)  # allocate the same shape again: the same bytes
        assert impl.nbytes() == bytes_seen[-1], "nbytes changes when the same shape is allocated again"

    def test_block_permutation(self) -> None:
        probe = self.make_impl()
        drive(probe, make_inputs(CASES["padded_gqa"]))
        if not allocators(probe):
            pytest.skip(f"{self.plugin} has no block allocator")
        inp = make_inputs(CASES["padded_gqa"])
        want = drive(self.contiguous(), inp)
        c = inp.case

        @settings(max_examples=self.max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(seed=st.integers(0, 2**16))
        def run(seed: int) -> None:
            impl = self.make_impl()
            impl.allocate(CacheShape(c.layers, c.batch, c.total, c.kv_heads, c.head_dim), torch.float32,
                          torch.device("cpu"))
            gen = torch.Generator().manual_seed(seed)
            for alloc in allocators(impl):
                alloc.reorder_free(torch.randperm(alloc.num_free, generator=gen).tolist())
            self.compare_steps(drive_allocated(impl, inp), want, f"block permutation seed {seed}")
            for alloc in allocators(impl):
                alloc.check()

        run()

    def test_allocator_state_machine(self) -> None:
        probe = self.make_impl()
        drive(probe, make_inputs(CASES["prefill_decode"]))
        found = allocators(probe)
        if not found:
            pytest.skip(f"{self.plugin} has no block allocator")
        machine = allocator_machine(8, found[0].block_size)
        machine.TestCase.settings = settings(
            max_examples=self.max_examples * 5, stateful_step_count=30, deadline=None, database=None,
            derandomize=True, suppress_health_check=list(HealthCheck),
        )
        machine.TestCase().runTest()

    def test_keeps_what_policy_says(self, case_name: str) -> None:
        impl = self.make_impl()
        if not impl.compresses:
            pytest.skip(f"{self.plugin} does not compress")
        inp = make_inputs(type(self).CASES[case_name])
        check_policy(impl, self.reference_keep(impl, inp), inp)

    def test_policy_hypothesis(self) -> None:
        if not self.make_impl().compresses:
            pytest.skip(f"{self.plugin} does not compress")

        @settings(max_examples=self.max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(prompt=st.integers(1, 30), decode=st.integers(0, 12), batch=st.integers(1, 3),
               padded=st.booleans(), seed=st.integers(0, 2**16))
        def run(prompt: int, decode: int, batch: int, padded: bool, seed: int) -> None:
            impl = self.make_impl()
            case = KVCase(layers=1, batch=batch, prompt=prompt, decode=decode, padded=padded, seed=seed)
            inp = make_inputs(case)
            check_policy(impl, self.reference_keep(impl, inp), inp)

        run()
