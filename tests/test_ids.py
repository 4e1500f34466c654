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
