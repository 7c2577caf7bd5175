"""Attention conformance: parity with the reference on named cases and hypothesis shapes.

Capabilities the kit understands (declare them in ``PluginSpec.capabilities``):

``gqa``   accepts ``Hkv < H`` (grouped-query / multi-query attention).
``mask``  honours boolean ``(B, 1, T, S)`` masks (padding, arbitrary, sliding windows).
``padding_mask``  honours boolean masks that are causal ∧ key padding only (implied by
          ``mask``): the padding cases run, arbitrary and sliding masks are skipped.
``fp16``, ``bf16``  runs in that dtype (fp32 is always checked).
``recurrent``  decodes from a fixed-size state (``state_shapes``/``forward_recurrent``):
          the kit checks that running a sequence through ``forward_recurrent`` in chunks or
          one token at a time equals ``forward`` on the whole sequence, that the state's
          shapes stay fixed, and that padded keys leave the state unchanged.

Every plugin is also checked for cache vs no-cache equality: a prefill and then decode
steps against growing keys/values give the rows of one full forward.

A case that needs an undeclared capability is skipped and says so; a declared one that
fails is a failure. Rows of the output whose query sees no key are not compared.
Override :meth:`AttentionConformance.reference` to check against another oracle (e.g. a
linear-attention plugin against an exact linear-attention reference).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsr1_sdk.reference.attention as ref
from dsr1.interfaces import AttentionMechanism
from dsr1_sdk.testing.base import PluginConformance, declared_devices
from dsr1_sdk.testing.tolerances import ATTENTION_TOLERANCES, DTYPES, close_problem

MaskKind = Literal["none", "padding", "random", "sliding", "bidirectional"]
Reference = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionCase:
    """One attention call: shapes, dtype, mask kind, scale, memory layout, seed."""

    batch: int = 2
    heads: int = 4
    kv_heads: int = 4
    q_len: int = 16
    kv_len: int = 16
    head_dim: int = 32
    dtype: str = "fp32"
    mask: MaskKind = "none"
    scale: float | None = None
    contiguous: bool = True
    window: int = 4
    seed: int = 0

    def requires(self) -> frozenset[str]:
        """Capabilities a plugin must declare for this case to apply."""
        caps = set()
        if self.kv_heads < self.heads:
            caps.add("gqa")
        if self.mask == "padding":
            caps.add("padding_mask")
        elif self.mask != "none":
            caps.add("mask")
        if self.dtype != "fp32":
            caps.add(self.dtype)
        return frozenset(caps)

    def make_mask(self, gen: torch.Generator) -> torch.Tensor | None:
        """Boolean ``(B, 1, T, S)`` keep-mask (``None`` for plain causal)."""
        b, t, s = self.batch, self.q_len, self.kv_len
        if self.mask == "none":
            return None
        causal = ref.causal_mask(t, s).expand(b, 1, t, s)  # (B, 1, T, S)
        if self.mask == "sliding":
            i = torch.arange(t).unsqueeze(1) + (s - t)  # (T, 1) absolute query positions
            j = torch.arange(s).unsqueeze(0)  # (1, S)
            return (causal & (j > i - self.window)).contiguous()
        if self.mask == "random":
            keep = torch.rand(b, 1, t, s, generator=gen) < 0.6  # (B, 1, T, S)
            col = torch.randint(0, s, (b, 1, t, 1), generator=gen)
            return keep.scatter(-1, col, True)  # every row sees at least one key
        # left padding: sequence b starts at key pad[b]; pad[0] = 0 keeps one full row
        pad = torch.randint(0, max(s - 1, 1), (b,), generator=gen)
        pad[0] = 0
        valid = torch.arange(s).unsqueeze(0) >= pad.unsqueeze(1)  # (B, S)
        valid = valid[:, None, None, :]  # (B, 1, 1, S)
        if self.mask == "bidirectional":
            return valid.expand(b, 1, t, s).contiguous()
        return (causal & valid).contiguous()

    def make(self, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs ``q (B, H, T, D)``, ``k, v (B, Hkv, S, D)`` and the mask, on ``device``."""
        gen = torch.Generator().manual_seed(self.seed)
        dtype = DTYPES[self.dtype]
        b, h, hkv, t, s, d = self.batch, self.heads, self.kv_heads, self.q_len, self.kv_len, self.head_dim

        def rand(heads: int, length: int) -> torch.Tensor:
            if self.contiguous:
                return torch.randn(b, heads, length, d, generator=gen)  # (B, heads, L, D)
            return torch.randn(b, length, heads, d, generator=gen).transpose(1, 2)  # strided (B, heads, L, D)

        q, k, v = rand(h, t), rand(hkv, s), rand(hkv, s)
        mask = self.make_mask(gen)
        q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
        return q, k, v, (mask.to(device) if mask is not None else None)


