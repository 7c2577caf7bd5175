"""The decoding family's per-request pieces: SamplingParams, per-row sampling, logprobs,
incremental detokenization and stop conditions (no model: logits and tokenizers only)."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr1.decoding.detokenize import MAX_HELD, PROMPT_CONTEXT, IncrementalDetokenizer, StopChecker
from dsr1.decoding.sampling import (
    SamplingDecoder,
    apply_openai_penalties,
    apply_repetition_penalty,
    min_p_filter,
    warp,
)
from dsr1.errors import Dsr1Error
from dsr1.interfaces import Decoder, SamplingParams
from dsr1.preprocess.hf_tokenizer import Tokenizer

from .conftest import write_tokenizer

ASSETS = Path(__file__).resolve().parents[2] / "core" / "dsr1" / "assets" / "dsr1-tiny"
#: several scripts, multi-byte characters split over byte-level tokens, and emoji of 4 bytes.
MULTIBYTE = ["输入文本 is Chinese for input text", "naïve café — Ünïcødé ✓", "emoji 🤖🚀 and 👩‍💻 too", "日本語のテキスト"]


@pytest.fixture(scope="module")
def tiny_tok() -> Tokenizer:
    return Tokenizer.from_dir(ASSETS)


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The engine tests' tiny byte-level BPE (Chinese goes through it as bytes)."""
    out = tmp_path_factory.mktemp("bpe")
    write_tokenizer(out)
    return Tokenizer.from_dir(out)


def _stream(tok: Any, prompt: Sequence[int], ids: Sequence[int], skip: bool = True) -> tuple[list[str], str]:
    d = IncrementalDetokenizer(tok, prompt, skip)
    deltas = [d.add([t]) for t in ids]
    deltas.append(d.flush())
    assert "".join(deltas) == d.text
    return deltas, d.text


def _full(tok: Any, prompt: Sequence[int], ids: Sequence[int], skip: bool = True) -> str:
    """The oracle: the output's text as one decode of prompt + output sees it."""
    return tok.decode([*prompt, *ids], skip_special_tokens=skip)[len(tok.decode(list(prompt),
                                                                               skip_special_tokens=skip)):]


# --- incremental detokenization ----------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(data=st.data(), skip=st.booleans(), prompt_text=st.sampled_from(["", "The answer", "输入文本 is"]))
def test_detokenizer_matches_full_decode_random_ids(tiny_tok: Tokenizer, data: Any, skip: bool,
                                                    prompt_text: str) -> None:
    ids = data.draw(st.lists(st.integers(0, tiny_tok.vocab_size - 1), max_size=40))
    prompt = tiny_tok.encode(prompt_text, add_special_tokens=False)
    _, text = _stream(tiny_tok, prompt, ids, skip)
    assert text == _full(tiny_tok, prompt, ids, skip)
    assert text == tiny_tok.decode(ids, skip_special_tokens=skip)  # byte-level: the prompt adds nothing


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 4095), max_size=40), skip=st.booleans())
def test_detokenizer_with_a_transformers_tokenizer(ids: list[int], skip: bool) -> None:
    import transformers

    hf = _hf_tiny()
    assert isinstance(hf, transformers.PreTrainedTokenizerBase)
    _, text = _stream(hf, [], ids, skip)
    assert text == hf.decode(ids, skip_special_tokens=skip)


_HF: dict[str, Any] = {}


def _hf_tiny() -> Any:
    if "tok" not in _HF:
        import transformers

        _HF["tok"] = transformers.AutoTokenizer.from_pretrained(ASSETS)
    return _HF["tok"]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_multibyte_text_one_token_at_a_time(bpe_tok: Tokenizer, tiny_tok: Tokenizer, text: str) -> None:
    for tok in (bpe_tok, tiny_tok):
        ids = tok.encode(text, add_special_tokens=False)
        deltas, got = _stream(tok, tok.encode("Prompt:", add_special_tokens=False), ids)
        assert got == text
        assert not any("\ufffd" in d for d in deltas)  # half characters are held back, never shown
        if tok is bpe_tok and any(ord(c) > 127 for c in text):
            assert "" in deltas[:-1]  # some character really spans tokens here (else the test proves nothing)


