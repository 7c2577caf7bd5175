"""The decoding kit: the builtin sampler passes it, decoders that ignore a setting fail it."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from dsr1.decoding.sampling import SamplingDecoder
from dsr1.interfaces import SamplingParams
from dsr1_sdk.testing import DecodingConformance
from dsr1_sdk.testing.decoding import CASES, check_decode_case, check_logprobs, check_seeded
from dsr1_sdk.testing.sampling_reference import reference_probs


class TestSampling(DecodingConformance):
    plugin = "sampling"


def test_fixed_cases_are_clear_of_thresholds() -> None:
    """No case puts a token within rounding of a top-p / min-p threshold, and each case's
    feature changes the distribution (so ignoring it is visible)."""
    plain = reference_probs(torch.tensor(CASES["sample_plain"].logits), SamplingParams(do_sample=True), (), ())
    for name, case in CASES.items():
        params = case.sampling_params()
        ref = reference_probs(torch.tensor(case.logits, dtype=torch.float64), params, case.prompt, case.output)
        assert not ref.ambiguous, name
        assert abs(sum(ref.probs) - 1) < 1e-12, name
        if case.features and not params.greedy:
            tv = sum(abs(a - b) for a, b in zip(ref.probs, plain.probs)) / 2
            assert tv > 0.05, (name, tv)


class IgnoresMinP(SamplingDecoder):
    def next_token(self, logits: torch.Tensor, generated: torch.Tensor, params: SamplingParams,
                   generator: Any, outputs: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        return super().next_token(logits, generated, params.model_copy(update={"min_p": 0.0}), generator, outputs)


class IgnoresField(SamplingDecoder):
    field = ""
    neutral: Any = None

    def next_token(self, logits: torch.Tensor, generated: torch.Tensor, params: SamplingParams,
                   generator: Any, outputs: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        params = params.model_copy(update={self.field: self.neutral})
        return super().next_token(logits, generated, params, generator, outputs)


def ignoring(name: str, neutral: Any) -> IgnoresField:
    impl = type(f"Ignores_{name}", (IgnoresField,), {"field": name, "neutral": neutral})()
    return impl  # type: ignore[return-value]


class GlobalRng(SamplingDecoder):
    """Samples from torch's global generator instead of the one it was handed."""

    def next_token(self, logits: torch.Tensor, generated: torch.Tensor, params: SamplingParams,
                   generator: Any, outputs: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        return super().next_token(logits, generated, params, None, outputs)


class InPlaceTemperature(SamplingDecoder):
    def next_token(self, logits: torch.Tensor, generated: torch.Tensor, params: SamplingParams,
                   generator: Any, outputs: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        if not params.greedy:
            logits.div_(params.temperature)
        return super().next_token(logits, generated, params.model_copy(update={"temperature": 1.0}), generator,
                                  outputs)


@pytest.mark.parametrize(("field", "neutral", "case"), [
    ("min_p", 0.0, "min_p_0.2"),
    ("top_k", 0, "top_k_3"),
    ("top_p", 1.0, "top_p_0.6"),
    ("temperature", 1.0, "temperature_0.5"),
    ("temperature", 1.0, "temperature_2"),
    ("repetition_penalty", 1.0, "repetition_greedy"),
    ("repetition_penalty", 1.0, "repetition_sampled"),
    ("presence_penalty", 0.0, "presence_sampled"),
    ("frequency_penalty", 0.0, "frequency_greedy"),
    ("frequency_penalty", 0.0, "frequency_sampled"),
    ("logits_processors", [], "processor_greedy"),
    ("logits_processors", [], "processor_sampled"),
])
def test_a_decoder_that_ignores_a_setting_fails(field: str, neutral: Any, case: str) -> None:
    check_decode_case(SamplingDecoder(), CASES[case], case)  # the right one passes
    with pytest.raises(AssertionError, match=f"^{case}: "):
        check_decode_case(ignoring(field, neutral), CASES[case], case)


def test_ignoring_min_p_fails_on_support() -> None:
    with pytest.raises(AssertionError, match="probability 0"):
        check_decode_case(IgnoresMinP(), CASES["min_p_0.2"], "min_p")


def test_modifying_logits_fails() -> None:
    with pytest.raises(AssertionError, match="modified the caller's logits"):
        check_decode_case(InPlaceTemperature(), CASES["temperature_0.5"], "t")


def test_wrong_logprobs_fail() -> None:
    class Softmax(SamplingDecoder):
        def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, n: int) -> Any:
            chosen, ids, lp = super().logprobs(logits, tokens, n)
            return chosen.exp(), ids, lp

    logits = torch.randn(2, 9, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([1, 2])
    check_logprobs(SamplingDecoder(), logits, tokens, 3)
    with pytest.raises(AssertionError, match="logprob"):
        check_logprobs(Softmax(), logits, tokens, 3)


def test_global_rng_fails_seeding() -> None:
    check_seeded(SamplingDecoder())
    with pytest.raises(AssertionError, match="the same seeded generator gave different tokens"):
        check_seeded(GlobalRng())
