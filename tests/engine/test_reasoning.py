"""Reasoning models: the ``<think>`` split (whole text and streamed deltas) and the thinking budget.

The budget is checked on a tiny random Llama whose tokenizer has ``<think>``/``</think>`` as added
tokens and a chat template that ends the prompt with ``<think>\\n`` (DeepSeek-R1's): the output
starts inside the thinking block, and once ``max_thinking_tokens`` are out the end marker is
forced, on the engine loop (continuous scheduler) and through ``model.generate`` (static).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsr1.decoding.reasoning import (ReasoningParser, ThinkMarkers, ThinkingBudgetWarning, forced_token,
                                     parser_markers, split_reasoning, starts_in_thinking, thinking_ids)
from dsr1.errors import Dsr1Error
from dsr1.interfaces import SamplingParams
from tests.engine.conftest import make_checkpoint, write_tokenizer

#: DeepSeek-R1's way: the generation prompt opens the thinking block.
THINK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)

CASES: dict[str, tuple[str, bool, str, str]] = {
    # name: (text, starts in thinking, reasoning, answer)
    "plain": ("just an answer", False, "", "just an answer"),
    "plain-leading-space": ("  spaced", False, "", "  spaced"),
    "block": ("<think>\nhmm, 2+2</think>\n\n4", False, "hmm, 2+2", "4"),
    "r1-prompt": ("hmm, 2+2\n</think>\n\n4", True, "hmm, 2+2\n", "4"),
    "r1-prompt-redundant-start": ("<think>hmm</think>4", True, "hmm", "4"),
    "unclosed": ("<think>still thinking", False, "still thinking", ""),
    "no-end-in-thinking": ("all reasoning", True, "all reasoning", ""),
    "text-before-block": ("a <think>b</think>c", False, "b", "a c"),
    "two-blocks": ("<think>x</think>y<think>z</think>w", False, "xz", "yw"),
    "almost-marker": ("a <thin b </think", False, "", "a <thin b </think"),
    "almost-end": ("<think>a </thin> b", False, "a </thin> b", ""),
}


@pytest.mark.parametrize("name", CASES)
def test_split_cases(name: str) -> None:
    text, thinking, reasoning, answer = CASES[name]
    assert split_reasoning(text, in_thinking=thinking) == (reasoning, answer)


def _streamed(pieces: list[str], markers: ThinkMarkers, thinking: bool) -> tuple[str, str, str, str]:
    parser = ReasoningParser(markers, thinking)
    r = a = ""
    for piece in pieces:
        dr, da = parser.feed(piece)
        r, a = r + dr, a + da
    dr, da = parser.flush()
    return r + dr, a + da, parser.reasoning, parser.answer


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_split_into_deltas_gives_the_whole_text_split(data: Any) -> None:
    markers = data.draw(st.sampled_from([ThinkMarkers(), ThinkMarkers("[[", "]]"), ThinkMarkers("aab", "abb")]))
    alphabet = st.sampled_from(["<think>", "</think>", "<", "</", "think", ">", " ", "\n", "x", "y", "[[", "]]",
                                "[", "]", "a", "b", "aab", "abb"])
    text = "".join(data.draw(st.lists(alphabet, max_size=30)))
    thinking = data.draw(st.booleans())
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    whole = split_reasoning(text, markers, thinking)
    r, a, r_acc, a_acc = _streamed(pieces, markers, thinking)
    assert (r, a) == whole == (r_acc, a_acc)


def test_marker_split_over_deltas_is_held_back() -> None:
    parser = ReasoningParser()
    assert parser.feed("answer <th") == ("", "answer ")  # "<th" may begin "<think>": held
    assert parser.feed("ink>why") == ("why", "")
    assert parser.feed("</") == ("", "")
    assert parser.feed("think> ok") == ("", "ok")


def test_markers_and_parser_names() -> None:
    assert starts_in_thinking("<|assistant|><think>\n")
    assert not starts_in_thinking("<|assistant|><think>\nhi</think>")
    assert parser_markers("deepseek_r1") == ThinkMarkers()
    with pytest.raises(Dsr1Error, match="unknown reasoning parser 'deepseek-r1'; did you mean 'deepseek_r1'"):
        parser_markers("deepseek-r1")
    with pytest.raises(Dsr1Error, match="must differ"):
        ThinkMarkers("<t>", "<t>")


# --- the budget on ids ----------------------------------------------------------------------------

S, E = [7], [8]


def test_forced_token_rules() -> None:
    assert forced_token([1, 2, 3], 2, S, E) is None  # no block
    assert forced_token([7, 1], 2, S, E) is None  # one token in
    assert forced_token([7, 1, 2], 2, S, E) == 8  # full: close it
    assert forced_token([7, 1, 2, 8, 5, 5, 5], 2, S, E) is None  # closed: the answer is free
    assert forced_token([7, 1, 8, 7, 1, 2], 2, S, E) == 8  # a second block has its own budget
    assert forced_token([7], 0, S, E) == 8  # budget 0: no thinking at all
    # a marker of several ids: forced one per step, a started one continued
    assert forced_token([7, 1, 2], 2, S, [8, 9, 10]) == 8
    assert forced_token([7, 1, 2, 8], 2, S, [8, 9, 10]) == 9
    assert forced_token([7, 1, 2, 8, 9], 2, S, [8, 9, 10]) == 10
    assert forced_token([7, 1, 2, 8, 9, 10], 2, S, [8, 9, 10]) is None
    assert forced_token([7, 8, 1], 3, S, [8, 9, 10]) is None  # the model's own "8" mid-block is just a token


def test_max_thinking_tokens_is_range_checked() -> None:
    assert SamplingParams(max_thinking_tokens=0).max_thinking_tokens == 0
    with pytest.raises(Dsr1Error, match="sampling parameter 'max_thinking_tokens' must be an integer >= 0"):
        SamplingParams(max_thinking_tokens=-1)
    with pytest.raises(Dsr1Error, match="max_thinking_tokens"):
        SamplingParams(max_thinking_tokens=True)


# --- a tiny reasoning model -----------------------------------------------------------------------


def make_reasoning_checkpoint(out: Path) -> Path:
    """A random tiny Llama whose vocabulary holds the thinking markers."""
    vocab = write_tokenizer(out / "_tok", vocab_size=300, added=("<think>", "</think>"), chat_template=THINK_TEMPLATE)
    make_checkpoint(out, "llama", vocab=vocab, tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((out / "_tok" / name).read_bytes())
    return out


@pytest.fixture(scope="module")
def think_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_reasoning_checkpoint(tmp_path_factory.mktemp("think") / "llama-think")


def _prompt(tokenizer: Any) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is a list?"}],
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _engine(path: Path) -> Any:
    from dsr1.engine import Engine

    return Engine.from_pretrained(path, num_blocks=64)


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_budget_forces_the_end_marker_on_the_engine(think_ckpt: Path, sample: bool) -> None:
    engine = _engine(think_ckpt)
    tok = engine.tokenizer
    end = tok.convert_tokens_to_ids("</think>")
    ids = _prompt(tok)
    assert tok.decode(ids[-2:]) == "<think>\n"
    extra = {"do_sample": True, "temperature": 1.0, "seed": 3} if sample else {}
    free = engine.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True, **extra))[0]
    assert end not in free.output_ids[:6]  # the random model does not close the block by itself this soon
    budget = 4
    out = engine.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True, max_thinking_tokens=budget,
                                                **extra))[0]
    # the prompt's "\n" after <think> is in the block: budget - 1 output tokens of thinking, then </think>
    assert out.output_ids.index(end) == budget - 1
    assert out.output_ids[: budget - 1] == free.output_ids[: budget - 1]
    assert len(out.output_ids) == 12 and out.output_ids.count(end) == 1  # the answer follows freely


def test_reasoning_split_on_engine_outputs(think_ckpt: Path) -> None:
    engine = _engine(think_ckpt)
    engine.reasoning = ThinkMarkers()
    ids = _prompt(engine.tokenizer)
    rid = engine.add_request(ids, SamplingParams(max_tokens=10, ignore_eos=True, max_thinking_tokens=3))
    r = a = ""
    last = None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            r, a = r + (out.reasoning_delta or ""), a + (out.answer_delta or "")
            last = out
    assert last is not None and last.finished
    assert (last.reasoning, last.answer) == (r, a) == split_reasoning(last.text, in_thinking=True)
    assert "</think>" in last.text and "</think>" not in r + a and r


def test_budget_through_model_generate(think_ckpt: Path) -> None:
    import torch

    from dsr1.auto import AutoModel

    model = AutoModel.from_pretrained(think_ckpt)
    tok = model.tokenizer
    end = tok.convert_tokens_to_ids("</think>")
    ids = _prompt(tok)
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, ignore_eos=True, max_thinking_tokens=2)
    new = out[0, len(ids):].tolist()
    assert new.index(end) == 1 and new.count(end) == 1


def test_budget_without_markers_warns_and_is_ignored(ckpts: dict[str, Path]) -> None:
    import torch

    from dsr1.auto import AutoModel

    model = AutoModel.from_pretrained(ckpts["llama"])  # the plain tokenizer: no <think>
    assert thinking_ids(model.tokenizer) is None
    ids = model.tokenizer.encode("The Python interpreter")
    plain = model.generate(torch.tensor([ids]), max_new_tokens=6, ignore_eos=True)
    with pytest.warns(ThinkingBudgetWarning, match="max_thinking_tokens is ignored: the tokenizer has no thinking"):
        budgeted = model.generate(torch.tensor([ids]), max_new_tokens=6, ignore_eos=True, max_thinking_tokens=1)
    assert torch.equal(plain, budgeted)
    engine = _engine(ckpts["llama"])
    with pytest.warns(ThinkingBudgetWarning):
        out = engine.generate([ids], SamplingParams(max_tokens=6, ignore_eos=True, max_thinking_tokens=1))[0]
    assert out.output_ids == plain[0, len(ids):].tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no budget, no warning
        engine.generate([ids], SamplingParams(max_tokens=2))


def test_chat_shows_thinking_apart_and_keeps_only_the_answer(think_ckpt: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from dsr1.commands import chat
    from dsr1.engine import AsyncEngine

    engine = _engine(think_ckpt)
    engine.reasoning = ThinkMarkers()  # what dsr1 chat sets for a tokenizer with thinking markers
    ids = _prompt(engine.tokenizer)
    params = SamplingParams(max_tokens=10, ignore_eos=True, max_thinking_tokens=3)
    want = engine.generate([ids], params)[0]
    assert want.reasoning and want.answer
    async_engine = AsyncEngine(engine)
    try:
        capsys.readouterr()
        kept = chat._answer(async_engine, ids, params)
    finally:
        async_engine.shutdown()
    printed = capsys.readouterr().out
    assert kept == want.answer  # the history gets the answer only
    assert printed == f"{chat.THINK_LABEL}{want.reasoning}{chat.ANSWER_LABEL}{want.answer}\n"


def test_generate_json_has_reasoning(think_ckpt: Path, ckpts: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from dsr1.cli import main

    args = ["generate", "--json", "--max-new-tokens", "8", "--max-thinking-tokens", "2"]
    assert main([*args, "--model", str(think_ckpt), "--chat", "What is a list?"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "</think>" in report["text"]
    assert (report["reasoning"], report["answer"]) == split_reasoning(report["text"], in_thinking=True)
    with pytest.warns(ThinkingBudgetWarning):
        assert main([*args, "--model", str(ckpts["llama"]), "The Python interpreter"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reasoning"] is None and report["answer"] is None
    assert main([*args[:-2], "--max-thinking-tokens", "-1", "--model", str(ckpts["llama"]), "x"]) == 2
    assert "--max-thinking-tokens must be an integer >= 0" in capsys.readouterr().err
