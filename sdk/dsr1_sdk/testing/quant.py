"""Quant conformance: round-trip error bounds, SQNR on named cases, whole-model behaviour.

What a quant plugin declares, and the kit holds it to:

* ``sqnr_threshold`` (class attribute, dB): ``quantize_tensor`` reaches it on every case
  of the named table.
* ``error_bound(weight)`` (optional method): the largest ``|quantize_tensor(w) - w|`` per
  element; checked on hypothesis-generated shapes and value ranges (never all-zero).
  A plugin that declares no bound gets that check skipped, with the reason.
* ``device:<type>`` capabilities: the devices it runs on; ``validate`` refuses the others.
* ``save`` capability: ``model.save_pretrained`` of a quantized model writes a safetensors-only
  Hugging Face-format dir whose ``config.json`` names the policy, and loading it back gives
  identical logits (checked on a tiny random Llama, :func:`tiny_llama_checkpoint`).
"""
from __future__ import annotations

import copy
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsr1.interfaces import QuantPolicy
from dsr1_sdk.reference.quant import sqnr
from dsr1_sdk.testing.base import PluginConformance

Distribution = Literal["normal", "uniform", "heavy_tailed", "sparse"]


@dataclass(frozen=True)
class QuantCase:
    """One weight matrix ``(out_features, in_features)``: distribution, scale, seed."""

    rows: int = 64
    cols: int = 128
    distribution: Distribution = "normal"
    scale: float = 1.0
    seed: int = 0

    def make(self, device: str = "cpu") -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.rows, self.cols)
        if self.distribution == "uniform":
            w = torch.rand(shape, generator=gen) * 2 - 1
        elif self.distribution == "heavy_tailed":  # Student-t, 5 degrees of freedom
            z = torch.randn(shape, generator=gen)
            chi2 = torch.randn((5, *shape), generator=gen).pow(2).sum(0)
            w = z / (chi2 / 5).sqrt()
        elif self.distribution == "sparse":  # 70% exact zeros, never an all-zero matrix
            w = torch.randn(shape, generator=gen) * (torch.rand(shape, generator=gen) < 0.3)
            w[0, 0] = 1.0
        else:
            w = torch.randn(shape, generator=gen)
        return (w * self.scale).to(device)  # (rows, cols) float32


#: The named reference cases (parametrized by name); SQNR ≥ ``sqnr_threshold`` on each.
CASES: dict[str, QuantCase] = {
    "normal_64x128": QuantCase(),
    "normal_wide_scale": QuantCase(scale=10.0, seed=1),
    "normal_small_values": QuantCase(scale=1e-3, seed=2),
    "uniform": QuantCase(distribution="uniform", seed=3),
    "heavy_tailed": QuantCase(distribution="heavy_tailed", seed=4),
    "sparse_70pct_zero": QuantCase(distribution="sparse", seed=5),
    "tall_256x16": QuantCase(rows=256, cols=16, seed=6),
    "wide_8x512": QuantCase(rows=8, cols=512, seed=7),
    "llm_like_128x256": QuantCase(rows=128, cols=256, scale=0.02, seed=8),
}


def declared_bound(policy: QuantPolicy, weight: torch.Tensor) -> torch.Tensor | None:
    """The plugin's elementwise error bound for ``weight`` (``None``: it declares none).

    ``QuantPolicy.error_bound`` (core ≥ 0.1 with the method; looked up defensively so the
    kit also runs against a core without it)."""
    fn = getattr(policy, "error_bound", None)
    return fn(weight) if callable(fn) else None


def check_round_trip(policy: QuantPolicy, weight: torch.Tensor) -> None:
    """Shape, dtype and device kept; input untouched; error within the declared bound."""
    before = weight.clone()
    out = policy.quantize_tensor(weight)
    assert torch.equal(before, weight), "quantize_tensor modified its input in place"
    assert isinstance(out, torch.Tensor) and out.shape == weight.shape, "quantize_tensor changed the shape"
    assert out.dtype == weight.dtype, f"quantize_tensor returned {out.dtype} for a {weight.dtype} input"
    assert out.device == weight.device, "quantize_tensor moved the tensor"
    bound = declared_bound(policy, weight)
    if bound is None:
        return
    err = (out.double() - weight.double()).abs()
    over = err > bound.to(err.device, torch.float64)
    assert not bool(over.any()), (
        f"{int(over.sum())} of {err.numel()} elements exceed the declared error bound; worst excess "
        f"{(err - bound.to(err.device, torch.float64)).max().item():.3g} for a weight of shape {tuple(weight.shape)}"
    )


def check_sqnr(policy: QuantPolicy, weight: torch.Tensor, what: str) -> float:
    """SQNR of the round trip is at least the plugin's ``sqnr_threshold``."""
    value = sqnr(weight, policy.quantize_tensor(weight))
    assert value >= policy.sqnr_threshold, (
        f"{what}: SQNR {value:.1f} dB < declared sqnr_threshold {policy.sqnr_threshold} dB"
    )
    return value


class TinyMLP(torch.nn.Sequential):
    """Linear(32→64) → ReLU → Linear(64→64) → ReLU → Linear(64→16), seeded."""

    def __init__(self, seed: int = 0) -> None:
        with torch.random.fork_rng(devices=[]):  # leave the global RNG alone
            torch.manual_seed(seed)
            super().__init__(
                torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                torch.nn.Linear(64, 16),
            )


