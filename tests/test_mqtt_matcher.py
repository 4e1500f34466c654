"""paho's per-filter callback lookup without a garbage cycle per message (bridge/mqtt_matcher.py). No network."""

from __future__ import annotations

import gc
import random
from collections.abc import Iterator

import pytest
from paho.mqtt import client as paho
from paho.mqtt.matcher import MQTTMatcher

from bridge.mqtt_matcher import CycleFreeMatcher, cycle_free_lookups

LEVELS = ["up", "down", "u1", "d1", "$SYS", "", "+", "#"]


def random_filter(rng: random.Random) -> str:
    # "#" mostly last, as MQTT allows it, and now and then within (paho's trie stores those too)
    parts = [rng.choice(LEVELS if rng.random() < 0.1 else LEVELS[:-1]) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.3:
        parts.append("#")
    return "/".join(parts)


def random_topic(rng: random.Random) -> str:
    return "/".join(rng.choice(LEVELS[:6]) for _ in range(rng.randint(1, 5)))


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic collector off, so that what a lookup leaves for it stays until counted."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_it_finds_what_paho_finds_in_the_same_order() -> None:
    rng = random.Random(7)
    for _ in range(200):
        theirs, ours = MQTTMatcher(), CycleFreeMatcher()
        for n, f in enumerate({random_filter(rng) for _ in range(rng.randint(0, 12))}):
            theirs[f] = ours[f] = n
        for _ in range(30):
            topic = random_topic(rng)
            assert list(ours.iter_match(topic)) == list(theirs.iter_match(topic)), topic


def test_wildcards_and_dollar_topics() -> None:
    m = CycleFreeMatcher()
    for f in ("up/+/d1", "up/#", "#", "+/u1/+", "$SYS/#", "up/u1/d1"):
        m[f] = f
    assert list(m.iter_match("up/u1/d1")) == ["up/u1/d1", "up/+/d1", "up/#", "+/u1/+", "#"]
    assert list(m.iter_match("$SYS/broker")) == ["$SYS/#"]  # wildcards first never match "$"
    assert list(CycleFreeMatcher().iter_match("up/u1/d1")) == []


def test_a_lookup_leaves_no_cycle_for_the_collector(no_collector: None) -> None:
    theirs, ours = MQTTMatcher(), CycleFreeMatcher()
    for _ in range(100):
        list(theirs.iter_match("up/u1/d1"))
    assert gc.collect() >= 100 * 6  # paho's: six objects in a cycle per lookup
    for m in (CycleFreeMatcher(), ours):
        m["down/+/d1"] = "x"
        for _ in range(100):
            list(m.iter_match("up/u1/d1"))
            list(m.iter_match("down/u1/d1"))
    for _ in range(100):
        list(CycleFreeMatcher().iter_match("up/u1/d1"))
    assert gc.collect() == 0


def test_a_client_reading_publishes_leaves_no_cycle(no_collector: None) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    cycle_free_lookups(client)
    got: list[str] = []
    client.on_message = lambda c, userdata, message: got.append(message.topic)
    for _ in range(100):
        message = paho.MQTTMessage(topic=b"up/u1/d1")
        client._handle_on_message(message)
    assert got == ["up/u1/d1"] * 100
    assert gc.collect() == 0
    # filtered callbacks still work, and take the message instead of on_message as in paho
    filtered: list[str] = []
    client.message_callback_add("down/+/d1", lambda c, userdata, message: filtered.append(message.topic))
    client._handle_on_message(paho.MQTTMessage(topic=b"down/u1/d1"))
    assert filtered == ["down/u1/d1"] and len(got) == 100


def test_it_refuses_a_client_with_filter_callbacks_already() -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.message_callback_add("up/#", lambda *a: None)
    with pytest.raises(RuntimeError, match="call this first"):
        cycle_free_lookups(client)
