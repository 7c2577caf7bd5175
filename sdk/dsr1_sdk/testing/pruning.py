"""Pruning conformance: exact sparsity, exact zeros, idempotent masks, model-level pruning.

Capabilities the kit understands:

``unstructured``      the mask keeps the highest ``score`` values (every kept score ≥ every
                      pruned score), so ties aside it equals the reference top-k mask.
``activation_aware``  ``score``/``mask`` use ``activation_norm`` (Wanda); the kit passes one.
``per_row``           every output row loses the same count (±1), and within a row every kept
                      score ≥ every pruned score (Wanda).
``2:4``               every group of 4 consecutive inputs of a row holds ≥ 2 zeros once pruned;
                      ``mask`` refuses (``Dsr1Error``) a weight whose input dim is not a multiple of 4.
``min_sparsity:X``    targets in (0, X) are not asked for (2:4 is at least 50% sparse).
``score:NAME``        what ``score`` computes, from :data:`SCORE_DEFINITIONS` (``magnitude`` = ``|w|``,
                      ``wanda`` = ``|w| · activation_norm``). Undeclared: ``wanda`` for an
                      ``activation_aware`` pruner, else ``magnitude``. A test class may instead set
                      ``reference_score`` (a function ``(weight, act) -> scores`` in float64).
``structured``        ``mask`` prunes whole input columns (tolerance: one column); ``prune_`` on a
                      llama / bert model shrinks it into a consistent smaller model
                      (:func:`~dsr1_sdk.testing.pruning_models.check_structured_model`) instead of
                      zeroing the kit's ``TinyLM``.

Every pruner's ``score`` ranks weights as its definition does (equal up to an increasing
transform, so ``|w|²`` passes for magnitude but a score that ignores ``activation_norm``, or
any other quantity, fails), and its realized sparsity within ±``sparsity_tolerance`` (1%; or one element on
tiny matrices) of the target, masks idempotent (pruning the pruned weight at the same
sparsity gives the same mask), ``prune_`` zeroes exactly the masked weights, leaves kept
weights, embeddings and the ``lm_head`` bit-identical, and a pruned tiny llama and bert
saved with ``save_pretrained`` reload in dsr1 with bit-identical outputs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsr1.errors import Dsr1Error
from dsr1.interfaces import Pruner
from dsr1_sdk.reference.pruning import groups_hold_zeros
from dsr1_sdk.reference.pruning import sparsity as realized
from dsr1_sdk.testing.base import PluginConformance
from dsr1_sdk.testing.pruning_models import Arch, check_saved_stage_reloads, check_structured_model

Distribution = Literal["normal", "uniform", "ties", "with_zeros"]

#: Target sparsities every case is pruned at.
SPARSITIES: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class PruneCase:
    """One weight ``(out_features, in_features)``; ``ties`` draws from 5 values only."""

    rows: int = 64
    cols: int = 64
    distribution: Distribution = "normal"
    seed: int = 0

    def make(self, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and a positive activation norm ``(in_features,)``."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.rows, self.cols)
        if self.distribution == "uniform":
            w = torch.rand(shape, generator=gen) * 2 - 1
        elif self.distribution == "ties":
            w = torch.randint(-2, 3, shape, generator=gen).float()
        elif self.distribution == "with_zeros":
            w = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.6)
        else:
            w = torch.randn(shape, generator=gen)
        act = torch.rand(self.cols, generator=gen) + 0.1
        return w.to(device), act.to(device)


CASES: dict[str, PruneCase] = {
    "square_64": PruneCase(),
    "tall_256x32": PruneCase(rows=256, cols=32, seed=1),
    "wide_16x512": PruneCase(rows=16, cols=512, seed=2),
    "uniform_48x80": PruneCase(rows=48, cols=80, distribution="uniform", seed=3),
    "many_ties": PruneCase(rows=40, cols=50, distribution="ties", seed=4),
    "with_zeros": PruneCase(rows=32, cols=64, distribution="with_zeros", seed=5),
    "tiny_3x5": PruneCase(rows=3, cols=5, seed=6),
    "row_1x1024": PruneCase(rows=1, cols=1024, seed=7),
}


def tolerance(numel: int, base: float = 0.01) -> float:
    """±1%, or one element when a single element is more than 1% of the matrix."""
    return max(base, 1.0 / numel) + 1e-9


def min_sparsity(capabilities: frozenset[str]) -> float:
    """The ``min_sparsity:X`` a pruner declares (0 when none)."""
    return max((float(c.split(":", 1)[1]) for c in capabilities if c.startswith("min_sparsity:")), default=0.0)


def asked(target: float, capabilities: frozenset[str]) -> bool:
    """Whether the kit asks a pruner for ``target`` (0, or at least its minimum sparsity)."""
    return target == 0 or target >= min_sparsity(capabilities) - 1e-9


ScoreFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]

#: What a ``score:NAME`` capability promises ``score(weight, act)`` computes (float64 references).
SCORE_DEFINITIONS: dict[str, ScoreFn] = {
    "magnitude": lambda w, act: w.abs(),
    "wanda": lambda w, act: w.abs() * (act[None, :] if act is not None else 1.0),
}


def declared_score(capabilities: frozenset[str]) -> str:
    """The score definition a pruner declares (``score:NAME``), else the one its capabilities imply."""
    named = sorted(c.split(":", 1)[1] for c in capabilities if c.startswith("score:"))
    if named:
        if named[0] not in SCORE_DEFINITIONS:
            raise AssertionError(f"capability score:{named[0]} names no definition the kit knows "
                                 f"({sorted(SCORE_DEFINITIONS)}); set reference_score on the test class")
        return named[0]
    return "wanda" if "activation_aware" in capabilities else "magnitude"


def check_score_definition(pruner: Pruner, weight: torch.Tensor, act: torch.Tensor | None,
                           reference: ScoreFn, name: str = "reference") -> None:
    """``pruner.score`` orders the weights as ``reference`` does: sorted by the reference, the
    plugin's scores never decrease where the reference clearly increases, and are equal where
    it ties (an increasing transform of the reference passes; another quantity fails)."""
    got = pruner.score(weight, act).detach().to("cpu", torch.float64).reshape(-1)  # (N,)
    want = reference(weight.detach().to("cpu", torch.float64),
                     act.detach().to("cpu", torch.float64) if act is not None else None).reshape(-1)  # (N,)
    assert got.numel() == want.numel(), f"score has {got.numel()} entries, the weight {want.numel()}"
    if got.numel() < 2:
        return
    order = torch.argsort(want, stable=True)
    r, s = want[order], got[order]  # (N,) both, ascending reference
    dr, ds = r[1:] - r[:-1], s[1:] - s[:-1]  # (N-1,)
    s_tol = 1e-6 * float(s.abs().max().clamp_min(1e-30))
    bad = ((dr > 1e-5 * float(r.abs().max().clamp_min(1e-30))) & (ds < -s_tol)) | ((dr == 0) & (ds.abs() > s_tol))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        a, b = int(order[i]), int(order[i + 1])
        cols = weight.shape[-1]
        raise AssertionError(
            f"score ignores its definition ({name}): weights {divmod(a, cols)} and {divmod(b, cols)} have "
            f"{name} scores {float(r[i]):.6g} <= {float(r[i + 1]):.6g} but plugin scores {float(s[i]):.6g}, "
            f"{float(s[i + 1]):.6g} ({int(bad.sum())} of {bad.numel()} neighbouring pairs out of order)"
        )


def check_mask(pruner: Pruner, weight: torch.Tensor, target: float, act: torch.Tensor | None,
               capabilities: frozenset[str], base_tolerance: float = 0.01) -> torch.Tensor:
    """The mask's type, shape, sparsity, score consistency and idempotence; returns it."""
    before = weight.clone()
    keep = pruner.mask(weight, target, act)
    what = f"mask of a {tuple(weight.shape)} weight at sparsity {target}"
    assert torch.equal(before, weight), f"{what}: mask() modified the weight"
    assert isinstance(keep, torch.Tensor) and keep.dtype == torch.bool, f"{what}: not a bool tensor"
    assert keep.shape == weight.shape, f"{what}: shape {tuple(keep.shape)}"
    got = realized(keep)
    structured = "structured" in capabilities
    tol = tolerance(weight.shape[-1] if structured else weight.numel(), base_tolerance)
    assert abs(got - target) <= tol, f"{what}: realized sparsity {got:.4f} not within ±{tol:.4f}"
    if "unstructured" in capabilities and 0 < int((~keep).sum()) < keep.numel():
        score = pruner.score(weight, act)
        assert score.shape == weight.shape, f"score shape {tuple(score.shape)} != weight shape"
        low_kept, high_pruned = score[keep].min().item(), score[~keep].max().item()
        assert low_kept >= high_pruned, f"{what}: kept a score {low_kept} below a pruned score {high_pruned}"
    if "per_row" in capabilities:
        per_row = (~keep).sum(-1)  # (out,) pruned in each row
        assert int(per_row.max() - per_row.min()) <= 1, f"{what}: rows lose different shares ({per_row.tolist()})"
        score = pruner.score(weight, act)
        for r in range(weight.shape[0]):
            row_keep = keep[r]
            if 0 < int((~row_keep).sum()) < row_keep.numel():
                low, high = score[r][row_keep].min().item(), score[r][~row_keep].max().item()
                assert low >= high, f"{what}: row {r} kept a score {low} below a pruned score {high} of the same row"
    if structured:
        assert bool((keep == keep[:1]).all()), f"{what}: structured mask is not whole input columns"
    pruned = weight * keep
    assert bool((pruned[~keep] == 0).all())
    if "2:4" in capabilities and target > 0:
        assert groups_hold_zeros(pruned), f"{what}: a group of 4 inputs holds fewer than 2 zeros"
    again = pruner.mask(pruned, target, act)
    assert torch.equal(again, keep), (
        f"{what}: not idempotent, re-pruning the pruned weight changes {int((again != keep).sum())} entries"
    )
    return keep


