"""What a bridge's requests left unfinished, handed to the next holder of the users' partitions.

When the store fails part way through a read or an ack, the receipt may have moved already
while its notice was not appended (or, for an ack, some chats' receipts were not moved): the
request's retry finds nothing left to move, and only the bridge that failed knows what is still
to be told (``Messenger._untold`` and ``_acks_unfinished``). With several bridges the retry
may reach another one, because the user's partition moved (a rebalance, a takeover) or the
bridge died. So each such entry is also recorded in the shared state under the user's
partition, before the request is answered ``unavailable``, forgotten there once a retry has
finished it, and adopted by a bridge each time it connects that partition's broker session,
before it takes in any of its publishes (as the devices' refusal windows are,
``bridge/admission.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from storage.state import UNFINISHED_KEPT_MS

from .admission import HANDOVER_WAIT_S

if TYPE_CHECKING:
    from storage.state import SharedState

    from .messaging import Messenger
    from .mqtt_ingest import Partitions

log = logging.getLogger(__name__)


class ReceiptHandover:
    """The ``Keeper`` of a bridge's Messenger, and what adopts a partition's records into it.

    Each record carries when it was written (ms since the epoch, then a space, then what the
    Messenger kept). One older than UNFINISHED_KEPT_MS, or one the Messenger cannot read, is
    dropped from the shared state when a partition is adopted, not adopted again each time."""

    def __init__(self, state: SharedState, partitions: Partitions, messenger: Messenger,
                 clock: Callable[[], float] = time.time) -> None:
        self._state, self._partitions, self._messenger = state, partitions, messenger
        self._clock = clock
        messenger.keeper = self

    async def keep(self, user_id: str, name: str, value: str | None) -> None:
        part = -1
        try:
            part = self._partitions.partition_of_user(user_id)
            stamped = None if value is None else f"{int(self._clock() * 1000)} {value}"
            async with asyncio.timeout(HANDOVER_WAIT_S):
                await self._state.put_unfinished(self._partitions.partition_scope, part, {name: stamped})
        except Exception as exc:  # noqa: BLE001 - it is kept here all the same
            log.warning("recording %.200s of partition %d as %s failed: %r", name, part,
                        "finished" if value is None else "unfinished", exc)

    async def adopt(self, part: int) -> None:
        """Adopt what was recorded for a partition (its session is being connected here)."""
        scope = self._partitions.partition_scope
        try:
            async with asyncio.timeout(HANDOVER_WAIT_S):
                recorded = await self._state.unfinished(scope, part)
        except Exception as exc:  # noqa: BLE001 - taken over without them
            log.warning("reading the unfinished requests of partition %d failed: %r", part, exc)
            return
        now = int(self._clock() * 1000)
        current: dict[str, str] = {}
        dropped: list[str] = []
        for name, stamped in recorded.items():
            written, _, value = stamped.partition(" ")
            # (a time of ASCII digits, as written: int() takes others, and one far ahead would never age)
            if written.isascii() and written.isdigit() and len(written) <= 15 \
                    and abs(int(written) - now) <= UNFINISHED_KEPT_MS:
                current[name] = value
            else:
                dropped.append(name)
        dropped += self._messenger.adopt_unfinished(current)
        if dropped:
            try:
                async with asyncio.timeout(HANDOVER_WAIT_S):
                    await self._state.put_unfinished(scope, part, dict.fromkeys(dropped))
            except Exception as exc:  # noqa: BLE001 - dropped the next time
                log.warning("dropping %d old or unreadable records of partition %d failed: %r", len(dropped),
                            part, exc)
