#!/usr/bin/env python3
"""Size and speed of protocol v2's candidate encodings on real events (docs/protocol.md, v2).

Encodes the events a delivered text causes (a 20-character ``msg`` to the peer, the sender's
``sent``, a ``delivered`` receipt) and a 20-event ``batch``, as v1 JSON, and as v2 arrays in
MessagePack (msgpack) and CBOR (cbor2); prints bytes, and encode and decode time (best of 7).
Not a test: run it by hand (``python scripts/measure_encodings.py``) after ``pip install cbor2``.
"""

from __future__ import annotations

import json
import timeit

import cbor2
import msgpack

from bridge.protocol import Batch, ChatMessage, MsgEvent, ReceiptEvent, Sent
from bridge.wire import encode_v1
from bridge.wire_v2 import to_array

ALICE, BOB, CHAT = "u_" + "1" * 16, "u_" + "2" * 16, "c_" + "3" * 16
TEXT = ChatMessage(chat=CHAT, seq=1234, id="f" * 32, sender=ALICE, device="d_" + "4" * 16, ts=1_764_500_000_000,
                   kind="text", body="twenty characters!!!")
EVENTS = {
    "msg (to the peer)": (MsgEvent(4321, TEXT), BOB),
    "sent": (Sent(id="f" * 32, chat=CHAT, seq=1234, ts=1_764_500_000_000), ALICE),
    "receipt": (ReceiptEvent(inbox=999, chat=CHAT, user=BOB, kind="delivered", up_to=1234), ALICE),
    "batch of 20 msgs": (Batch(id="s1", events=tuple(MsgEvent(100 + i, TEXT) for i in range(20)), last=119,
                               more=False), BOB),
}


def best(f: object, n: int) -> float:
    return min(timeit.repeat(f, number=n, repeat=7)) / n * 1e6  # type: ignore[arg-type]


def main() -> None:
    pack = msgpack.Packer(use_bin_type=True).pack
    print(f"{'event':20} {'json B':>7} {'msgpack B':>9} {'cbor B':>7}   encode us (json/msgpack/cbor)   decode us")
    for name, (ev, user) in EVENTS.items():
        arr = to_array(ev, user)  # type: ignore[arg-type]
        j, m, c = encode_v1(ev), pack(arr), cbor2.dumps(arr)  # type: ignore[arg-type]
        n = 2_000 if "batch" in name else 50_000
        enc = (best(lambda ev=ev: encode_v1(ev), n),  # type: ignore[misc]
               best(lambda ev=ev, u=user: pack(to_array(ev, u)), n),  # type: ignore[misc]
               best(lambda ev=ev, u=user: cbor2.dumps(to_array(ev, u)), n))  # type: ignore[misc]
        dec = (best(lambda j=j: json.loads(j), n), best(lambda m=m: msgpack.unpackb(m), n),  # type: ignore[misc]
               best(lambda c=c: cbor2.loads(c), n))  # type: ignore[misc]
        print(f"{name:20} {len(j):7} {len(m):9} {len(c):7}   {enc[0]:6.2f} {enc[1]:6.2f} {enc[2]:6.2f}"
              f"          {dec[0]:6.2f} {dec[1]:6.2f} {dec[2]:6.2f}")


if __name__ == "__main__":
    main()
