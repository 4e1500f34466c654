"""What ``scripts/services`` promises about the servers it runs for the tests and the bench."""

from __future__ import annotations

from pathlib import Path

from clients.bench.target import service_pids
from tests.conftest import production_url, services_script


def test_cassandra_and_every_thread_it_started_run_with_the_timer_slack_named() -> None:
    """Each of Cassandra's threads inherits the slack set before its exec (BENCHMARKS.md, 2026-11-30
    dusk: at the kernel's 50 us its idle workers' wake-ups took half a core of two)."""
    production_url("PIGEON_STORE", "cassandra://")
    pid = service_pids(("cassandra",)).get("cassandra")
    assert pid is not None, "scripts/services runs no Cassandra (its state has no pid)"
    wanted = services_script().CASSANDRA_TIMER_SLACK_NS
    threads = [p.name for p in Path(f"/proc/{pid}/task").iterdir()]
    assert len(threads) > 20  # the JVM's and Cassandra's own, started after the exec
    slacks = {int(Path(f"/proc/{tid}/timerslack_ns").read_text()) for tid in threads}
    assert slacks == {wanted}, slacks
