"""Request bodies → ``SamplingParams``, without a server: every accepted field acts, every other
one is refused with the field's name, and the output budget follows the context."""
from __future__ import annotations

from typing import Any

import pytest

from dsr1.interfaces import SamplingParams
from dsr1.serve.openai_schema import (BadRequest, ChatCompletionRequest, CompletionRequest, check_unsupported,
                                      decide_max_tokens, messages_of, parse, prompt_of, sampling_params)

GREEDY = SamplingParams()  # a checkpoint without sampling defaults
SAMPLING = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9})


def completion(**fields: Any) -> CompletionRequest:
    req = parse(CompletionRequest, {"model": "m", "prompt": "x", **fields})
    check_unsupported(req)
    return req  # type: ignore[no-any-return]


def test_fields_map_onto_sampling_params() -> None:
    p = sampling_params(completion(temperature=0.7, top_p=0.5, top_k=-1, min_p=0.1, seed=3, stop="END",
                                   presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
                                   stop_token_ids=[7], ignore_eos=True, logprobs=2), GREEDY, 10)
    assert (p.do_sample, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (True, 0.7, 0.5, 0, 0.1, 3)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs, p.max_tokens) == (["END"], [7], True, 2, 10)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.2)


def test_left_out_fields_take_the_models_defaults() -> None:
    assert sampling_params(completion(), GREEDY, 4).greedy
    p = sampling_params(completion(), SAMPLING, 4)
    assert (p.do_sample, p.temperature, p.top_p) == (True, 0.6, 0.9)
    assert sampling_params(completion(temperature=0), SAMPLING, 4).greedy  # the request wins


def test_chat_logprobs() -> None:
    req = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "logprobs": True, "top_logprobs": 3})
    assert sampling_params(req, GREEDY, 4).logprobs == 3
    assert messages_of(req) == [{"role": "user", "content": "ab"}]


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "unknown field": ({"suffix": "x"}, "suffix"),
    "n": ({"n": 3}, "n"),
    "best_of": ({"best_of": 2}, "best_of"),
    "top_k while greedy": ({"top_k": 5}, "top_k"),
    "min_p while greedy": ({"min_p": 0.2}, "min_p"),
    "bool where a number belongs": ({"max_tokens": True}, "max_tokens"),
    "nan": ({"temperature": float("nan")}, "temperature"),
    "stream_options without stream": ({"stream_options": {"include_usage": True}}, "stream_options"),
    "too many stops": ({"stop": [str(i) for i in range(17)]}, "stop"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_refusals_name_the_field(name: str) -> None:
    fields, param = BAD[name]
    with pytest.raises(BadRequest) as info:
        sampling_params(completion(**fields), GREEDY, 4)
    assert info.value.param == param and info.value.status == 400


def test_one_prompt_per_request() -> None:
    assert prompt_of(completion(prompt=["only"])) == "only"
    assert prompt_of(completion(prompt=[[1, 2]])) == [1, 2]
    with pytest.raises(BadRequest, match="one prompt per request"):
        prompt_of(completion(prompt=["a", "b"]))
    with pytest.raises(BadRequest, match="empty"):
        prompt_of(completion(prompt=""))


def test_output_budget_follows_the_context() -> None:
    assert decide_max_tokens(completion(), 10, 512) == 16  # OpenAI's completions default
    assert decide_max_tokens(completion(), 505, 512) == 7  # the default, within the room left
    chat = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert decide_max_tokens(chat, 12, 512) == 500  # chat: up to the context
    with pytest.raises(BadRequest, match="512 tokens") as info:
        decide_max_tokens(completion(), 512, 512)
    assert "512" in str(info.value) and info.value.code == "context_length_exceeded"
    with pytest.raises(BadRequest, match="100 tokens and max_tokens is 500") as info:
        decide_max_tokens(completion(max_tokens=500), 100, 512)
    assert info.value.param == "max_tokens"
    both = parse(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                         "max_tokens": 5, "max_completion_tokens": 6})
    with pytest.raises(BadRequest, match="disagree"):
        decide_max_tokens(both, 1, 512)
