"""What every handler shares: who is calling, what a handler answers, and how storage
failures become protocol errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from storage.base import NotStored, StorageUnavailable

from .errors import NotFound, ProtocolError, Unavailable
from .outbox import Out
from .protocol import Event

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated device a request comes from."""

    user_id: str
    device_id: str


@dataclass(slots=True)
class Result:
    """A handler's answer: the reply for the caller (if any) and what to publish after it."""

    reply: Event | None = None
    outs: list[Out] = field(default_factory=list)


class DoneInPart(Exception):
    """A request failed (``failure``) after part of it was done: ``outs``, what that part tells,
    go out all the same, with the error reply (``ProtocolError.outs``)."""

    def __init__(self, failure: Exception, outs: list[Out]) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.outs = outs


@asynccontextmanager
async def storage_errors() -> AsyncIterator[None]:
    """Convert storage failures into the protocol's codes at the handler boundary."""
    try:
        yield
    except DoneInPart as exc:
        shown = _shown(exc.failure)
        if shown is exc.failure:  # (as it is, telling nothing: an internal fault is answered as one)
            raise shown from shown.__cause__
        if isinstance(shown, ProtocolError):  # (made here: no other request holds it)
            shown.outs = [*exc.outs, *shown.outs]
        raise shown from exc.failure
    except (StorageUnavailable, NotStored) as exc:
        raise _shown(exc) from exc


def _shown(exc: Exception) -> Exception:
    """What a client is shown of a failure: the protocol's code for a storage failure."""
    if isinstance(exc, StorageUnavailable):
        log.warning("store unavailable: %s", exc)
        return Unavailable("the server could not store this; it was not accepted, retry later")
    if isinstance(exc, NotStored):
        return NotFound("not found")
    return exc