#: The named case table (parametrized by name). Extend it in a subclass: ``CASES = {**CASES, ...}``.
CASES: dict[str, AttentionCase] = {
    "prefill_mha": AttentionCase(),
    "prefill_batch1_odd_len": AttentionCase(batch=1, q_len=7, kv_len=7),
    "decode_mha": AttentionCase(q_len=1, kv_len=19),
    "chunked_prefill": AttentionCase(q_len=5, kv_len=21),
    "single_token": AttentionCase(q_len=1, kv_len=1),
    "prefill_gqa_2to1": AttentionCase(heads=4, kv_heads=2),
    "decode_gqa_4to1": AttentionCase(heads=8, kv_heads=2, q_len=1, kv_len=23),
    "mqa": AttentionCase(heads=4, kv_heads=1, q_len=9, kv_len=9),
    "head_dim_64": AttentionCase(heads=2, kv_heads=2, head_dim=64),
    "head_dim_80": AttentionCase(heads=2, kv_heads=2, head_dim=80),
    "head_dim_128": AttentionCase(heads=2, kv_heads=2, head_dim=128),
    "custom_scale": AttentionCase(scale=0.3),
    "non_contiguous": AttentionCase(contiguous=False, q_len=6, kv_len=10),
    "long_prefill_256": AttentionCase(batch=1, heads=2, kv_heads=2, q_len=256, kv_len=256, head_dim=64),
    "padded_batch": AttentionCase(batch=3, q_len=8, kv_len=8, mask="padding"),
    "padded_decode": AttentionCase(batch=3, q_len=1, kv_len=12, mask="padding"),
    "padded_gqa": AttentionCase(batch=3, heads=6, kv_heads=2, q_len=10, kv_len=10, mask="padding"),
    "random_mask": AttentionCase(mask="random"),
    "sliding_window_mask": AttentionCase(q_len=12, kv_len=12, mask="sliding"),
    "bidirectional_padded": AttentionCase(mask="bidirectional"),
    "prefill_fp16": AttentionCase(dtype="fp16"),
    "prefill_bf16": AttentionCase(dtype="bf16"),
    "decode_gqa_bf16": AttentionCase(heads=8, kv_heads=2, q_len=1, kv_len=23, dtype="bf16"),
    "padded_batch_bf16": AttentionCase(batch=3, q_len=8, kv_len=8, mask="padding", dtype="bf16"),
}


def effective_capabilities(capabilities: frozenset[str]) -> frozenset[str]:
    """Declared capabilities plus those they imply (``mask`` implies ``padding_mask``)."""
    return capabilities | {"padding_mask"} if "mask" in capabilities else capabilities


def missing_capabilities(case: AttentionCase, capabilities: frozenset[str]) -> frozenset[str]:
    return case.requires() - effective_capabilities(capabilities)


