"""Server-made ids (users, devices, chats): short, since every topic and event carries them, and
safe as an MQTT topic level and client id."""

from __future__ import annotations

import re

from storage.sqlite import ID_ALPHABET, ID_DIGITS, new_id


def test_an_id_is_its_prefix_and_eleven_letters_or_digits() -> None:
    for prefix in ("u", "d", "c", "g"):
        made = new_id(prefix)
        assert re.fullmatch(rf"{prefix}[0-9A-Za-z]{{11}}", made), made


def test_eleven_base_62_digits_hold_every_64_bit_value() -> None:
    assert len(ID_ALPHABET) == len(set(ID_ALPHABET)) == 62 and ID_DIGITS == 11
    assert 62 ** ID_DIGITS > 2 ** 64 > 62 ** (ID_DIGITS - 1)


def test_ids_do_not_repeat() -> None:
    made = {new_id("u") for _ in range(20_000)}
    assert len(made) == 20_000
    # every digit place takes every kind of character over so many ids (the last one carries
    # the top bits of 64 and takes only the first few)
    for place in range(1, ID_DIGITS):
        assert {m[place] for m in made} == set(ID_ALPHABET), place


def test_a_direct_chat_is_numbered_in_its_first_senders_partition() -> None:
    """The chat id chosen for a new direct chat puts its numbering (``c:{id}``) in the partition
    of its first sender (``u:{id}``), and it is an id like any other."""
    from storage.cassandra_owner import chat_id_near, partition_of

    for _ in range(200):
        user = new_id("u")
        cid = chat_id_near(user, lambda: new_id("c"))
        assert partition_of(f"c:{cid}") == partition_of(f"u:{user}")
        assert re.fullmatch(r"c[0-9A-Za-z]{11}", cid), cid
    # when no id of that partition turns up, another one is taken rather than none
    other = next(c for c in (new_id("c") for _ in range(1000)) if partition_of(f"c:{c}") != partition_of("u:u1"))
    assert chat_id_near("u1", lambda: other, tries=5) == other
