"""``dsr1 chat`` driven through a pseudo-terminal: two turns whose answers are what
``model.generate`` gives for the templated history, Ctrl-C stopping an answer without leaving,
``/reset``, ``/exit``."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from tests.serve.conftest import REPO, SLOW_CLI, generate_text

pexpect = pytest.importorskip("pexpect")

PROMPT = "you> "
#: one intra-op thread, as for the servers (tests/serve/conftest.py says why)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def chat_ids(reference: Any, messages: list[dict[str, str]]) -> list[int]:
    text = reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(reference.tokenizer.encode(text, add_special_tokens=False))


def answer(child: Any, line: str) -> str:
    """Send ``line``, wait for the next prompt; what was printed in between (the echo left out)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    printed = child.before.replace("\r\n", "\n")
    assert printed.startswith(line + "\n")
    return str(printed[len(line) + 1:])


def test_two_turns_reset_interrupt_and_exit(reference: Any) -> None:
    system = "You answer questions about Python."
    child = pexpect.spawn(sys.executable, ["-m", "dsr1.cli", "chat", "--model", "dsr1-tiny", "--max-tokens", "8",
                                           "--system", system], cwd=str(REPO), encoding="utf-8", timeout=120,
                          dimensions=(24, 200), env=ENV)
    try:
        child.expect_exact(PROMPT)
        history = [{"role": "system", "content": system}, {"role": "user", "content": "What is a list?"}]
        first = answer(child, "What is a list?")
        want = generate_text(reference, chat_ids(reference, history), 8)
        assert first == want + "\n"
        history += [{"role": "assistant", "content": want}, {"role": "user", "content": "And a tuple?"}]
        second = answer(child, "And a tuple?")  # the template sees the first exchange too
        assert second == generate_text(reference, chat_ids(reference, history), 8) + "\n"
        assert "conversation cleared" in answer(child, "/reset")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_chat() -> None:
    # every engine step slowed (SLOW_CLI): the answer is surely still running when Ctrl-C arrives,
    # however fast the machine decodes dsr1-tiny; greedy, so the answer is the same long one every run
    # (a sampled answer could end at eos before the interrupt: an answer already ended prints no [stopped])
    child = pexpect.spawn(sys.executable, ["-c", SLOW_CLI, "0.02", "chat", "--model", "dsr1-tiny", "--max-tokens",
                                           "480", "--temperature", "0"], cwd=str(REPO), encoding="utf-8", timeout=120, env=ENV)
    try:
        child.expect_exact(PROMPT)
        child.sendline("Tell me about modules.")
        child.expect_exact("Tell me about modules.")
        child.expect(r"\S")  # the answer has started
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(PROMPT)  # still in the chat
        child.sendeof()  # Ctrl-D leaves too
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_history_is_trimmed_to_the_context_oldest_first(reference: Any) -> None:
    from dsr1.commands.chat import Conversation
    from dsr1.errors import Dsr1Error

    convo = Conversation(reference.tokenizer, context=128, max_tokens=32, system="Be brief.")
    for i in range(12):  # each exchange is ~20 tokens: the history outgrows 128 - 32
        ids, budget, dropped = convo.prompt(f"question number {i} about lists and tuples")
        assert len(ids) + 32 <= 128 and budget == 32
        convo.answered(f"answer number {i} about lists")
    assert dropped > 0 and dropped % 2 == 0
    assert convo.system and convo.turns[0]["role"] == "user"  # the system prompt stays, exchanges go whole
    assert convo.turns[-2]["content"].startswith("question number 11")
    with pytest.raises(Dsr1Error, match="shorten it"):
        convo.prompt("word " * 200)
    assert convo.turns[-1]["content"] == "answer number 11 about lists"  # the refused message is not kept
    convo.reset()
    assert convo.turns == []


def test_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on() -> None:
    # as `dsr1 generate -` says for its stdin; chat refuses that one message (as a message too long for the
    # context) and reads the next, so the conversation so far is not lost
    proc = subprocess.run([sys.executable, "-m", "dsr1.cli", "chat", "--max-tokens", "2"], cwd=str(REPO), env=ENV,
                          input=b"hi \xff\xfe there\n/exit\n", capture_output=True, timeout=120)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "Traceback" not in proc.stderr.decode()
    assert "dsr1: this message is not valid UTF-8 (byte 3); type or pipe it in UTF-8 (it was not sent)\n" in out


def test_not_utf8_names_the_byte() -> None:
    from dsr1.commands.chat import not_utf8

    assert not_utf8("héllo") is None
    assert not_utf8(b"h\xc3\xa9 \xff".decode("utf-8", "surrogateescape")) is not None
    assert "(byte 4)" in str(not_utf8(b"h\xc3\xa9 \xff".decode("utf-8", "surrogateescape")))