def check_attention_case(
    impl: AttentionMechanism,
    case: AttentionCase,
    device: str = "cpu",
    reference: Reference = ref.softmax_attention,
    tolerances: dict[str, tuple[float, float]] = ATTENTION_TOLERANCES,
) -> None:
    """Run ``impl`` on ``case`` and compare with ``reference``; raises AssertionError naming the problem."""
    q, k, v, mask = case.make(device)
    originals = [x.clone() for x in (q, k, v)]
    if mask is None and case.scale is None:
        out = impl(q, k, v)  # the seed's plugin shape: forward(query, key, value)
    else:
        out = impl(q, k, v, mask=mask, scale=case.scale)
    where = f"case {case}"
    assert isinstance(out, torch.Tensor), f"{where}: returned {type(out).__name__}, not a Tensor"
    expected_shape = (case.batch, case.heads, case.q_len, case.head_dim)
    assert tuple(out.shape) == expected_shape, f"{where}: output shape {tuple(out.shape)} != {expected_shape}"
    assert out.dtype == q.dtype, f"{where}: output dtype {out.dtype} != query dtype {q.dtype}"
    assert out.device.type == q.device.type, f"{where}: output on {out.device}, inputs on {q.device}"
    for name, before, after in zip(("query", "key", "value"), originals, (q, k, v), strict=True):
        assert torch.equal(before, after), f"{where}: forward modified its {name} input in place"
    expected = reference(q, k, v, mask=mask, scale=case.scale)  # (B, H, T, D)
    rows = ref.attended_rows(mask.cpu() if mask is not None else None, case.batch, case.q_len, case.kv_len)
    rows = rows.expand(case.batch, case.heads, case.q_len, case.head_dim)  # (B, H, T, D)
    atol, rtol = tolerances[case.dtype]
    problem = close_problem(out.cpu()[rows], expected.cpu()[rows], atol, rtol, where)
    assert problem is None, problem


def check_batch_invariance(
    impl: AttentionMechanism,
    case: AttentionCase,
    device: str = "cpu",
    tolerances: dict[str, tuple[float, float]] = ATTENTION_TOLERANCES,
) -> None:
    """Each batch row computed alone equals the same row computed in the batch."""
    q, k, v, mask = case.make(device)
    whole = impl(q, k, v, mask=mask, scale=case.scale)  # (B, H, T, D)
    rows = ref.attended_rows(mask.cpu() if mask is not None else None, case.batch, case.q_len, case.kv_len)
    atol, rtol = tolerances[case.dtype]
    for b in range(case.batch):
        sub_mask = mask[b : b + 1] if mask is not None else None
        alone = impl(q[b : b + 1], k[b : b + 1], v[b : b + 1], mask=sub_mask, scale=case.scale)  # (1, H, T, D)
        keep = rows[b : b + 1].expand(1, case.heads, case.q_len, case.head_dim)
        problem = close_problem(alone.cpu()[keep], whole[b : b + 1].cpu()[keep], atol, rtol, f"batch row {b} alone")
        assert problem is None, problem


#: Sequences fed in steps (cache vs no-cache, recurrent): ``q_len == kv_len`` is the whole sequence.
STEP_CASES: dict[str, AttentionCase] = {
    "mha": AttentionCase(q_len=13, kv_len=13),
    "gqa_4to1": AttentionCase(heads=8, kv_heads=2, q_len=11, kv_len=11),
    "mqa": AttentionCase(heads=4, kv_heads=1, q_len=9, kv_len=9),
    "padded_batch": AttentionCase(batch=3, q_len=10, kv_len=10, mask="padding"),
    "padded_gqa": AttentionCase(batch=3, heads=6, kv_heads=2, q_len=10, kv_len=10, mask="padding"),
    "head_dim_128": AttentionCase(batch=1, heads=2, kv_heads=2, q_len=9, kv_len=9, head_dim=128),
    "long_300": AttentionCase(batch=1, heads=2, kv_heads=1, q_len=300, kv_len=300, head_dim=16),
    "bf16": AttentionCase(q_len=9, kv_len=9, dtype="bf16"),
}


def split_lengths(kind: str, n: int) -> list[int]:
    """Step lengths that cut a sequence of ``n`` tokens: ``token_by_token``, ``prefill_then_decode``
    (most of it at once, then 4 single tokens), ``uneven_chunks`` (3, 1, 5, 2, 3, 1, ...)."""
    if kind == "token_by_token":
        return [1] * n
    if kind == "prefill_then_decode":
        decode = min(4, n - 1)
        return [n - decode] + [1] * decode
    lengths: list[int] = []
    i = 0
    while sum(lengths) < n:
        lengths.append(min((3, 1, 5, 2)[i % 4], n - sum(lengths)))
        i += 1
    return lengths


