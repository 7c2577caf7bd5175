"""KV caches inside a real model (dsr1-tiny): greedy parity, eviction past the budget,
padded batches, bad options as one-line errors, and selection from ``dsr1 generate --config``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.cli import main
from dsr1.errors import Dsr1Error
from dsr1.kvcache.evicting import EvictingKVCache

PROMPT = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61]])  # (1, 16)
NEW = 24


def tiny(kvcache: str, **options: Any) -> Any:
    return AutoModel.from_pretrained("dsr1-tiny", kvcache={"name": kvcache, "options": options})


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return tiny("contiguous").generate(PROMPT, max_new_tokens=NEW)  # (1, 16 + NEW)


@pytest.mark.parametrize(
    ("name", "options"),
    [("paged", {"block_size": 4}), ("paged", {"block_size": 16, "num_blocks": 3}), ("int8", {}),
     ("int8", {"paged": True, "block_size": 8})],
)
def test_greedy_matches_contiguous(reference: torch.Tensor, name: str, options: dict[str, Any]) -> None:
    out = tiny(name, **options).generate(PROMPT, max_new_tokens=NEW)
    if name == "paged":
        assert torch.equal(out, reference)
    else:  # int8: dequantized K/V, so the greedy path may drift late; the first tokens must agree
        agree = (out[0, 16:] == reference[0, 16:]).float().mean().item()
        assert torch.equal(out[0, 16:24], reference[0, 16:24]) and agree >= 0.75, (out, reference)


@pytest.mark.parametrize(
    ("name", "options", "kept"),
    [("streaming", {"sinks": 2, "window": 6}, 8), ("streaming", {"sinks": 0, "window": 5}, 5),
     ("heavy-hitter", {"budget": 8, "recent": 3}, 8), ("heavy-hitter", {"budget": 0.33, "recent": 4}, 13)],
)
def test_compressing_caches_run_past_budget(name: str, options: dict[str, Any], kept: int) -> None:
    model = tiny(name, **options)
    out = model.generate(PROMPT, max_new_tokens=NEW)
    assert out.shape == (1, 16 + NEW)
    cache = model.pipeline.kvcache
    assert isinstance(cache, EvictingKVCache)
    for layer in range(len(cache.n)):
        positions = cache.kept_positions(layer)
        assert positions.shape[1] == kept  # 16 + 23 = 39 slots written (the last token is not fed back)
        assert int(positions[0, -1]) == 16 + NEW - 2  # the last written slot is kept


def test_compressing_cache_keeps_everything_within_budget(reference: torch.Tensor) -> None:
    out = tiny("streaming", sinks=4, window=64).generate(PROMPT, max_new_tokens=NEW)
    assert torch.equal(out, reference)  # never evicts: exactly the full cache's tokens


@pytest.mark.parametrize(
    ("name", "options"),
    [("streaming", {"sinks": 2, "window": 6}), ("heavy-hitter", {"budget": 8, "recent": 3}),
     ("paged", {"block_size": 4}), ("int8", {"paged": True, "block_size": 4})],
)
def test_padded_batch_rows_match_single_rows(name: str, options: dict[str, Any]) -> None:
    model = tiny(name, **options)
    short = PROMPT[:, 6:]  # (1, 10)
    ids = torch.cat([torch.cat([torch.zeros(1, 6, dtype=torch.long), short], 1), PROMPT])  # (2, 16) left-padded
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    alone_short = model.generate(short, max_new_tokens=12)
    alone_long = model.generate(PROMPT, max_new_tokens=12)
    assert torch.equal(batch[0, 16:], alone_short[0, 10:])
    assert torch.equal(batch[1, 16:], alone_long[0, 16:])


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("streaming", {"window": 0}, "'kvcache.options.window'"),
        ("streaming", {"sinks": -1}, "'kvcache.options.sinks'"),
        ("heavy-hitter", {"budget": 1.5}, "budget must be a fraction in (0, 1]"),
        ("heavy-hitter", {"budget": 0.0}, "budget must be a fraction in (0, 1]"),
        ("heavy-hitter", {"budget": 0}, "budget must be a number of tokens >= 1"),
        ("paged", {"block_size": 6}, "block_size must be a power of two, e.g. 4 or 8"),
        ("int8", {"paged": True, "block_size": 12}, "block_size must be a power of two"),
        ("streaming", {"windw": 4}, "did you mean 'window'"),
    ],
)
def test_bad_options_are_one_line(name: str, options: dict[str, Any], message: str) -> None:
    with pytest.raises(Dsr1Error) as err:
        tiny(name, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["paged", "int8"])
def test_context_past_capacity_is_a_clear_error(name: str) -> None:
    options: dict[str, Any] = {"block_size": 4, "num_blocks": 5}
    if name == "int8":
        options["paged"] = True
    with pytest.raises(Dsr1Error, match=r"num_blocks=5 holds 20 tokens; raise kvcache.options.num_blocks to 10"):
        tiny(name, **options).generate(PROMPT, max_new_tokens=NEW)


def test_monitor_sees_kept_bytes() -> None:
    full = tiny("contiguous", granularity=1)
    full.generate(PROMPT, max_new_tokens=NEW)
    small = tiny("streaming", sinks=2, window=6)
    small.generate(PROMPT, max_new_tokens=NEW)
    assert 0 < small.pipeline.kvcache.nbytes() < full.pipeline.kvcache.nbytes() / 3


@pytest.mark.parametrize(
    ("yaml", "name"),
    [("kvcache:\n  name: streaming\n  options: {sinks: 4, window: 8}\n", "streaming"),
     ("kvcache:\n  name: heavy-hitter\n  options: {budget: 0.5}\n", "heavy-hitter"),
     ("kvcache: {name: int8, options: {paged: true, block_size: 8}}\n", "int8"),
     ("kvcache: paged\n", "paged")],
)
def test_selected_from_generate_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml: str,
                                       name: str) -> None:
    cfg = tmp_path / "engine.yaml"
    cfg.write_text(yaml)
    argv = ["generate", "--model", "dsr1-tiny", "--config", str(cfg), "--max-new-tokens", "20", "--json",
            "The Python interpreter reads the program"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"]["kvcache"]["name"] == name and report["new_tokens"] > 0


def test_generate_config_bad_window_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "engine.yaml"
    cfg.write_text("kvcache:\n  name: streaming\n  options: {window: -3}\n")
    assert main(["generate", "--model", "dsr1-tiny", "--config", str(cfg), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsr1: error: ") and "kvcache.options.window" in err and err.count("\n") == 1
