"""Held-out and calibration text: the default is dsr1-tiny's corpus, split the way it was trained."""
from __future__ import annotations

import torch

from dsr1.preprocess.hf_tokenizer import Tokenizer
from dsr1.pruning import data
from tests.pruning.conftest import TINY


def test_default_split_is_dsr1_tinys() -> None:
    from tools import tiny_corpus

    train, held = data.split_documents()
    assert (train, held) == tuple(tiny_corpus.split_documents())
    tok = Tokenizer.from_dir(TINY)
    stream = data.heldout_stream(None, tok, 500)
    assert stream.shape == (500,) and int(stream[0]) == tok.bos_token_id
    full = data.token_stream(tok, held)
    assert torch.equal(stream, full[:500])


def test_calibration_never_reads_the_held_out_text() -> None:
    tok = Tokenizer.from_dir(TINY)
    windows = data.calibration_windows(None, tok, samples=4, seq_len=64)
    assert len(windows) == 4 and all(w.shape == (1, 64) for w in windows)
    held = data.token_stream(tok, data.split_documents()[1][:3]).tolist()
    text = " ".join(map(str, held))
    assert all(" ".join(map(str, w[0, :32].tolist())) not in text for w in windows)


def test_windows_are_spread_and_bounded() -> None:
    stream = torch.arange(1000)
    got = data.windows(stream, 3, 100)
    assert [int(w[0, 0]) for w in got] == [0, 450, 900] and all(w.shape == (1, 100) for w in got)
    assert data.windows(torch.arange(50), 3, 100)[0].shape == (1, 50)
    assert data.windows(torch.arange(1), 3, 100) == []


def test_sentences() -> None:
    doc = "Short. This sentence is long enough to be kept by the filter! And so is this one, surely, with more words?"
    assert data.sentences([doc], 5) == ["This sentence is long enough to be kept by the filter!",
                                        "And so is this one, surely, with more words?"]