def check_quantize_model(policy: QuantPolicy, device: str = "cpu", margin_db: float = 10.0) -> None:
    """``quantize_`` on a tiny MLP keeps outputs within ``sqnr_threshold - margin_db`` (capped at 100 dB)."""
    model = TinyMLP().to(device).eval()
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(1)).to(device)  # (B, in)
    with torch.no_grad():
        expected = model(x)  # (B, out) float32
        quantized = policy.quantize_(copy.deepcopy(model))
        assert isinstance(quantized, torch.nn.Module), "quantize_ must return the model"
        dtype = policy.compute_dtype()
        got = quantized(x.to(dtype) if dtype is not None else x)
    floor = min(policy.sqnr_threshold, 100.0) - margin_db
    value = sqnr(expected, got)
    assert value >= floor, f"outputs of the quantized model: SQNR {value:.1f} dB < {floor:.1f} dB"


def check_state_dict_round_trip(policy: QuantPolicy, device: str = "cpu") -> None:
    """A quantized model saved and loaded into a freshly quantized copy gives identical outputs."""
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        first = policy.quantize_(TinyMLP(seed=0).to(device).eval())
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        second = policy.quantize_(TinyMLP(seed=1).to(device).eval())
        second.load_state_dict(torch.load(buffer, weights_only=False))
        dtype = policy.compute_dtype()
        xx = x.to(dtype) if dtype is not None else x
        assert torch.equal(first(xx), second(xx)), "outputs differ after a state_dict save/load round trip"


def tiny_llama_checkpoint(directory: Path, seed: int = 0, **config: Any) -> Path:
    """A random transformers ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 KV heads, FFN 128,
    vocab 128) saved as safetensors into ``directory``; ``config`` overrides ``LlamaConfig`` fields."""
    import transformers

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**shape, **config}))
    model.save_pretrained(directory)
    return directory


def check_pretrained_round_trip(plugin: str, options: dict[str, Any], model_dir: Path, out_dir: Path,
                                device: str = "cpu") -> None:
    """quantize at load → ``save_pretrained`` → load the dir with no quant setting: identical logits."""
    from dsr1.auto import AutoModel

    first = AutoModel.from_pretrained(model_dir, quant={"name": plugin, "options": options}, device=device)
    ids = torch.randint(0, int(first.config["vocab_size"]), (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = first(ids).logits  # (B, T, V)
    first.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    qc = config.get("quantization_config") or {}
    assert qc.get("policy") == plugin, f"config.json of the saved dir does not name the policy: {qc!r}"
    pickles = [p.name for p in out_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert not pickles, f"the saved dir holds pickle files: {pickles}"
    second = AutoModel.from_pretrained(out_dir, device=device)
    with torch.no_grad():
        got = second(ids).logits
    assert torch.equal(expected, got), "logits differ after save_pretrained and loading the dir back"


@st.composite
def weights(draw: Any) -> tuple[tuple[int, int], float, str, int]:
    """Shape, value scale (1e-3 … 1e3), distribution and seed of a never-all-zero weight."""
    shape = (draw(st.integers(1, 48)), draw(st.integers(1, 96)))
    scale = 10 ** draw(st.floats(-3.0, 3.0))
    return shape, scale, draw(st.sampled_from(["normal", "uniform", "heavy_tailed", "sparse"])), draw(
        st.integers(0, 2**16)
    )


class QuantConformance(PluginConformance):
    """Conformance kit of the ``quant`` family. Subclass it and set ``plugin``."""

    family: ClassVar[str] = "quant"
    CASES: ClassVar[dict[str, QuantCase]] = CASES
    #: dB the whole-model output SQNR may fall below the per-tensor threshold.
    model_sqnr_margin_db: ClassVar[float] = 10.0

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize ``case_name`` over this class's ``CASES`` table."""
        if "case_name" in metafunc.fixturenames:
            metafunc.parametrize("case_name", list(type(self).CASES))

    def runnable_impl(self) -> QuantPolicy:
        impl: QuantPolicy = self.make_impl()
        self.skip_unless_runs_here(impl)
        return impl

    def test_declares_sqnr_threshold(self) -> None:
        threshold = self.make_impl().sqnr_threshold
        assert isinstance(threshold, (int, float)) and not math.isnan(threshold) and threshold > 0

    def test_compute_dtype(self) -> None:
        dtype = self.make_impl().compute_dtype()
        assert dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)

    def test_sqnr_on_case(self, case_name: str) -> None:
        impl = self.runnable_impl()
        weight = type(self).CASES[case_name].make(self.target_device())
        check_round_trip(impl, weight)
        check_sqnr(impl, weight, case_name)

    def test_round_trip_within_declared_bound(self) -> None:
        impl = self.runnable_impl()
        device = self.target_device()
        probe = CASES["normal_64x128"].make(device)
        if declared_bound(impl, probe) is None:
            pytest.skip(f"{self.plugin} declares no elementwise error_bound(weight)")

        @settings(max_examples=self.max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(spec=weights())
        def run(spec: tuple[tuple[int, int], float, str, int]) -> None:
            (rows, cols), scale, dist, seed = spec
            weight = QuantCase(rows, cols, dist, scale, seed).make(device)  # type: ignore[arg-type]
            assert bool((weight != 0).any())
            check_round_trip(impl, weight)

        run()

    def test_quantize_model_keeps_outputs_close(self) -> None:
        check_quantize_model(self.runnable_impl(), self.target_device(), self.model_sqnr_margin_db)

    def test_state_dict_round_trip(self) -> None:
        check_state_dict_round_trip(self.runnable_impl(), self.target_device())

    def test_save_pretrained_round_trip(self, tmp_path: Path) -> None:
        self.runnable_impl()
        if "save" not in self.capabilities():
            pytest.skip(f"{self.plugin} does not declare the 'save' capability")
        model_dir = tiny_llama_checkpoint(tmp_path / "fp32")
        check_pretrained_round_trip(self.plugin, dict(self.options), model_dir, tmp_path / "quantized",
                                    self.target_device())
