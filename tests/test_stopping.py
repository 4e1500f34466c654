"""storage/stopping.py: background tasks end when their owner closes, even when a cancellation
is lost on the way (as redis-py loses one that comes while it reads a reply)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from storage.stopping import stop_tasks


def loses_cancellations(times: int, ended: list[str], stop: asyncio.Event | None = None) -> asyncio.Task[None]:
    """A loop that goes on after its first ``times`` cancellations (until ``stop`` is set), as a
    blocking pop whose library took the cancellation returns as if none had come."""

    async def loop() -> None:
        lost = 0
        try:
            while stop is None or not stop.is_set():
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    if lost == times:
                        raise
                    lost += 1
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
        finally:
            ended.append("ended")

    return asyncio.create_task(loop(), name="pops")


async def test_a_task_that_lost_its_cancellation_is_cancelled_again_until_it_ends() -> None:
    ended: list[str] = []
    task = loses_cancellations(2, ended)
    await asyncio.sleep(0.01)
    await asyncio.wait_for(stop_tasks([task], "closing"), 5)
    assert task.done() and task.cancelled() and ended == ["ended"]


async def test_tasks_that_end_at_once_are_waited_for_and_their_errors_taken() -> None:
    async def fails() -> None:
        raise RuntimeError("its own")

    quiet, failing = asyncio.create_task(asyncio.sleep(10)), asyncio.create_task(fails())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_tasks([quiet, failing, quiet], "closing"), 1)
    assert quiet.cancelled() and isinstance(failing.exception(), RuntimeError)
    await stop_tasks([], "closing")  # nothing to stop


async def test_a_task_that_never_ends_is_left_after_the_bound_and_named_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    ended: list[str] = []
    stop = asyncio.Event()
    task = loses_cancellations(10**6, ended, stop)
    await asyncio.sleep(0.01)
    caplog.set_level(logging.WARNING, logger="storage.stopping")
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(stop_tasks([task], "closing the thing", bound_s=1.2), 5)
    assert 1.1 < asyncio.get_running_loop().time() - started < 3
    assert not task.done()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "went on after their cancellation (pops)" in logged
    assert "closing the thing: pops still runs" in logged and "test_stopping.py" in logged
    stop.set()  # (it would never end by itself)
    await asyncio.wait_for(task, 1)
    assert ended == ["ended"]


async def test_stopping_that_is_itself_cancelled_still_stops_its_tasks_first() -> None:
    """A loop stopping its own helper in a ``finally`` while it is being stopped the same way:
    the second cancellation reaches it while its helper still runs (the helper lost its first
    one). It stops the helper anyway, then ends cancelled."""
    ended: list[str] = []
    helper = loses_cancellations(1, ended)

    async def owner() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            await stop_tasks([helper], "stopping the owner's helper")

    task = asyncio.create_task(owner())
    await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.sleep(0.1)  # (the helper went on after its first cancellation)
    task.cancel()  # (as the one stopping the owner does again)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert helper.done() and ended == ["ended"]
