"""What every handler shares: who is calling, what a handler answers, and how storage
failures become protocol errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from storage.base import NotStored, StorageUnavailable

from .errors import NotFound, Unavailable
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


@asynccontextmanager
async def storage_errors() -> AsyncIterator[None]:
    """Convert storage failures into the protocol's codes at the handler boundary."""
    try:
        yield
    except StorageUnavailable as exc:
        log.warning("store unavailable: %s", exc)
        raise Unavailable("the server could not store this; it was not accepted, retry later") from exc
    except NotStored as exc:
        raise NotFound("not found") from exc
