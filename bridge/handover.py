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
from typing import TYPE_CHECKING

from .admission import HANDOVER_WAIT_S

if TYPE_CHECKING:
    from storage.state import SharedState

    from .messaging import Messenger
    from .mqtt_ingest import Partitions

log = logging.getLogger(__name__)


class ReceiptHandover:
    """The ``Keeper`` of a bridge's Messenger, and what adopts a partition's records into it."""

    def __init__(self, state: SharedState, partitions: Partitions, messenger: Messenger) -> None:
        self._state, self._partitions, self._messenger = state, partitions, messenger
        messenger.keeper = self

    async def keep(self, user_id: str, name: str, value: str | None) -> None:
        part = self._partitions.partition_of_user(user_id)
        try:
            async with asyncio.timeout(HANDOVER_WAIT_S):
                await self._state.put_unfinished(self._partitions.partition_scope, part, {name: value})
        except Exception as exc:  # noqa: BLE001 - it is kept here all the same
            log.warning("recording %s of partition %d as %s failed: %r", name, part,
                        "finished" if value is None else "unfinished", exc)

    async def adopt(self, part: int) -> None:
        """Adopt what was recorded for a partition (its session is being connected here)."""
        try:
            async with asyncio.timeout(HANDOVER_WAIT_S):
                recorded = await self._state.unfinished(self._partitions.partition_scope, part)
        except Exception as exc:  # noqa: BLE001 - taken over without them
            log.warning("reading the unfinished requests of partition %d failed: %r", part, exc)
            return
        self._messenger.adopt_unfinished(recorded)
