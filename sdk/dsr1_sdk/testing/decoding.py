"""Decoding conformance: next tokens against a slow reference sampler on fixed logits.

Every case (:data:`CASES`) is one row of fixed logits, a prompt and output ids and one
:class:`~dsr1.interfaces.SamplingParams`. The kit repeats the row ``draws`` times (4000),
calls ``next_token`` once with a seeded generator and compares:

* greedy params: every token equals the reference argmax (after processors and penalties);
* sampled params: every token lies in the reference distribution's support (a decoder that
  ignores ``top_k``/``top_p``/``min_p`` draws tokens the reference forbids), and each token's
  frequency is within 5 standard deviations (+3/draws) of its reference probability (a
  decoder that ignores ``temperature`` or a penalty draws with the wrong frequencies).

A case names the sampling *features* it uses (``temperature``, ``top_k``, ``top_p``,
``min_p``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``,
``logits_processors``). A decoder that declares a feature as a capability must match the
reference; one that does not may instead refuse the params with a one-line ``Dsr1Error``,
but never ignore them silently. Greedy decoding is required of every decoder.

Also checked: ``logits`` are left unmodified; tokens are ``(B,)`` int64 on the logits'
device; the same seed gives the same tokens (capability ``seeded``); ``next_tokens`` with
per-row params equals row-by-row ``next_token`` calls; ``logprobs`` equals the float64
``log_softmax`` of the raw logits (most likely first); ``stopped`` follows eos ids and stop
strings; and a hypothesis property test on random logits and params (support and greedy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsr1.errors import Dsr1Error
from dsr1.interfaces import Decoder, SamplingParams
from dsr1_sdk.testing.base import PluginConformance
from dsr1_sdk.testing.sampling_reference import reference_greedy, reference_logprobs, reference_probs

#: Sampling features a decoder may declare (each one its own capability).
FEATURES: tuple[str, ...] = (
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "logits_processors",
)

#: Twelve distinct logits, not in rank order (the top token is id 1, the second id 7).
BASE_LOGITS: tuple[float, ...] = (0.5, 2.0, -0.4, 1.2, -3.0, 0.9, 0.0, 1.5, -1.5, 0.3, -0.8, -2.0)


def ban_token_1(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """A logits processor: token 1 may never be chosen."""
    logits[1] = float("-inf")
    return logits


def boost_token_4(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """A logits processor: token 4 gets +3.5 (from the least likely to one of the likeliest)."""
    logits[4] += 3.5
    return logits


@dataclass(frozen=True)
class DecodeCase:
    """One row of logits with its params; ``features``: the declared capabilities it needs."""

    params: dict[str, Any]
    features: frozenset[str] = frozenset()
    prompt: tuple[int, ...] = ()
    output: tuple[int, ...] = ()
    logits: tuple[float, ...] = BASE_LOGITS
    processors: tuple[Any, ...] = field(default=())

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self.params, logits_processors=list(self.processors))


def _f(*names: str) -> frozenset[str]:
    return frozenset(names)


CASES: dict[str, DecodeCase] = {
    "greedy": DecodeCase({}),
    "greedy_temperature_0": DecodeCase({"do_sample": True, "temperature": 0.0}),
    "sample_plain": DecodeCase({"do_sample": True}),
    "temperature_0.5": DecodeCase({"do_sample": True, "temperature": 0.5}, _f("temperature")),
    "temperature_2": DecodeCase({"do_sample": True, "temperature": 2.0}, _f("temperature")),
    "top_k_3": DecodeCase({"do_sample": True, "top_k": 3}, _f("top_k")),
    "top_k_1": DecodeCase({"do_sample": True, "top_k": 1}, _f("top_k")),
    "top_p_0.6": DecodeCase({"do_sample": True, "top_p": 0.6}, _f("top_p")),
    "top_p_0.9": DecodeCase({"do_sample": True, "top_p": 0.9}, _f("top_p")),
    "min_p_0.2": DecodeCase({"do_sample": True, "min_p": 0.2}, _f("min_p")),
    "min_p_0.5_temperature_0.7": DecodeCase({"do_sample": True, "min_p": 0.5, "temperature": 0.7},
                                            _f("min_p", "temperature")),
    "repetition_greedy": DecodeCase({"repetition_penalty": 2.0}, _f("repetition_penalty"), prompt=(1, 4, 9)),
    "repetition_sampled": DecodeCase({"do_sample": True, "repetition_penalty": 1.8}, _f("repetition_penalty"),
                                     prompt=(1, 7), output=(4, 3)),
    "presence_greedy": DecodeCase({"presence_penalty": 1.0}, _f("presence_penalty"), prompt=(7,), output=(1,)),
    "presence_sampled": DecodeCase({"do_sample": True, "presence_penalty": 1.5}, _f("presence_penalty"),
                                   prompt=(3,), output=(1, 7)),
    "frequency_greedy": DecodeCase({"frequency_penalty": 0.6}, _f("frequency_penalty"), prompt=(7,),
                                   output=(1, 1)),
    "frequency_sampled": DecodeCase({"do_sample": True, "frequency_penalty": 0.8}, _f("frequency_penalty"),
                                    output=(1, 1, 7, 3)),
    "processor_greedy": DecodeCase({}, _f("logits_processors"), processors=(ban_token_1,)),
    "processor_sampled": DecodeCase({"do_sample": True}, _f("logits_processors"), output=(2,),
                                    processors=(boost_token_4,)),
    "combined": DecodeCase(
        {"do_sample": True, "temperature": 0.7, "top_k": 8, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.3,
         "presence_penalty": 0.5, "frequency_penalty": 0.2},
        _f("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"),
        prompt=(1, 5), output=(7, 7, 2),
    ),
}


def sampled_rows(
    decoder: Decoder, case: DecodeCase, draws: int, seed: int = 0, device: str = "cpu"
) -> torch.Tensor:
    """``next_token`` on the case's row repeated ``draws`` times (one seeded generator); checks
    shape, dtype and that the logits were not modified. Returns the tokens ``(draws,)`` on the CPU."""
    params = case.sampling_params()
    logits = torch.tensor(case.logits, dtype=torch.float32, device=device).expand(draws, -1).contiguous()  # (N, V)
    ids = [*case.prompt, *case.output]
    generated = torch.tensor([ids] * draws, dtype=torch.long, device=device).reshape(draws, len(ids))  # (N, L)
    before = logits.clone()
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = decoder.next_token(logits, generated, params, gen, outputs=[list(case.output)] * draws)
    assert torch.equal(logits, before), "next_token modified the caller's logits (the engine reads them for logprobs)"
    assert isinstance(tokens, torch.Tensor) and tuple(tokens.shape) == (draws,), (
        f"next_token returned {tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__}, "
        f"expected ({draws},)"
    )
    assert tokens.dtype == torch.long, f"next_token returned {tokens.dtype} ids, expected torch.int64"
    assert tokens.device.type == logits.device.type, f"tokens on {tokens.device}, logits on {logits.device}"
    return tokens.cpu()


def check_decode_case(decoder: Decoder, case: DecodeCase, where: str, draws: int = 4000, seed: int = 0,
                      device: str = "cpu") -> None:
    """Greedy: every token is the reference argmax. Sampled: support and frequencies as the reference."""
    params = case.sampling_params()
    tokens = sampled_rows(decoder, case, draws, seed, device)
    logits = torch.tensor(case.logits, dtype=torch.float64)
    if params.greedy:
        want = reference_greedy(logits, params, case.prompt, case.output)
        wrong = (tokens != want).nonzero()
        assert wrong.numel() == 0, (
            f"{where}: greedy token {int(tokens[int(wrong[0])])} at row {int(wrong[0])}, reference {want} "
            f"(params {case.params})"
        )
        return
    ref = reference_probs(logits, params, case.prompt, case.output)
    counts = torch.bincount(tokens, minlength=len(case.logits)).tolist()
    outside = [t for t, c in enumerate(counts) if c and t not in ref.support and t not in ref.ambiguous]
    assert not outside, (
        f"{where}: drew token {outside[0]} ({counts[outside[0]]} of {draws} draws), which the reference gives "
        f"probability 0 (support {sorted(ref.support)}, params {case.params})"
    )
    worst, worst_z, worst_bound = -1, 0.0, 0.0
    for t, (c, p) in enumerate(zip(counts, ref.probs)):
        if t in ref.ambiguous:
            continue
        bound = 5 * math.sqrt(p * (1 - p) / draws) + 3 / draws  # 5 sigma of a binomial frequency
        z = abs(c / draws - p) / bound
        if z > worst_z:
            worst, worst_z, worst_bound = t, z, bound
    assert worst_z <= 1.0, (
        f"{where}: token {worst} drawn with frequency {counts[worst] / draws:.4f}, reference probability "
        f"{ref.probs[worst]:.4f} (bound ±{worst_bound:.4f} over {draws} draws; params {case.params})"
    )


def check_seeded(decoder: Decoder, device: str = "cpu") -> None:
    """Equally seeded generators give the same draws, different seeds different ones."""
    case = CASES["sample_plain"]
    first = sampled_rows(decoder, case, 256, seed=1234, device=device)
    again = sampled_rows(decoder, case, 256, seed=1234, device=device)
    other = sampled_rows(decoder, case, 256, seed=4321, device=device)
    assert torch.equal(first, again), "the same seeded generator gave different tokens: draw with `generator`"
    assert not torch.equal(first, other), "different seeds gave the same 256 draws: the generator is ignored"


def check_logprobs(decoder: Decoder, logits: torch.Tensor, tokens: torch.Tensor, n: int) -> None:
    """``logprobs`` is the float64 ``log_softmax`` of the raw logits, top ``n`` most likely first."""
    chosen, top_ids, top_lp = decoder.logprobs(logits, tokens, n)
    b = logits.shape[0]
    assert tuple(chosen.shape) == (b,) and tuple(top_ids.shape) == (b, n) and tuple(top_lp.shape) == (b, n), (
        f"logprobs shapes {tuple(chosen.shape)}, {tuple(top_ids.shape)}, {tuple(top_lp.shape)}; expected "
        f"({b},), ({b}, {n}), ({b}, {n})"
    )
    for i in range(b):
        ref = reference_logprobs(logits[i])
        got = float(chosen[i])
        assert abs(got - ref[int(tokens[i])]) <= 1e-4, f"row {i}: logprob {got}, reference {ref[int(tokens[i])]}"
        order = sorted(range(len(ref)), key=lambda t: -ref[t])[:n]
        got_ids = [int(t) for t in top_ids[i]]
        assert [round(ref[t], 4) for t in got_ids] == [round(ref[t], 4) for t in order], (
            f"row {i}: top-{n} ids {got_ids}, reference {order} (most likely first)"
        )
        assert all(abs(float(top_lp[i, j]) - ref[t]) <= 1e-4 for j, t in enumerate(got_ids)), (
            f"row {i}: top logprobs {top_lp[i].tolist()} differ from the reference's"
        )


class DecodingConformance(PluginConformance):
    """Conformance kit of the ``decoding`` family. Subclass it and set ``plugin`` (and ``options``)."""

    family: ClassVar[str] = "decoding"
    CASES: ClassVar[dict[str, DecodeCase]] = CASES
    #: rows per sampled case (the frequency bound scales with 1/sqrt(draws)).
    draws: ClassVar[int] = 4000

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "case_name" in metafunc.fixturenames:
            metafunc.parametrize("case_name", list(type(self).CASES))

    def decoder(self) -> Decoder:
        impl: Decoder = self.make_impl()
        self.skip_unless_runs_here(impl)
        return impl

    def declared(self) -> frozenset[str]:
        return frozenset(FEATURES) & self.capabilities()

    # --- tests ---------------------------------------------------------------------------------

    def test_case(self, case_name: str) -> None:
        """Declared features match the reference; undeclared ones are refused (Dsr1Error) or match it."""
        case = type(self).CASES[case_name]
        decoder = self.decoder()
        undeclared = case.features - self.declared()
        where = f"case {case_name}"
        if undeclared:
            try:
                check_decode_case(decoder, case, where, self.draws, device=self.target_device())
            except Dsr1Error:
                return  # refused in one line: allowed for a feature it does not declare
            except AssertionError as err:
                raise AssertionError(f"{err}; {self.plugin} does not declare {sorted(undeclared)}: refuse such "
                                     "params with a one-line Dsr1Error instead of ignoring them") from None
            return
        check_decode_case(decoder, case, where, self.draws, device=self.target_device())

    def test_same_seed_same_tokens(self) -> None:
        if "seeded" not in self.capabilities():
            pytest.skip(f"{self.plugin} does not declare 'seeded'")
        check_seeded(self.decoder(), self.target_device())

    def test_next_tokens_equals_row_by_row(self) -> None:
        """The engine's per-row call equals one ``next_token`` per row with equally seeded generators."""
        decoder = self.decoder()
        names = [n for n in ("greedy", "sample_plain", "repetition_greedy", "temperature_0.5", "top_k_3",
                             "presence_sampled") if CASES[n].features <= self.declared()]
        rows = [CASES[n] for n in names]
        device = self.target_device()
        logits = torch.tensor([r.logits for r in rows], dtype=torch.float32, device=device)  # (B, V)
        before = logits.clone()
        params = [r.sampling_params() for r in rows]

        def gens() -> list[torch.Generator]:
            return [torch.Generator(device=device).manual_seed(100 + i) for i in range(len(rows))]

        got = decoder.next_tokens(logits, [list(r.output) for r in rows], [list(r.prompt) for r in rows], params,
                                  gens())
        assert torch.equal(logits, before), "next_tokens modified the caller's logits"
        assert tuple(got.shape) == (len(rows),) and got.dtype == torch.long, f"next_tokens returned {got!r}"
        for i, (r, p, g) in enumerate(zip(rows, params, gens())):
            ids = torch.tensor([[*r.prompt, *r.output]], dtype=torch.long, device=device).reshape(1, -1)  # (1, L)
            alone = decoder.next_token(logits[i : i + 1], ids, p, g, outputs=[list(r.output)])
            assert int(got[i]) == int(alone[0]), (
                f"row {i} ({names[i]}): next_tokens gave {int(got[i])}, next_token alone {int(alone[0])}"
            )

    def test_logprobs_are_raw_log_softmax(self) -> None:
        decoder = self.decoder()
        gen = torch.Generator().manual_seed(7)
        logits = (torch.randn(3, 17, generator=gen) * 3).to(self.target_device())  # (B, V)
        tokens = torch.tensor([0, 5, 16], device=logits.device)
        for n in (0, 1, 5):
            check_logprobs(decoder, logits, tokens, n)

    def test_stopped(self) -> None:
        decoder = self.decoder()
        assert decoder.stopped([5, 2], "ab", [], [2]), "the last token is an eos id: stopped"
        assert not decoder.stopped([2, 5], "ab", [], [2]), "an eos id before the last token does not stop"
        assert decoder.stopped([5], "hello world", ["wor"], []), "a stop string in the text: stopped"
        assert not decoder.stopped([5], "hello", ["world"], [9]), "nothing matched: not stopped"
        assert not decoder.stopped([], "", [], [2]), "no tokens: not stopped"

    def test_hypothesis_support_and_greedy(self) -> None:
        """Random logits and declared params: sampled tokens stay in the reference support, greedy is exact."""
        decoder = self.decoder()
        declared = self.declared()
        device = self.target_device()

        @settings(max_examples=self.max_examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(vocab=st.integers(2, 40), seed=st.integers(0, 2**16), sample=st.booleans(),
               temperature=st.sampled_from([0.3, 1.0, 1.7]), top_k=st.integers(0, 6),
               top_p=st.sampled_from([1.0, 0.95, 0.8, 0.5]), min_p=st.sampled_from([0.0, 0.05, 0.3]),
               rep=st.sampled_from([1.0, 1.4, 0.8]), presence=st.sampled_from([0.0, 0.7]),
               frequency=st.sampled_from([0.0, 0.4]))
        def run(vocab: int, seed: int, sample: bool, temperature: float, top_k: int, top_p: float, min_p: float,
                rep: float, presence: float, frequency: float) -> None:
            gen = torch.Generator().manual_seed(seed)
            row = torch.randn(vocab, generator=gen) * 2
            prompt = torch.randint(0, vocab, (3,), generator=gen).tolist()
            output = torch.randint(0, vocab, (4,), generator=gen).tolist()
            wanted = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                      "repetition_penalty": rep, "presence_penalty": presence, "frequency_penalty": frequency}
            off = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1.0,
                   "presence_penalty": 0.0, "frequency_penalty": 0.0}
            params = {k: (v if k in declared else off[k]) for k, v in wanted.items()}
            case = DecodeCase({"do_sample": sample, **params}, prompt=tuple(prompt), output=tuple(output),
                              logits=tuple(float(x) for x in row))
            p = case.sampling_params()
            tokens = sampled_rows(decoder, case, 64, seed, device)
            if p.greedy:
                want = reference_greedy(torch.tensor(case.logits, dtype=torch.float64), p, prompt, output)
                assert bool((tokens == want).all()), f"greedy token {tokens[0].item()}, reference {want} ({params})"
                return
            ref = reference_probs(torch.tensor(case.logits, dtype=torch.float64), p, prompt, output)
            bad = [int(t) for t in tokens.unique() if int(t) not in ref.support | ref.ambiguous]
            assert not bad, f"drew token {bad[0]} outside the reference support {sorted(ref.support)} ({params})"

        run()