SPLITS: tuple[str, ...] = ("token_by_token", "prefill_then_decode", "uneven_chunks")


def _compare_rows(
    got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor | None, case: AttentionCase,
    tolerances: dict[str, tuple[float, float]], what: str,
) -> None:
    rows = ref.attended_rows(mask.cpu() if mask is not None else None, case.batch, case.q_len, case.kv_len)
    rows = rows.expand(case.batch, case.heads, case.q_len, case.head_dim)  # (B, H, T, D)
    atol, rtol = tolerances[case.dtype]
    problem = close_problem(got.cpu()[rows], want.cpu()[rows], atol, rtol, what)
    assert problem is None, problem


def check_cache_vs_full(
    impl: AttentionMechanism,
    case: AttentionCase,
    split: str,
    device: str = "cpu",
    tolerances: dict[str, tuple[float, float]] = ATTENTION_TOLERANCES,
) -> None:
    """A prefill then steps against the growing keys/values (what a KV cache hands attention)
    give the rows of one forward over the whole sequence."""
    q, k, v, mask = case.make(device)
    full = impl(q, k, v, mask=mask, scale=case.scale)  # (B, H, T, D)
    pieces: list[torch.Tensor] = []
    start = 0
    for n in split_lengths(split, case.q_len):
        end = start + n
        step_mask = mask[:, :, start:end, :end] if mask is not None else None  # (B, 1, n, end)
        pieces.append(impl(q[:, :, start:end], k[:, :, :end], v[:, :, :end], mask=step_mask, scale=case.scale))
        start = end
    stepped = torch.cat(pieces, dim=2)  # (B, H, T, D)
    _compare_rows(stepped, full, mask, case, tolerances, f"{split} with a growing cache vs one forward, case {case}")


