"""Ending the background tasks of a store, a shared state or an ingest when it closes.

A cancellation can be lost. redis-py (8.2) takes one that arrives while it reads a reply and goes
on as if none had come: on this box about one blocking pop in fifteen, cancelled while another
client pushed to its list, went on waiting, and a second cancellation ended it. Python 3.11's
``wait_for`` likewise returns a result that arrived together with the cancellation. A loop that
lost its cancellation runs on, and a close that then waited for it waited for ever (a store's
close hung the test run's teardown for 300 s). So a task being stopped is cancelled again until
it has ended, and a close waits for it only so long.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)

STOP_AGAIN_S = 0.5  # a task still running this long after its cancellation is cancelled again
STOP_BOUND_S = 10.0  # past this, a close goes on without the tasks (each logged with where it runs)


async def stop_tasks(tasks: Iterable[asyncio.Future[Any]], what: str, bound_s: float = STOP_BOUND_S) -> None:
    """Cancel ``tasks`` and return once every one has ended, cancelling those still running again
    every STOP_AGAIN_S; past ``bound_s`` return anyway, logging each one left. Their outcomes
    are taken (an error they ended with is theirs to have logged). Cancelled meanwhile (the
    caller is being stopped the same way), it goes on stopping them first, then is cancelled."""
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    again, cancelled = 0, False
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            for task in pending:
                log.error("%s: %s still runs %.0f s after it was cancelled (%d times), at %s; going on without it",
                          what, _name(task), bound_s, again + 1, _where(task))
            break
        try:
            _, pending = await asyncio.wait(pending, timeout=min(STOP_AGAIN_S, left))
        except asyncio.CancelledError:
            cancelled = True  # (passed on once these are stopped)
            pending = {t for t in pending if not t.done()}
            continue
        if pending:
            again += 1
            if again == 1:
                log.warning("%s: %d task(s) went on after their cancellation (%s); cancelling again",
                            what, len(pending), ", ".join(_name(t) for t in pending))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # (taken: not reported again as never retrieved)
    if cancelled:
        raise asyncio.CancelledError


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)


def _where(task: asyncio.Future[Any]) -> str:
    """The chain of coroutines the task waits in, outermost first (``get_stack`` gives only
    the outermost)."""
    coro: Any = task.get_coro() if isinstance(task, asyncio.Task) else None
    chain = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None)
        if frame is not None:
            chain.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None)
    return " > ".join(chain) or "?"
