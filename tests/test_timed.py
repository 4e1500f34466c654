"""storage/timed.py: the bounded map whose entries expire."""

from __future__ import annotations

import pytest

from storage.timed import TimedMap


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_is_forgotten_its_ttl_after_it_was_last_set() -> None:
    clock = Clock()
    m: TimedMap[str, int] = TimedMap(10, 5.0, timer=clock)
    m["a"] = 1
    clock.now += 4.9
    assert m.get("a") == 1 and "a" in m
    m["a"] = 2  # set again: five more seconds
    clock.now += 4.9
    assert m.get("a") == 2
    clock.now += 0.1
    assert m.get("a") is None and "a" not in m and m.get("a", 7) == 7
    assert len(m) == 0  # dropped when read after it expired


def test_when_full_the_entry_set_longest_ago_goes_first() -> None:
    clock = Clock()
    m: TimedMap[str, int] = TimedMap(3, 60.0, timer=clock)
    for i, k in enumerate("abc"):
        m[k] = i
    m["a"] = 10  # set again: now the newest
    m["d"] = 3
    assert len(m) == 3
    assert m.get("b") is None
    assert (m.get("a"), m.get("c"), m.get("d")) == (10, 2, 3)


def test_pop_and_clear() -> None:
    clock = Clock()
    m: TimedMap[tuple[str, str], bool] = TimedMap(10, 1.0, timer=clock)
    m[("d", "r1")] = True
    m[("d", "r2")] = True
    assert m.pop(("d", "r1")) is True and m.pop(("d", "r1")) is None
    clock.now += 1.0
    assert m.pop(("d", "r2"), False) is False  # expired: as if absent
    m[("d", "r3")] = True
    m.clear()
    assert len(m) == 0 and ("d", "r3") not in m


@pytest.mark.parametrize(("maxsize", "ttl"), [(0, 1.0), (1, 0.0)])
def test_a_map_that_could_hold_nothing_is_refused(maxsize: int, ttl: float) -> None:
    with pytest.raises(ValueError, match="maxsize"):
        TimedMap(maxsize, ttl)