def _recurrent_inputs(
    impl: AttentionMechanism, case: AttentionCase, device: str, gqa: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, tuple[int, ...]]]:
    """Inputs as the engine passes them (K/V heads repeated without ``gqa``) and the state shapes."""
    q, k, v, mask = case.make(device)
    if not gqa and case.kv_heads < case.heads:
        k = ref.repeat_kv(k, case.heads // case.kv_heads)  # (B, H, S, D)
        v = ref.repeat_kv(v, case.heads // case.kv_heads)
    shapes = impl.state_shapes(case.batch, case.heads, k.shape[1], case.head_dim)
    return q, k, v, mask, shapes


def check_recurrent(
    impl: AttentionMechanism,
    case: AttentionCase,
    split: str,
    gqa: bool,
    device: str = "cpu",
    tolerances: dict[str, tuple[float, float]] = ATTENTION_TOLERANCES,
) -> None:
    """``forward_recurrent`` over the sequence in steps equals ``forward`` on the whole of it; the
    state keeps its tensors and shapes (folded in place)."""
    q, k, v, mask, shapes = _recurrent_inputs(impl, case, device, gqa)
    full = impl(q, k, v, mask=mask, scale=case.scale)  # (B, H, T, D)
    state = {name: torch.zeros(shape, dtype=torch.float32, device=device) for name, shape in shapes.items()}
    tensors = dict(state)
    valid = mask.expand(case.batch, 1, case.q_len, case.kv_len)[:, 0, -1] if mask is not None else None  # (B, S)
    pieces: list[torch.Tensor] = []
    start = 0
    for n in split_lengths(split, case.q_len):
        end = start + n
        out = impl.forward_recurrent(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], state,
            key_valid=valid[:, start:end] if valid is not None else None, scale=case.scale,
        )  # (B, H, n, D)
        assert tuple(out.shape) == (case.batch, case.heads, n, case.head_dim) and out.dtype == q.dtype, (
            f"forward_recurrent returned {tuple(out.shape)} {out.dtype} for {n} new tokens"
        )
        for name, shape in shapes.items():
            assert state[name] is tensors[name] and tuple(state[name].shape) == tuple(shape), (
                f"state {name!r} must be updated in place with fixed shape {shape}, got {tuple(state[name].shape)}"
            )
        assert set(state) == set(shapes), f"state keys {sorted(state)} != state_shapes keys {sorted(shapes)}"
        pieces.append(out)
        start = end
    stepped = torch.cat(pieces, dim=2)  # (B, H, T, D)
    _compare_rows(stepped, full, mask, case, tolerances, f"forward_recurrent {split} vs forward, case {case}")


def check_padding_leaves_state(impl: AttentionMechanism, case: AttentionCase, gqa: bool, device: str = "cpu") -> None:
    """Padded keys (``key_valid`` False) leave the state exactly as it was."""
    q, k, v, _, shapes = _recurrent_inputs(impl, case, device, gqa)
    state = {name: torch.zeros(shape, dtype=torch.float32, device=device) for name, shape in shapes.items()}
    half = case.q_len // 2
    impl.forward_recurrent(q[:, :, :half], k[:, :, :half], v[:, :, :half], state, scale=case.scale)
    before = {name: t.clone() for name, t in state.items()}
    none_valid = torch.zeros(case.batch, case.q_len - half, dtype=torch.bool, device=device)  # (B, n)
    out = impl.forward_recurrent(q[:, :, half:], k[:, :, half:], v[:, :, half:], state, key_valid=none_valid,
                                 scale=case.scale)
    assert torch.isfinite(out.float()).all(), "padded steps gave non-finite outputs"
    for name, t in state.items():
        assert torch.equal(t, before[name]), f"padded keys changed state {name!r}"


@st.composite
def attention_cases(draw: Any, capabilities: frozenset[str]) -> AttentionCase:
    """Hypothesis strategy: small cases that only use declared capabilities."""
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3)) if "gqa" in capabilities else 1
    q_len = draw(st.integers(1, 9))
    kv_len = q_len + draw(st.integers(0, 8))
    masks: list[MaskKind] = ["none"]
    if "mask" in capabilities:
        masks = ["none", "padding", "random", "sliding"]
    elif "padding_mask" in capabilities:
        masks = ["none", "padding"]
    dtypes = ["fp32"] + [d for d in ("fp16", "bf16") if d in capabilities]
    return AttentionCase(
        batch=draw(st.integers(1, 3)),
        heads=kv_heads * group,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=draw(st.sampled_from([8, 16, 32, 64, 80])),
        dtype=draw(st.sampled_from(dtypes)),
        mask=draw(st.sampled_from(masks)),
        scale=draw(st.none() | st.floats(0.05, 1.0)),
        contiguous=draw(st.booleans()),
        window=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 2**16)),
    )


