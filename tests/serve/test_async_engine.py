"""What the server needs of ``AsyncEngine``: admission decided on the loop (queue bound, refusals
before any output), aborts that free blocks at once (a closed stream, ``abort_all``, a caller whose
event loop went away), and a stats snapshot that is current when a final output arrives."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from dsr1.engine import AsyncEngine, Engine
from dsr1.engine.async_engine import QueueFull
from dsr1.errors import Dsr1Error
from dsr1.interfaces import SamplingParams

LONG = SamplingParams(max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def engine() -> Iterator[AsyncEngine]:
    e = AsyncEngine(Engine.from_pretrained("dsr1-tiny", scheduler={"name": "continuous",
                                                                  "options": {"max_num_seqs": 1}}))
    yield e
    e.abort_all()
    e.shutdown()


def idle(engine: AsyncEngine, within_s: float = 10.0) -> dict[str, int]:
    deadline = time.monotonic() + within_s
    while engine.stats()["live"] or engine.stats()["running"]:
        assert time.monotonic() < deadline, dict(engine.stats())
        time.sleep(0.01)
    engine.engine.blocks.check()
    return dict(engine.stats())


def test_queue_bound_refusals_and_aborts(engine: AsyncEngine) -> None:
    async def main() -> None:
        first = await engine.submit([5, 6, 7], LONG, max_waiting=1)
        await first.__anext__()  # running (one at a time)
        second = await engine.submit([5, 6, 8], LONG, max_waiting=1)  # waits
        with pytest.raises(QueueFull, match="1 requests waiting, the limit is 1"):
            await engine.submit([5, 6, 9], LONG, max_waiting=1)
        with pytest.raises(Dsr1Error, match="vocabulary"):  # refused before any output
            await engine.submit([5, 10**6], LONG)
        await second.aclose()
        await first.aclose()
        reasons = [out.finish_reason async for out in first]  # closed: nothing more comes
        assert reasons == []

    asyncio.run(main())
    assert idle(engine)["blocks_used"] == 0


def test_abort_all_ends_every_stream_with_abort(engine: AsyncEngine) -> None:
    async def main() -> list[str | None]:
        streams = [await engine.submit([5, 6, i], LONG) for i in (7, 8)]
        await streams[0].__anext__()
        engine.abort_all()
        return [[out async for out in s][-1].finish_reason for s in streams]

    assert asyncio.run(main()) == ["abort", "abort"]
    assert idle(engine)["blocks_used"] == 0


def test_a_caller_whose_event_loop_closed_is_aborted_and_the_loop_lives_on(engine: AsyncEngine) -> None:
    async def leave_without_closing() -> None:
        stream = await engine.submit([5, 6, 7], LONG)
        await stream.__anext__()

    asyncio.run(leave_without_closing())  # closes the event loop with the request live
    assert idle(engine)["blocks_used"] == 0
    assert engine.alive and engine.generate_sync([5, 6], SamplingParams(max_tokens=2)).finished


def test_the_snapshot_is_current_when_the_final_output_arrives(engine: AsyncEngine) -> None:
    for out in engine.stream_sync([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True)):
        stats = engine.stats()
        # before the last output the loop may already have run ahead of this consumer and finished the request
        assert stats["running"] in ((0,) if out.finished else (0, 1))
    assert out.finished and stats["running"] == 0 and stats["blocks_used"] == 0


def test_leaving_a_sync_stream_early_aborts_it(engine: AsyncEngine) -> None:
    stream = engine.stream_sync([5, 6, 7], LONG)
    next(stream)
    stream.close()
    assert idle(engine)["blocks_used"] == 0


def test_a_slow_reader_gets_the_outputs_that_piled_up_joined(engine: AsyncEngine) -> None:
    """A reader that falls behind receives fewer, joined outputs carrying every token once, in order."""
    params = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0)
    alone = engine.generate_sync([5, 6, 7], params)

    async def main() -> list[list[int]]:
        stream = await engine.submit([5, 6, 7], params)
        pieces = []
        async for out in stream:
            pieces.append(out.new_ids)
            if len(pieces) == 1:
                await asyncio.sleep(0.5)  # the engine runs ahead while this reader is busy
        return pieces

    pieces = asyncio.run(main())
    assert [t for p in pieces for t in p] == list(alone.output_ids)
    assert len(pieces) < len(alone.output_ids) and max(len(p) for p in pieces) > 1
    assert idle(engine)["blocks_used"] == 0
