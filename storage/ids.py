"""The shape of the ids the stores make, in one place: a one-letter kind (``u`` user, ``d``
device, ``c`` direct chat, ``g`` group) and 64 random bits as 11 base-62 digits, least
significant first: 12 characters, safe as an MQTT topic level and client id. Protocol v2 sends
such an id as its 64 bits (bridge/wire_v2.py); ids made in another shape (16 hex digits before
2026-11-30) stay valid everywhere and go as they are."""

from __future__ import annotations

import secrets
from functools import lru_cache

ID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ID_DIGITS = 11  # 62**11 > 2**64: 64 random bits, as the 16 hex digits ids had before
_DIGIT = {c: i for i, c in enumerate(ID_ALPHABET)}
# the same ids go out and come in again and again (a chat's, its members'): each is worked out once
_KEPT = 1 << 16


def new_id(prefix: str) -> str:
    """A random identifier: the prefix, then 64 random bits in 11 letters and digits (``u`` +
    11 = 12 characters). Ids are carried in every topic and event, so their length is wire bytes:
    as 16 hex digits they were 5 characters longer each."""
    return id_of(prefix, secrets.randbits(64))


@lru_cache(maxsize=_KEPT)
def id_of(prefix: str, bits: int) -> str:
    """The id of kind ``prefix`` whose 64 bits are ``bits`` (0 <= bits < 2**64)."""
    out = [prefix]
    for _ in range(ID_DIGITS):
        bits, d = divmod(bits, 62)
        out.append(ID_ALPHABET[d])
    return "".join(out)


@lru_cache(maxsize=_KEPT)
def bits_of(s: str) -> int | None:
    """The 64 bits of an id in this shape (an ASCII letter, then 11 base-62 digits whose value
    is below 2**64); None for any other string."""
    if len(s) != 1 + ID_DIGITS or not ("A" <= s[0] <= "Z" or "a" <= s[0] <= "z"):
        return None
    n = 0
    for c in reversed(s[1:]):
        d = _DIGIT.get(c)
        if d is None:
            return None
        n = n * 62 + d
    return None if n >> 64 else n
