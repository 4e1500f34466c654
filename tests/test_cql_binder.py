"""storage/cql_wire.py's Binder against the driver's own ``bind()``, without a server: prepared
statements are built as the driver builds them from a PREPARE answer (its column metadata and
routing key), and both serialise the same values."""

from __future__ import annotations

import random
from typing import Any

import pytest
from cassandra import cqltypes
from cassandra.protocol import ColumnMetadata
from cassandra.query import UNSET_VALUE, PreparedStatement

from storage.cql_wire import Binder

TYPES = {"text": cqltypes.UTF8Type, "bigint": cqltypes.LongType, "int": cqltypes.Int32Type,
         "blob": cqltypes.BytesType, "boolean": cqltypes.BooleanType}


def prepared(columns: list[tuple[str, str]], key: list[int], *, version: int = 4, policy: Any = None
             ) -> PreparedStatement:
    meta = [ColumnMetadata("ks", "t", name, TYPES[kind]) for name, kind in columns]
    return PreparedStatement(meta, b"\x01" * 16, key, "INSERT ...", "ks", version, [], None, policy)


INBOX = prepared([("user_id", "text"), ("bucket", "int"), ("pos", "bigint"), ("body", "text"),
                  ("media", "blob"), ("up_to", "bigint"), ("seen", "boolean")], [0, 1])


def sample(rng: random.Random, kind: str) -> Any:
    return {"text": lambda: "".join(rng.choice("aé✓z ") for _ in range(rng.randrange(8))),
            "bigint": lambda: rng.choice([0, -1, 2**63 - 1, -(2**63), rng.randrange(-2**40, 2**40)]),
            "int": lambda: rng.choice([0, 2**31 - 1, -(2**31), rng.randrange(-1000, 1000)]),
            "blob": lambda: rng.randbytes(rng.randrange(5)),
            "boolean": lambda: rng.random() < 0.5}[kind]()


def outcome(f: Any, values: Any) -> Any:
    try:
        return f(values)
    except Exception as exc:  # (text given a number: AttributeError, from the type itself, in both)
        return type(exc)


def test_the_same_bytes_and_the_same_refusals_as_the_drivers_bind() -> None:
    rng = random.Random(7)
    kinds = [c.type for c in INBOX.column_metadata]
    binder = Binder(INBOX, UNSET_VALUE)
    odd = [None, UNSET_VALUE, "x", 3, 2**64, b"\x00", 1.5, ["l"], True]
    for _ in range(3000):
        n = rng.randrange(len(kinds) + 2)
        values = tuple(rng.choice(odd) if rng.random() < 0.2 else
                       sample(rng, next(k for k, t in TYPES.items() if t is kinds[i % len(kinds)]))
                       for i in range(n))
        ours = outcome(binder, values)
        theirs = outcome(lambda v: INBOX.bind(v).values, values)
        assert ours == theirs, values


def test_a_value_the_column_cannot_take_is_refused_with_the_columns_name() -> None:
    binder = Binder(INBOX, UNSET_VALUE)
    with pytest.raises(TypeError, match="'pos'"):
        binder(("u", 0, "seventeen"))
    with pytest.raises(ValueError, match="too many"):
        binder(("u", 0, 1, "b", b"", 2, True, "extra"))
    with pytest.raises(ValueError, match="routing key"):
        binder(("u",))  # the bucket, part of the key, would be left unset


@pytest.mark.parametrize("values", [{"user_id": "u", "bucket": 0}, None, "u0"])
def test_values_come_as_a_list_or_tuple(values: Any) -> None:
    with pytest.raises(TypeError, match="list or tuple"):
        Binder(INBOX, UNSET_VALUE)(values)


def test_what_it_would_serialise_differently_from_the_driver_is_refused_when_made() -> None:
    with pytest.raises(ValueError, match="UNSET_VALUE"):
        Binder(INBOX, None)
    with pytest.raises(ValueError, match="encrypt"):
        Binder(prepared([("a", "text")], [0], policy=object()), UNSET_VALUE)
    with pytest.raises(ValueError, match="v3"):
        Binder(prepared([("a", "text")], [0], version=3), UNSET_VALUE)