def test_metaspace_leading_space_uses_prompt_context(tmp_path: Path) -> None:
    """SentencePiece-style decoders drop the space of a text's first word; the prompt context keeps it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], show_progress=False)
    backend.train_from_iterator(["Hello world, the world is big and the answer is here"] * 4, trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.from_dir(tmp_path)
    prompt = tok.encode("Hello", add_special_tokens=False)
    ids = tok.encode("world is big", add_special_tokens=False)
    assert tok.decode(ids).startswith("world")  # decoded alone, the first space is gone
    _, text = _stream(tok, prompt, ids)
    assert text == " world is big" == _full(tok, prompt, ids)


class _Spy:
    """A tokenizer wrapper that records the length of every window it is asked to decode."""

    def __init__(self, tok: Any) -> None:
        self.tok, self.windows = tok, []  # type: ignore[var-annotated]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.windows.append(len(ids))
        return str(self.tok.decode(ids, skip_special_tokens=skip_special_tokens))


def test_detokenizer_decodes_short_windows_only(bpe_tok: Tokenizer) -> None:
    text = " ".join(MULTIBYTE * 6)
    prompt = bpe_tok.encode("A long prompt " * 20, add_special_tokens=False)
    ids = bpe_tok.encode(text, add_special_tokens=False)
    assert len(ids) > 200
    spy = _Spy(bpe_tok)
    _, got = _stream(spy, prompt, ids)
    assert got == text
    assert max(spy.windows) <= PROMPT_CONTEXT + 4  # a 4-byte character held over 4 tokens at most
    assert len(spy.windows) <= 2 * len(ids) + 2  # two short decodes per token, never the whole output


def test_detokenizer_window_stays_short_on_invalid_bytes(bpe_tok: Tokenizer) -> None:
    """Ids that never complete a character (a run of lead bytes) are emitted after MAX_HELD ids."""
    lead = bpe_tok.convert_tokens_to_ids(["ä", "å"])  # byte-level symbols of the UTF-8 lead bytes 0xE4, 0xE5
    assert None not in lead
    ids = lead * 40
    spy = _Spy(bpe_tok)
    _, got = _stream(spy, [], ids)
    assert got == bpe_tok.decode(ids)  # the replacement characters, as one full decode shows them
    assert max(spy.windows) <= MAX_HELD + MAX_HELD


# --- stopping ------------------------------------------------------------------------------------


def _run(checker: StopChecker, detok: IncrementalDetokenizer | None, ids: Sequence[int],
         prefeed: bool) -> tuple[str | None, list[str], int]:
    """Feed ids one at a time as the engine does; returns (reason, visible texts, tokens used)."""
    out: list[int] = []
    seen: list[str] = []
    for t in ids:
        out.append(t)
        if prefeed and detok is not None:
            detok.add([t])
        reason, visible = checker.check(out, detok)
        seen.append(visible)
        if reason is not None:
            return reason, seen, len(out)
    return None, seen, len(out)


def _assert_growing(seen: list[str]) -> None:
    for a, b in zip(seen, seen[1:]):
        assert b.startswith(a), (a, b)


@pytest.mark.parametrize("prefeed", [False, True])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundaries(tiny_tok: Tokenizer, include: bool, prefeed: bool) -> None:
    text = "The answer is forty two. Then more text follows here."
    ids = tiny_tok.encode(text, add_special_tokens=False)
    stop = "forty two"
    assert not any(stop in tiny_tok.decode([t]) for t in ids)  # no one token holds it: it spans tokens
    params = SamplingParams(stop=["never", stop], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tiny_tok, [], params.skip_special_tokens)
    reason, seen, used = _run(StopChecker(params, eos_ids=[1]), detok, ids, prefeed)
    cut = text.index(stop) + (len(stop) if include else 0)
    assert reason == "stop" and seen[-1] == text[:cut]
    assert tiny_tok.decode(ids[:used]).find(stop) >= 0 and tiny_tok.decode(ids[: used - 1]).find(stop) < 0
    _assert_growing(seen)
    if not include:
        assert not any("forty" in v for v in seen)  # a possible start of the stop string is never shown


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_stop_strings_find_the_first_occurrence(tiny_tok: Tokenizer, data: Any) -> None:
    text = data.draw(st.sampled_from(["one two three two one", "输入文本 is Chinese text", "aaaa bbbb aaaa"]))
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start: data.draw(st.integers(start + 1, min(len(text), start + 8)))]
    ids = tiny_tok.encode(text, add_special_tokens=False)
    params = SamplingParams(stop=stop)
    reason, seen, _ = _run(StopChecker(params, []), IncrementalDetokenizer(tiny_tok, []), ids, prefeed=False)
    assert reason == "stop" and seen[-1] == text[: text.index(stop)]
    _assert_growing(seen)


class _FindSpy(str):
    starts: list[tuple[int, int]] = []  # (where a search began, how long the text was)

    def find(self, sub: str, start: Any = None, end: Any = None) -> int:  # type: ignore[override]
        _FindSpy.starts.append((int(start or 0), len(self)))
        return super().find(sub, start, end)


class _SpyDetok(IncrementalDetokenizer):
    @property
    def text(self) -> str:
        return _FindSpy(self._text)


def test_stop_search_reads_only_the_new_tail(tiny_tok: Tokenizer) -> None:
    text = "word " * 60 + "the end"
    ids = tiny_tok.encode(text, add_special_tokens=False)
    stops = ["the end", "xyz"]
    _FindSpy.starts = []
    reason, seen, _ = _run(StopChecker(SamplingParams(stop=stops), []), _SpyDetok(tiny_tok, []), ids, prefeed=False)
    assert reason == "stop" and seen[-1] == "word " * 60
    longest = max(len(s) for s in stops)
    lengths = [n for _, n in _FindSpy.starts]
    for (start, n), before in zip(_FindSpy.starts[len(stops):], lengths):
        assert start >= before - (longest - 1)  # what was searched before is searched again only for a stop's start
        assert n - start <= (n - before) + longest - 1


@pytest.mark.parametrize("prefeed", [False, True])
def test_stop_tokens_eos_and_length(tiny_tok: Tokenizer, prefeed: bool) -> None:
    eos = tiny_tok.eos_token_id
    assert eos is not None
    words = tiny_tok.encode("hello world again", add_special_tokens=False)
    ids = [*words, eos, *words]

    def run(params: SamplingParams) -> tuple[str | None, str, int]:
        detok = IncrementalDetokenizer(tiny_tok, [], params.skip_special_tokens)
        reason, seen, used = _run(StopChecker(params, [eos]), detok, ids, prefeed)
        _assert_growing(seen)
        return reason, seen[-1], used

    assert run(SamplingParams()) == ("stop", "hello world again", len(words) + 1)
    # the eos token's text stays out unless asked for, also when special tokens are shown
    assert run(SamplingParams(skip_special_tokens=False)) == ("stop", "hello world again", len(words) + 1)
    assert run(SamplingParams(skip_special_tokens=False, include_stop_str_in_output=True))[1] == \
        "hello world again<|eos|>"
    assert run(SamplingParams(ignore_eos=True)) == (None, "hello world againhello world again", len(ids))
    # a stop token id: "world"'s token ends the output, without its text
    world = words[1]
    reason, text, used = run(SamplingParams(stop_token_ids=[world], ignore_eos=True))
    assert (reason, text, used) == ("stop", tiny_tok.decode(words[:1]), 2)
    assert run(SamplingParams(max_tokens=2)) == ("length", tiny_tok.decode(words[:2]), 2)


def test_checker_without_tokenizer() -> None:
    checker = StopChecker(SamplingParams(max_tokens=3, stop_token_ids=[7]), eos_ids=[9])
    assert checker.check([5], None) == (None, "")
    assert checker.check([5, 6, 7], None) == ("stop", "") and checker.num_tokens == 3
    assert StopChecker(SamplingParams(max_tokens=2), []).check([5, 6, 8], None) == ("length", "")
    many = StopChecker(SamplingParams(), eos_ids=[9])
    assert many.check([1, 9, 3, 4], None) == ("stop", "") and many.num_tokens == 2  # the rest is dropped
    with pytest.raises(Dsr1Error, match="stop strings need a tokenizer"):
        StopChecker(SamplingParams(stop="x"), []).check([1], None)


# --- sampling ------------------------------------------------------------------------------------


def test_min_p_matches_transformers() -> None:
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 64, generator=g) * 3
    seen = torch.randint(0, 64, (4, 7), generator=g)
    for min_p in (0.0, 0.05, 0.3, 1.0):
        assert torch.equal(min_p_filter(logits, min_p), MinPLogitsWarper(min_p)(seen, logits.clone()))
    want = RepetitionPenaltyLogitsProcessor(1.2)(seen, logits.clone())
    for proc in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(20), TopPLogitsWarper(0.9), MinPLogitsWarper(0.1)):
        want = proc(seen, want)
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.1)
    got = warp(apply_repetition_penalty(logits, seen, 1.2), params)
    assert torch.equal(got, want)
    assert (torch.isfinite(got).sum(-1) < torch.isfinite(warp(logits, params.model_copy(update={"min_p": 0.0})))
            .sum(-1)).any()  # min-p removed something here


def test_openai_penalties_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0, 0.5]])
    out = [2, 2, 3, 2]
    got = apply_openai_penalties(logits, [out], presence=0.5, frequency=0.25)
    counts = [0, 0, 3, 1, 0]
    want = [v - (0.5 if c else 0.0) - 0.25 * c for v, c in zip(logits[0].tolist(), counts)]
    assert got[0].tolist() == pytest.approx(want)
    # through the decoder: the prompt's ids do not count, the output's do
    decoder = SamplingDecoder()
    params = SamplingParams(presence_penalty=2.0)
    assert decoder.next_tokens(logits, [[]], [[2]], [params], [None]).tolist() == [2]
    assert decoder.next_tokens(logits, [[2]], [[]], [params], [None]).tolist() == [1]
    params = SamplingParams(frequency_penalty=0.6)
    assert decoder.next_tokens(logits, [[2]], [[]], [params], [None]).tolist() == [2]  # 3 - 0.6 > 2
    assert decoder.next_tokens(logits, [[2, 2]], [[]], [params], [None]).tolist() == [1]  # 3 - 1.2 < 2


def test_repetition_penalty_over_prompt_and_output() -> None:
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[3.0, 2.9, 2.8, -1.0]])
    prompt, output = [0], [1]
    want = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([prompt + output]), logits.clone()).argmax(-1)
    got = SamplingDecoder().next_tokens(logits, [output], [prompt], [SamplingParams(repetition_penalty=1.5)], [None])
    assert got.tolist() == want.tolist() == [2]


def _mixed_rows() -> tuple[list[SamplingParams], list[list[int]], list[list[int]]]:
    def ban_zero(out: list[int], row: torch.Tensor) -> torch.Tensor:
        row[0] = float("-inf")  # edits in place, as many processors do
        return row

    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(do_sample=True, temperature=0.7, top_k=8, seed=1),
        SamplingParams(do_sample=True, top_p=0.8, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, seed=2),
        SamplingParams(logits_processors=[ban_zero]),
        SamplingParams(do_sample=True, temperature=0.0),  # greedy after all
        SamplingParams(do_sample=True, temperature=1.5, repetition_penalty=0.8, logits_processors=[ban_zero], seed=3),
    ]
    outputs = [[1, 2], [3], [4, 4, 5], [0, 0, 6], [], [7], [0, 8, 8]]
    prompts = [[9, 1], [3, 3, 10], [11], [12, 0], [13], [14], [15, 16]]
    return params, outputs, prompts


@pytest.mark.parametrize("batched", [SamplingDecoder.next_tokens, Decoder.next_tokens])
def test_next_tokens_per_row_equals_row_by_row(batched: Any) -> None:
    params, outputs, prompts = _mixed_rows()
    decoder = SamplingDecoder()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(params), 32, generator=g) * 2
    logits[4, 0] = 50.0  # row 4's favourite is the token its processor bans
    before = logits.clone()
    for _ in range(5):  # several steps: each row's generator advances on its own
        gens_a = [p.make_generator() for p in params]
        gens_b = [p.make_generator() for p in params]
        got = batched(decoder, logits, outputs, prompts, params, gens_a)
        want = [
            decoder.next_token(logits[i: i + 1], torch.tensor([prompts[i] + outputs[i]]), p, gens_b[i],
                               outputs=[outputs[i]]).item()
            for i, p in enumerate(params)
        ]
        assert got.tolist() == want
        assert torch.equal(logits, before)  # the caller's logits (read again for logprobs) are untouched
        logits = torch.randn(len(params), 32, generator=g) * 2
        before = logits.clone()
    assert got[4].item() != 0


def test_all_greedy_rows_are_one_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    params = [SamplingParams()] * 3 + [SamplingParams(do_sample=True, temperature=0.0)] * 3
    got = SamplingDecoder().next_tokens(logits, [[]] * 6, [[1]] * 6, params, [None] * 6)
    assert torch.equal(got, logits.argmax(-1))


def test_seeded_rows_do_not_depend_on_their_batch() -> None:
    p = SamplingParams(do_sample=True, temperature=1.0, seed=1234)
    other = SamplingParams(do_sample=True, temperature=1.0, seed=99)
    logits = torch.zeros(3, 1000)  # uniform: the draw is all the generator's
    alone = SamplingDecoder().next_tokens(logits[:1], [[]], [[1]], [p], [p.make_generator()])
    mixed = SamplingDecoder().next_tokens(logits, [[], [], []], [[1]] * 3, [other, p, SamplingParams()],
                                          [other.make_generator(), p.make_generator(), None])
    assert mixed[1] == alone[0] and mixed[0] != alone[0]


def test_logits_processor_bans_a_token_and_sees_output_ids() -> None:
    calls: list[list[int]] = []

    def ban_top(out: list[int], row: torch.Tensor) -> torch.Tensor:
        calls.append(list(out))
        return row.masked_fill(torch.arange(row.shape[0]) == 5, float("-inf"))

    logits = torch.zeros(2, 8)
    logits[:, 5] = 10.0
    params = SamplingParams(do_sample=True, logits_processors=[ban_top], seed=0)
    gens = [params.make_generator(), params.make_generator()]
    for _ in range(50):
        got = SamplingDecoder().next_tokens(logits, [[1, 2], [3]], [[0], [0]], [params, params], gens)
        assert 5 not in got.tolist()
    assert calls[:2] == [[1, 2], [3]]
    assert SamplingDecoder().next_tokens(logits[:1], [[]], [[0]], [SamplingParams()], [None]).tolist() == [5]

    def broken(out: list[int], row: torch.Tensor) -> Any:
        return row[:3]

    with pytest.raises(Dsr1Error, match="logits processor 'broken' returned"):
        SamplingDecoder().next_tokens(logits[:1], [[]], [[0]], [SamplingParams(logits_processors=[broken])], [None])


def test_next_token_needs_outputs_for_output_penalties() -> None:
    with pytest.raises(Dsr1Error, match="act on each row's output ids"):
        SamplingDecoder().next_token(torch.zeros(1, 4), torch.zeros(1, 1, dtype=torch.long),
                                     SamplingParams(presence_penalty=1.0), None)


@pytest.mark.parametrize("n", [0, 1, 5, 20])
def test_logprobs_are_normalised(n: int) -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 40, generator=g) * 4
    tokens = torch.tensor([0, 17, 39])
    chosen, top_ids, top_lp = SamplingDecoder().logprobs(logits, tokens, n)
    full = logits.log_softmax(-1)
    assert chosen.shape == (3,) and top_ids.shape == top_lp.shape == (3, n)
    assert torch.allclose(full.exp().sum(-1), torch.ones(3))
    assert torch.allclose(chosen, full.gather(1, tokens[:, None]).squeeze(1))
    assert torch.allclose(top_lp, full.gather(1, top_ids))
    if n:
        assert torch.equal(top_ids[:, 0], logits.argmax(-1)) and (top_lp.diff(dim=-1) <= 0).all()
        assert (top_lp <= 0).all() and (top_lp.exp().sum(-1) <= 1 + 1e-6).all()


# --- SamplingParams ------------------------------------------------------------------------------


BAD_PARAMS = {
    "negative temperature": (dict(temperature=-0.5), r"'temperature' must be >= 0 \(0 = greedy\), got -0.5"),
    "nan temperature": (dict(temperature=math.nan), "'temperature': input should be a finite number"),
    "top_p zero": (dict(top_p=0.0), r"'top_p' must be in \(0, 1\]"),
    "top_k negative": (dict(top_k=-1), "'top_k' must be an integer >= 0"),
    "top_k bool": (dict(top_k=True), "'top_k' must be an integer, not a bool"),
    "min_p above one": (dict(min_p=1.5), r"'min_p' must be in \[0, 1\]"),
    "presence too big": (dict(presence_penalty=2.5), r"'presence_penalty' must be in \[-2, 2\]"),
    "frequency too small": (dict(frequency_penalty=-3), r"'frequency_penalty' must be in \[-2, 2\]"),
    "repetition zero": (dict(repetition_penalty=0.0), "'repetition_penalty' must be > 0"),
    "seed too big": (dict(seed=2**64), r"'seed' must be an integer in \[0, 2\*\*64\)"),
    "seed negative": (dict(seed=-1), r"'seed' must be an integer in \[0, 2\*\*64\)"),
    "max_tokens zero": (dict(max_tokens=0), "'max_tokens' must be an integer >= 1 or None"),
    "empty stop": (dict(stop=["ok", ""]), "'stop' must hold non-empty strings"),
    "stop not text": (dict(stop=[3]), r"'stop\[0\]': input should be a valid string"),
    "negative stop id": (dict(stop_token_ids=[-1]), "'stop_token_ids' must hold token ids >= 0"),
    "logprobs too many": (dict(logprobs=21), r"'logprobs' must be an integer in \[0, 20\]"),
    "processor not callable": (dict(logits_processors=["x"]), r"'logits_processors\[0\]': input should be callable"),
    "misspelt key": (dict(temprature=0.3), "unknown sampling parameter 'temprature'; did you mean 'temperature'"),
}


@pytest.mark.parametrize("kwargs,message", list(BAD_PARAMS.values()), ids=list(BAD_PARAMS))
def test_bad_sampling_params_are_one_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(Dsr1Error, match=message) as err:
        SamplingParams(**kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(Dsr1Error, match=message):
        SamplingParams.model_validate(kwargs)  # the JSON path (a server's request body) is checked the same


def test_sampling_params_defaults_and_round_trip() -> None:
    p = SamplingParams(stop="END", seed=5, logits_processors=[lambda out, row: row])
    assert p.stop == ["END"] and p.greedy and p.penalized
    assert not SamplingParams().penalized and SamplingParams(do_sample=True, temperature=0).greedy
    assert not SamplingParams(do_sample=True).greedy
    back = SamplingParams.model_validate_json(p.model_dump_json())
    assert "logits_processors" not in p.model_dump() and back.logits_processors == []
    assert back == p.model_copy(update={"logits_processors": []})
    with pytest.raises(Exception, match="frozen"):
        p.temperature = 2.0  # type: ignore[misc]


def test_from_generation_config() -> None:
    import json

    tiny = json.loads((ASSETS / "generation_config.json").read_text())
    assert SamplingParams.from_generation_config(tiny) == SamplingParams()  # greedy; eos/pad are not sampling keys
    qwen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
            "min_p": None, "eos_token_id": [1, 2], "max_new_tokens": 2048}
    p = SamplingParams.from_generation_config(qwen)
    assert (p.do_sample, p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.min_p) == (True, 0.7, 0.8, 20,
                                                                                               1.05, 0.0)
    over = SamplingParams.from_generation_config(qwen, temperature=0.0, max_tokens=8)
    assert over.greedy and over.top_k == 20 and over.max_tokens == 8
    with pytest.raises(Dsr1Error, match=r"generation_config.json: sampling parameter 'top_p' must be in \(0, 1\]"):
        SamplingParams.from_generation_config({"top_p": 0})
