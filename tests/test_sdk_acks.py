"""When the SDK acks: v1 gathers acks for a moment after the first event; v2 acks a lone
message at once (its sender is told it was delivered at once) and a stream at most once a
second (each ack makes a delivered receipt for every chat it covers, and v2 counts bytes)."""

from __future__ import annotations

from clients.sdk import V2_ACK_DELAY_S, ack_wait


def test_v1_gathers_acks_for_its_delay_after_the_first_event() -> None:
    assert ack_wait(None, 100.0, 0.05, leading=False) == 0.05
    assert ack_wait(99.99, 100.0, 0.05, leading=False) == 0.05


def test_v2_acks_after_a_quiet_second_at_once_and_a_stream_once_a_second() -> None:
    assert V2_ACK_DELAY_S == 1.0
    assert ack_wait(None, 100.0, V2_ACK_DELAY_S, leading=True) == 0.0  # the first ack on this connection
    assert ack_wait(98.5, 100.0, V2_ACK_DELAY_S, leading=True) == 0.0  # the last went over a second ago
    assert ack_wait(99.75, 100.0, V2_ACK_DELAY_S, leading=True) == 0.75  # a stream: one second after the last

