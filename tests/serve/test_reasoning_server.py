"""``dsr1 serve --reasoning-parser``: ``reasoning_content`` beside ``content`` (whole replies and
streams, through the official ``openai`` client), the ``max_thinking_tokens`` extra field, a plain
server unchanged, and a bad parser name refused in one line.

The model is the engine tests' tiny random Llama with ``<think>``/``</think>`` tokens and
DeepSeek-R1's template (the prompt ends with ``<think>\\n``): with a thinking budget the block is
closed after a known number of tokens, so the split is known exactly.
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve.conftest import REPO, ServerProcess, start_server

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dsr1[serve]')")
openai = pytest.importorskip("openai")

MODEL = "think"
MESSAGES = [{"role": "user", "content": "What is a list?"}]
#: the extra request field; the prompt's "\n" after <think> counts, so BUDGET - 1 tokens of thinking
BUDGET = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.engine.test_reasoning import make_reasoning_checkpoint

    return make_reasoning_checkpoint(tmp_path_factory.mktemp("serve-think") / "llama-think")


@pytest.fixture(scope="module")
def reasoning_client(ckpt: Path) -> Iterator[Any]:
    for server in start_server("--model", str(ckpt), "--served-model-name", MODEL, "--num-blocks", "64",
                               "--reasoning-parser", "deepseek_r1"):
        yield _client(server)


def _client(server: ServerProcess) -> Any:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=120, max_retries=0)


def _expected(ckpt: Path) -> tuple[str, str, str]:
    """The text the engine generates for MESSAGES under the budget, and its split."""
    from dsr1.decoding.reasoning import split_reasoning
    from dsr1.engine import Engine
    from dsr1.interfaces import SamplingParams

    engine = Engine.from_pretrained(ckpt, num_blocks=64)
    tok = engine.tokenizer
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    out = engine.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True, max_thinking_tokens=BUDGET))[0]
    reasoning, answer = split_reasoning(out.text, in_thinking=True)
    return out.text, reasoning, answer


def _ask(client: Any, **kw: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True, "max_thinking_tokens": BUDGET}, **kw)


def test_reasoning_content_whole_and_streamed(reasoning_client: Any, ckpt: Path) -> None:
    text, reasoning, answer = _expected(ckpt)
    assert "</think>" in text and reasoning and answer
    got = _ask(reasoning_client)
    message = got.choices[0].message
    assert message.reasoning_content == reasoning  # the openai client keeps fields it does not know
    assert message.content == answer
    r = a = ""
    for chunk in _ask(reasoning_client, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            r += getattr(delta, "reasoning_content", None) or ""
            a += delta.content or ""
    assert (r, a) == (reasoning, answer)


def test_without_the_parser_content_is_unchanged(ckpt: Path) -> None:
    text, _, _ = _expected(ckpt)
    for server in start_server("--model", str(ckpt), "--served-model-name", MODEL, "--num-blocks", "64"):
        got = _ask(_client(server))
        message = got.choices[0].message
        assert message.content == text  # the <think> block stays in the text
        assert getattr(message, "reasoning_content", None) is None


def test_bad_parser_name_is_one_line_and_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "dsr1.cli", "serve", "--reasoning-parser", "deepseek-r1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown reasoning parser 'deepseek-r1'; did you mean 'deepseek_r1'" in lines[0]
