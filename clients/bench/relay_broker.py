"""The embedded broker on its own, for the baseline: the same broker class, listener and
plugin chain ``pigeon serve`` runs, with no bridge behind it.

Any client may connect with the password this process prints; clients may publish and
subscribe under ``bench/`` only. Run as ``python -m clients.bench.relay_broker``; it prints
``relay ready PORT PASSWORD`` and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import signal

from broker.embedded import PigeonBroker, broker_config
from broker.gate import ConnectDecision, DeviceGate, Principal, Refusal

PREFIX = "bench/"


class RelayGate(DeviceGate):
    def __init__(self, password: str) -> None:
        super().__init__(self._no_tokens)
        self._password = password

    @staticmethod
    async def _no_tokens(token: str) -> tuple[str, str] | None:
        return None

    async def connect(self, client_id: str, username: str | None, password: str | None,
                      will_topic: str | None) -> ConnectDecision:
        if password is None or not hmac.compare_digest(password, self._password):
            return ConnectDecision.refuse(Refusal.BAD_CREDENTIALS, "wrong password")
        return ConnectDecision.accept(Principal(username or "", client_id))

    @staticmethod
    def may_publish(p: Principal, topic: str) -> bool:
        return topic.startswith(PREFIX)

    @staticmethod
    def may_subscribe(p: Principal, topic_filter: str) -> bool:
        return topic_filter.startswith(PREFIX) and "#" not in topic_filter and "+" not in topic_filter

    @staticmethod
    def may_receive(p: Principal, topic: str) -> bool:
        return topic.startswith(PREFIX)


async def run() -> None:
    password = secrets.token_urlsafe(16)
    gate = RelayGate(password)
    broker = PigeonBroker(broker_config("127.0.0.1", 0, 0, gate), gate)
    await broker.start()
    port = broker._servers["default"].instance.sockets[0].getsockname()[1]  # noqa: SLF001
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"relay ready {port} {password}", flush=True)
    await stop.wait()
    await broker.shutdown()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("amqtt", "transitions", "websockets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    asyncio.run(run())


if __name__ == "__main__":
    main()
