"""A ``sync`` reply of several megabytes reaches the device on every profile.

A batch holds up to 1,000 inbox events of up to 16,000 characters of body each, so its one MQTT
PUBLISH can be tens of megabytes. Mosquitto 2.1 limits every packet it receives, the bridge's
own publishes too, to ``max_packet_size`` (2,000,000 bytes unless set; it cannot be turned off),
which a batch like this one passes (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import NewUser

BODY_CHARS = 15_000  # under the protocol's 16,000 characters
MESSAGES = 150  # 150 × 15 kB: a batch of about 2.3 MB


async def test_a_sync_batch_of_several_megabytes_reaches_the_device(new_user: NewUser, connect: Any) -> None:
    alice, bob = await new_user(), await new_user()
    da = await connect(alice)
    for i in range(MESSAGES):
        await da.send(f"{i:03d}" + "x" * BODY_CHARS, to=bob.user_id)
    db = await connect(bob)  # connecting syncs from the cursor: one batch of every message
    async with asyncio.timeout(60):
        while db.cursor < MESSAGES:
            await db.sync()
    bodies = []
    while len(bodies) < MESSAGES:
        ev = await db.next_event(timeout=10)
        if ev["type"] == "msg":
            bodies.append(ev["body"][:3])
    assert bodies == [f"{i:03d}" for i in range(MESSAGES)]