class AttentionConformance(PluginConformance):
    """Conformance kit of the ``attention`` family. Subclass it and set ``plugin``."""

    family: ClassVar[str] = "attention"
    CASES: ClassVar[dict[str, AttentionCase]] = CASES
    STEP_CASES: ClassVar[dict[str, AttentionCase]] = STEP_CASES
    tolerances: ClassVar[dict[str, tuple[float, float]]] = ATTENTION_TOLERANCES

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize ``case_name`` over this class's ``CASES`` table."""
        if "case_name" in metafunc.fixturenames:
            metafunc.parametrize("case_name", list(type(self).CASES))
        if "step_case" in metafunc.fixturenames:
            metafunc.parametrize("step_case", list(type(self).STEP_CASES))
        if "split" in metafunc.fixturenames:
            metafunc.parametrize("split", SPLITS)

    def reference(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        mask: torch.Tensor | None = None, scale: float | None = None,
    ) -> torch.Tensor:
        """The oracle (float64 softmax attention); override for other attention kinds."""
        return ref.softmax_attention(query, key, value, mask=mask, scale=scale)

    def unsupported(self, case: AttentionCase) -> str | None:
        """Why this configuration need not run ``case`` (``None``: it must pass it).

        Default: the capabilities the case needs and the plugin does not declare. Override
        it to narrow one configuration (a kernel pinned to flash has no chunked prefill).
        """
        caps = self.capabilities()
        missing = missing_capabilities(case, caps)
        if not missing:
            return None
        if "mask" in missing and "padding_mask" in caps:
            return (f"{self.plugin} supports causal and key-padding masks only (declares 'padding_mask', not 'mask'); "
                    f"this case has a {case.mask!r} mask")
        return f"{self.plugin} does not declare {sorted(missing)}"

    def _prepared(self, case: AttentionCase) -> AttentionMechanism:
        reason = self.unsupported(case)
        if reason:
            pytest.skip(reason)
        impl: AttentionMechanism = self.make_impl()
        self.skip_unless_runs_here(impl, DTYPES[case.dtype])
        return impl

    def test_case(self, case_name: str) -> None:
        case = type(self).CASES[case_name]
        impl = self._prepared(case)
        check_attention_case(impl, case, self.target_device(), self.reference, self.tolerances)

    def test_batch_invariance(self) -> None:
        case = CASES["padded_batch"]
        if "padding_mask" not in effective_capabilities(self.capabilities()):
            case = replace(case, mask="none")
        impl = self._prepared(case)
        check_batch_invariance(impl, case, self.target_device(), self.tolerances)

    def test_cache_vs_no_cache(self, step_case: str, split: str) -> None:
        case = type(self).STEP_CASES[step_case]
        start = 0
        for n in split_lengths(split, case.q_len):  # every call shape the split makes must be supported
            start += n
            reason = self.unsupported(replace(case, q_len=n, kv_len=start))
            if reason:
                pytest.skip(f"{split}: {reason}")
        impl = self._prepared(case)
        check_cache_vs_full(impl, case, split, self.target_device(), self.tolerances)

    def _recurrent(self, case: AttentionCase) -> AttentionMechanism:
        if "recurrent" not in self.capabilities():
            pytest.skip(f"{self.plugin} does not declare ['recurrent']")
        return self._prepared(case)

    def test_recurrent_matches_forward(self, step_case: str, split: str) -> None:
        case = type(self).STEP_CASES[step_case]
        impl = self._recurrent(case)
        gqa = "gqa" in self.capabilities()
        check_recurrent(impl, case, split, gqa, self.target_device(), self.tolerances)

    def test_hypothesis_recurrent(self) -> None:
        """``forward_recurrent`` stepped through hypothesis-drawn sequences equals ``forward``."""
        caps = self.capabilities()
        if "recurrent" not in caps:
            pytest.skip(f"{self.plugin} does not declare ['recurrent']")
        impl = self.make_impl()
        device = self.target_device()

        @settings(max_examples=self.max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=attention_cases(effective_capabilities(caps)), split=st.sampled_from(SPLITS))
        def run(case: AttentionCase, split: str) -> None:
            case = replace(case, kv_len=case.q_len)  # a sequence attending itself, stepped through the state
            if self.unsupported(case) or impl.validate(device, DTYPES[case.dtype]):
                return
            check_recurrent(impl, case, split, "gqa" in caps, device, self.tolerances)

        run()

    def test_recurrent_padding_leaves_state(self) -> None:
        case = STEP_CASES["gqa_4to1"]
        impl = self._recurrent(case)
        check_padding_leaves_state(impl, case, "gqa" in self.capabilities(), self.target_device())

    def test_runs_on_kit_device(self) -> None:
        devices = declared_devices(self.capabilities())
        if devices is not None and self.target_device() not in devices:
            pytest.skip(f"{self.plugin} declares devices {sorted(devices)}")
        reasons = self.make_impl().validate(self.target_device())  # any dtype: dtypes are refused per case
        assert reasons == [], f"declares it runs on {self.target_device()} but validate refuses: {reasons}"

    def test_hypothesis_shapes(self) -> None:
        impl = self.make_impl()
        caps = self.capabilities()
        device = self.target_device()

        @settings(max_examples=self.max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=attention_cases(effective_capabilities(caps)))
        def run(case: AttentionCase) -> None:
            if self.unsupported(case) or impl.validate(device, DTYPES[case.dtype]):
                return  # refused with a reason (test_case reports those as skips)
            check_attention_case(impl, case, device, self.reference, self.tolerances)

        run()