class TinyLM(torch.nn.Module):
    """embed → up/down MLP with a residual → proj → lm_head (the head is never pruned)."""

    def __init__(self, vocab: int = 64, dim: int = 16, hidden: int = 48, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = torch.nn.Embedding(vocab, dim)
            self.up = torch.nn.Linear(dim, hidden)
            self.down = torch.nn.Linear(hidden, dim)
            self.proj = torch.nn.Linear(dim, dim, bias=False)
            self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, L, dim)
        h = h + self.down(torch.relu(self.up(h)))  # (B, L, dim)
        logits: torch.Tensor = self.lm_head(self.proj(h))  # (B, L, vocab)
        return logits


def check_prune_model(pruner: Pruner, target: float, device: str = "cpu", base_tolerance: float = 0.01) -> None:
    """``prune_`` zeroes exactly the masked weights of the model's linears, and nothing else."""
    model = TinyLM().to(device)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(s)).to(device) for s in (0, 1)]
    with torch.no_grad():
        masks = pruner.prune_(model, target, calibration)
    assert isinstance(masks, dict), f"prune_ returned {type(masks).__name__}, expected dict[str, Tensor]"
    modules = dict(model.named_modules())
    assert "lm_head" not in masks, "prune_ must skip the lm_head"
    assert torch.equal(model.lm_head.weight, original["lm_head.weight"]), "prune_ changed the lm_head"
    assert torch.equal(model.embed.weight, original["embed.weight"]), "prune_ changed the embedding"
    if target > 0:
        assert masks, "prune_ returned no masks for a positive sparsity"
    zeros = total = 0
    for name, keep in masks.items():
        weight = modules[name].weight  # (out, in)
        before = original[f"{name}.weight"]
        assert keep.dtype == torch.bool and keep.shape == weight.shape, f"mask of {name} has the wrong type/shape"
        assert bool((weight[~keep] == 0).all()), f"{name}: pruned weights are not exactly zero"
        assert torch.equal(weight[keep], before[keep]), f"{name}: prune_ changed weights it kept"
        zeros += int((~keep).sum())
        total += keep.numel()
    if total:
        got = zeros / total
        tol = tolerance(total, base_tolerance)
        assert abs(got - target) <= tol, f"prune_: realized sparsity {got:.4f} over pruned layers, target {target}"
    if target == 0:
        for key, value in model.state_dict().items():
            assert torch.equal(value, original[key]), f"sparsity 0 changed {key}"


class PruningConformance(PluginConformance):
    """Conformance kit of the ``pruning`` family. Subclass it and set ``plugin``."""

    family: ClassVar[str] = "pruning"
    CASES: ClassVar[dict[str, PruneCase]] = CASES
    sparsities: ClassVar[tuple[float, ...]] = SPARSITIES
    sparsity_tolerance: ClassVar[float] = 0.01
    #: ``(weight, act) -> scores`` (float64) that ``score`` must rank like; ``None``: from ``score:`` capabilities.
    reference_score: ClassVar[ScoreFn | None] = None

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize ``case_name`` over ``CASES``, ``target`` over the ``sparsities`` the plugin
        accepts (``min_sparsity:``) and ``arch`` over the tiny models (llama, bert)."""
        if "case_name" in metafunc.fixturenames:
            metafunc.parametrize("case_name", list(type(self).CASES))
        if "target" in metafunc.fixturenames:
            try:
                caps = self.capabilities()
            except Exception:  # noqa: BLE001 - a broken plugin fails in the packaging tests, with its reason
                caps = frozenset()
            metafunc.parametrize("target", [t for t in type(self).sparsities if asked(t, caps)])
        if "arch" in metafunc.fixturenames:
            metafunc.parametrize("arch", ["llama", "bert"])

    def runnable_impl(self) -> Pruner:
        impl: Pruner = self.make_impl()
        self.skip_unless_runs_here(impl)
        return impl

    def activation(self, act: torch.Tensor) -> torch.Tensor | None:
        return act if "activation_aware" in self.capabilities() else None

    def test_case(self, case_name: str) -> None:
        impl = self.runnable_impl()
        caps = self.capabilities()
        weight, act = type(self).CASES[case_name].make(self.target_device())
        if "2:4" in caps and weight.shape[-1] % 4:
            with pytest.raises(Dsr1Error):
                impl.mask(weight, 0.5, self.activation(act))
            return
        for target in type(self).sparsities:
            if asked(target, caps):
                check_mask(impl, weight, target, self.activation(act), caps, self.sparsity_tolerance)

    def score_reference(self) -> tuple[str, ScoreFn]:
        """The definition ``score`` is checked against, and its name."""
        # read from the class dicts: a plain function set as a class attribute must not bind as a method
        own = next((c.__dict__["reference_score"] for c in type(self).__mro__ if c.__dict__.get("reference_score")),
                   None)
        if own is not None:
            return f"{type(self).__name__}.reference_score", getattr(own, "__func__", own)
        name = declared_score(self.capabilities())
        return f"score:{name}", SCORE_DEFINITIONS[name]

    def test_score_follows_its_definition(self, case_name: str) -> None:
        impl = self.runnable_impl()
        name, reference = self.score_reference()
        weight, act = type(self).CASES[case_name].make(self.target_device())
        check_score_definition(impl, weight, self.activation(act), reference, name)

    def test_prune_model(self, target: float, tmp_path: Path) -> None:
        impl = self.runnable_impl()
        if "structured" in self.capabilities():
            archs: tuple[Arch, ...] = ("llama", "bert")
            for arch in archs:
                check_structured_model(impl, target, tmp_path / arch, arch)
        else:
            check_prune_model(impl, target, self.target_device(), self.sparsity_tolerance)

    def test_saved_stage_reloads(self, arch: Arch, tmp_path: Path) -> None:
        """A pruned tiny llama / bert saved with ``save_pretrained`` reloads with identical outputs."""
        target = max(0.5, min_sparsity(self.capabilities()))
        check_saved_stage_reloads(self.runnable_impl(), target, tmp_path, arch)

    def test_hypothesis_shapes_and_sparsities(self) -> None:
        impl = self.runnable_impl()
        caps = self.capabilities()
        device = self.target_device()
        use_act = "activation_aware" in caps
        low = min_sparsity(caps)
        group = 4 if "2:4" in caps else 1  # 2:4 needs input dims that are multiples of 4

        @settings(max_examples=self.max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(
            rows=st.integers(1, 40), cols=st.integers(1, 80 // group), target=st.floats(low, 0.95) | st.just(0.0),
            dist=st.sampled_from(["normal", "uniform", "ties", "with_zeros"]), seed=st.integers(0, 2**16),
        )
        def run(rows: int, cols: int, target: float, dist: Any, seed: int) -> None:
            weight, act = PruneCase(rows, cols * group, dist, seed).make(device)
            check_mask(impl, weight, target, act if use_act else None, caps, self.sparsity_tolerance)

        run()
