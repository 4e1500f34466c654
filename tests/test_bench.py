"""``pigeon bench`` smoke runs: every scenario with tiny counts, so the harness cannot rot.

Nothing here asserts a speed; the figures live in BENCHMARKS.md. What is asserted is that each
scenario runs to the end, reports every field it promises, and lost or duplicated nothing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clients.bench.run import cost_per_msg, parse_store_ops, read_store_ops
from clients.bench.target import BENCH_SERVER_FLAGS, TICKS_PER_S, box_shares, box_ticks
from clients.launch import ROOT, ServerProc
from storage.base import StoreOps
from tests.conftest import production_url

TINY = ["--workers", "2", "--seconds", "0.5", "--pairs", "2", "--window", "2", "--groups", "2", "--members", "3",
        "--messages", "30", "--devices", "6", "--wire-messages", "3", "--max-seconds", "240", "--quiet"]
COMMON = {"scenario", "profile", "p50_ms", "p95_ms", "p99_ms", "rss_mb", "bytes_per_msg", "lost", "duplicates"}
COST = ("store_ops_per_msg", "lwt_per_msg", "bridge_cpu_ms_per_msg")


def bench(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clients.cli", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def check_results(results: list[dict[str, object]], profile: str) -> None:
    by_name = {r["scenario"]: r for r in results}
    assert sorted(by_name) == sorted(["p2p", "baseline", "group", "sync", "idle", "wire"])
    for r in results:
        assert COMMON <= r.keys(), (r["scenario"], COMMON - r.keys())
        assert r["profile"] == profile
        assert r["lost"] == 0 and r["duplicates"] == 0 and r.get("unanswered", 0) == 0, r
    p2p = by_name["p2p"]
    assert {"msgs_per_s", "baseline_msgs_per_s", "ratio"} <= p2p.keys()
    assert p2p["msgs_per_s"] > 0 and p2p["baseline_msgs_per_s"] > 0
    assert [step["offered_per_s"] for step in p2p["rates"]] == sorted(step["offered_per_s"] for step in p2p["rates"])
    for step in p2p["rates"]:  # every message measured is in the step's seconds, oldest first
        seconds = [row[0] for row in step["by_second"]]
        assert seconds == sorted(set(seconds)) and sum(row[1] for row in step["by_second"]) > 0
        assert max(row[3] for row in step["by_second"]) >= step["p99_ms"]
        # what a message cost at that rate, and what each bridge carried of it
        assert set(COST) <= step.keys() and step["store_ops_per_msg"] > 0 and step["bridge_cpu_ms_per_msg"] > 0, step
        assert step["msgs_per_s_per_bridge"] == pytest.approx(step["msgs_per_s"] / p2p["bridges"], abs=0.1)
    assert p2p["bridges"] == 1 and p2p["msgs_per_s_per_bridge"] == p2p["msgs_per_s"]
    # the whole box's CPU in each timed phase, the hypervisor's share apart
    group = by_name["group"]
    for phase in [*p2p["rates"], p2p, group]:
        box = phase["box_cpu_pct"]
        assert set(box) == {"busy", "idle", "steal"} and box["busy"] > 0, box
        assert sum(box.values()) == pytest.approx(100, abs=0.3), box
    assert set(group["box_cpu_pct_at_half"]) == {"busy", "idle", "steal"}
    assert group["deliveries_per_s"] > 0 and group["baseline_deliveries_per_s"] > 0 and "ratio" in group
    sync = by_name["sync"]
    assert sync["messages"] == 30 and sync["errors"] == {}
    for name in ("p2p", "group", "idle", "wire"):
        assert "unanswered" in by_name[name], name
    idle = by_name["idle"]
    assert idle["devices"] == 6 and idle["connects_per_s"] > 0
    wire = by_name["wire"]
    assert wire["delivered"] == 3 and wire["bytes_per_msg"] > 0
    assert set(wire["bytes_per_msg_by_direction"]) == {"sender_up", "sender_down", "recipient_up", "recipient_down"}
    for name in ("p2p", "group", "sync"):
        check_cost(by_name[name], cpu_known=True)
    for name in ("p2p", "group", "sync", "idle"):  # the devices speak v2 unless told --proto 1
        assert by_name[name]["proto"] == 2, name
    assert "proto" not in by_name["baseline"]


def check_cost(r: dict[str, Any], cpu_known: bool) -> None:
    """The cost per message: every message stores something, and the bridge spends CPU on it."""
    assert set(COST) <= r.keys(), r["scenario"]
    assert r["store_ops_per_msg"] > 0, r
    assert 0 <= r["lwt_per_msg"] <= r["store_ops_per_msg"], r
    if cpu_known:
        assert r["bridge_cpu_ms_per_msg"] > 0, r
    else:
        assert r["bridge_cpu_ms_per_msg"] is None, r
    assert r["cost_basis"]["messages"] > 0, r


def test_the_box_shares_split_its_cpu_time_by_kind() -> None:
    before = {"user": 100, "nice": 0, "system": 50, "idle": 800, "iowait": 10, "irq": 5, "softirq": 5, "steal": 30}
    after = {"user": 300, "nice": 20, "system": 100, "idle": 1000, "iowait": 10, "irq": 10, "softirq": 10,
             "steal": 130}
    # 280 busy (user, nice, system, irq, softirq), 200 idle, 100 stolen, of 580 ticks
    assert box_shares(before, after) == {"busy": 48.3, "idle": 34.5, "steal": 17.2}
    assert box_shares(None, after) is None and box_shares(before, None) is None
    assert box_shares(after, after) is None  # no time passed
    now = box_ticks()  # this machine's, read from /proc/stat
    assert now is not None and set(now) <= {"user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"}
    assert now["idle"] > 0


def test_every_scenario_runs_on_the_embedded_default(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = bench("all", "--profile", "embedded", *TINY, "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    check_results(json.loads(out.read_text()), "embedded")
    assert "p2p (embedded)" in done.stdout


@pytest.mark.parametrize("scenario", ["p2p", "sync"])
def test_proto_1_runs_the_devices_on_json_and_says_so(tmp_path: Path, scenario: str) -> None:
    out = tmp_path / "bench.json"
    done = bench(scenario, "--profile", "embedded", "--proto", "1", *TINY, "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    r = json.loads(out.read_text())
    assert r["proto"] == 1 and r["lost"] == 0 and r["duplicates"] == 0 and r.get("unanswered", 0) == 0, r
    assert (r["msgs_per_s"] if scenario == "p2p" else r["messages"]) > 0


def test_every_scenario_runs_on_the_production_profile(tmp_path: Path) -> None:
    production_url("PIGEON_BROKER", "mqtt://")  # the servers scripts/test started (skips or fails without)
    out = tmp_path / "bench.json"
    done = bench("all", "--profile", "production", *TINY, "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    results = json.loads(out.read_text())
    check_results(results, "production")
    assert {r["store"] for r in results} == {"emptied"}
    p2p = next(r for r in results if r["scenario"] == "p2p")
    # Cassandra's CPU is reported beside the bridge's, in every step; its memory is not
    assert {"pigeon", "cassandra"} <= p2p["server_cpu_pct"].keys() and "cassandra" not in p2p["rss_by_process_mb"]
    assert all("cassandra" in step["server_cpu_pct"] for step in p2p["rates"])


def test_the_bench_empties_its_own_keyspace_and_no_other() -> None:
    """A production run starts from an empty ``pigeon_bench`` keyspace (what earlier runs left
    would be compacted under the next one), or ``pigeon_bench_NAME`` with ``--keyspace``; any
    other keyspace is refused, untouched."""
    from urllib.parse import urlparse

    from clients.bench.target import BenchError, empty_keyspace
    from storage import cassandra_cluster

    url = urlparse(production_url("PIGEON_STORE", "cassandra://"))
    for other in ("pigeon_kept", "pigeon_benchkept", "pigeon_bench_Kept", "pigeon_bench_"):
        with pytest.raises(BenchError, match=f"refusing to drop keyspace '{other}'"):
            empty_keyspace(url._replace(path=f"/{other}").geturl())
    cluster = cassandra_cluster(url.geturl(), protocol_version=4)
    try:
        session = cluster.connect()
        for keyspace in ("pigeon_bench", "pigeon_bench_side", "pigeon_kept"):
            session.execute(f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
                            "{'class': 'SimpleStrategy', 'replication_factor': 1}", timeout=60)
            session.execute(f"CREATE TABLE IF NOT EXISTS {keyspace}.left_by_a_run (k int PRIMARY KEY)", timeout=60)
            session.execute(f"INSERT INTO {keyspace}.left_by_a_run (k) VALUES (1)")
        empty_keyspace(url._replace(path="/pigeon_bench").geturl())
        names = {r.keyspace_name for r in session.execute("SELECT keyspace_name FROM system_schema.keyspaces")}
        assert "pigeon_bench" not in names and {"pigeon_bench_side", "pigeon_kept"} <= names
        empty_keyspace(url._replace(path="/pigeon_bench_side").geturl())
        names = {r.keyspace_name for r in session.execute("SELECT keyspace_name FROM system_schema.keyspaces")}
        assert "pigeon_bench_side" not in names and "pigeon_kept" in names
        assert session.execute("SELECT k FROM pigeon_kept.left_by_a_run").one() is not None
        session.execute("DROP KEYSPACE pigeon_kept", timeout=60)
    finally:
        cluster.shutdown()


def test_wire_over_mqtt5_aliases_the_up_topic_on_mosquitto(tmp_path: Path) -> None:
    """A third pair speaks v2 over MQTT 5: Mosquitto allows 10 topic aliases from a client, so
    the sender's publishes carry an alias instead of the up topic and it sends fewer bytes."""
    production_url("PIGEON_BROKER", "mqtt://")
    out = tmp_path / "bench.json"
    done = bench("wire", "--profile", "production", "--mqtt5", *TINY, "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    r = json.loads(out.read_text())
    v2, v5 = r["v2"], r["v2_mqtt5"]
    assert v5["delivered"] == 3 and v5["lost"] == 0 and v5["duplicates"] == 0, v5
    assert v5["topic_aliases_to_broker"] > 0
    assert v5["bytes_per_msg_by_direction"]["sender_up"] < v2["bytes_per_msg_by_direction"]["sender_up"] - 20


def test_mqtt5_properties_are_read_by_their_sizes() -> None:
    from clients.bench.mqtt import MqttRefused, read_properties
    # Topic Alias Maximum 10, a reason string (skipped), Topic Alias 3, then the payload
    props = bytes([0x22, 0, 10, 0x1F, 0, 2]) + b"ok" + bytes([0x23, 0, 3])
    raw = bytes([len(props)]) + props + b"payload"
    found, end = read_properties(raw, 0)
    assert found == {0x22: 10, 0x23: 3} and raw[end:] == b"payload"
    with pytest.raises(MqttRefused):
        read_properties(bytes([2, 0x7F, 0]), 0)


def test_two_bridges_share_a_production_run(tmp_path: Path) -> None:
    """--bridges 2: both processes take part, and their store counts and CPU are added up;
    --rate-per-bridge offers that load to each of them (twice it in all) after the usual steps."""
    production_url("PIGEON_BROKER", "mqtt://")
    out = tmp_path / "bench.json"
    done = bench("p2p", "--profile", "production", "--bridges", "2", *TINY, "--rate-per-bridge", "6",
                 "--rate-per-bridge", "3", "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    data = json.loads(out.read_text())
    r = data if isinstance(data, dict) else next(x for x in data if x["scenario"] == "p2p")
    assert r["lost"] == 0 and r["duplicates"] == 0 and r.get("unanswered", 0) == 0, r
    assert r["profile"] == "production, 2 bridges" and r["msgs_per_s"] > 0
    assert {"pigeon", "pigeon-2"} <= r["rss_by_process_mb"].keys(), r["rss_by_process_mb"]
    check_cost(r, cpu_known=True)
    assert len(r["rates"]) == 3 and [s["offered_per_s"] for s in r["rates_per_bridge"]] == [12.0, 6.0], r
    for step in r["rates_per_bridge"]:  # measured like the others, each bridge's share beside the total
        assert step["msgs_per_s"] > 0 and step["bridge_cpu_ms_per_msg"] > 0 and step["lost"] == 0, step
        assert step["msgs_per_s_per_bridge"] == pytest.approx(step["msgs_per_s"] / 2, abs=0.1)
    assert "a bridge): p99" in done.stdout


def test_a_failover_run_kills_a_bridge_and_the_other_takes_over_with_every_send_answered(tmp_path: Path) -> None:
    """failover: the second of two bridges is killed 2 s into the traffic; the first holds every
    partition within 10 s (issue 11), and nothing sent is lost, duplicated or left unanswered."""
    production_url("PIGEON_BROKER", "mqtt://")
    out = tmp_path / "bench.json"
    done = bench("failover", "--profile", "production", "--bridges", "2", *TINY, "--seconds", "2",
                 "--full-speed", "40", "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    r = json.loads(out.read_text())
    assert r["scenario"] == "failover" and r["bridges"] == 2 and r["killed_after_s"] == 2.0, r
    assert 0 < r["takeover_s"] <= 10.0, r
    assert r["lost"] == 0 and r["duplicates"] == 0 and r["unanswered"] == 0, r
    assert r["before"]["messages"] > 0 and r["offered_per_s"] == 20.0, r
    assert sum(r[s]["messages"] for s in ("before", "during", "after")) == sum(row[1] for row in r["by_second"])
    assert "pigeon-2" not in r["server_cpu_pct"], r["server_cpu_pct"]  # the killed bridge is not read
    # the devices sent refused sends again (the default): none was given up
    assert r["resend"] is True and isinstance(r["resent"], dict) and not r["errors"], r


def test_a_cold_sync_restarts_the_server_and_still_gets_everything(tmp_path: Path) -> None:
    production_url("PIGEON_BROKER", "mqtt://")
    out = tmp_path / "bench.json"
    done = bench("sync", "--profile", "production", "--cold-sync", *TINY, "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    data = json.loads(out.read_text())
    r = data if isinstance(data, dict) else data[0]
    assert r["cold_sync"] is True and r["restart_s"] > 0 and r["lost"] == 0 and r["duplicates"] == 0, r


@pytest.mark.parametrize(("args", "message"), [
    (["nope", "--profile", "embedded"], "unknown scenario"),
    (["p2p"], "give either --profile"),
    (["p2p", "--profile", "embedded", "--pairs", "0"], "--pairs must be between"),
    (["p2p", "--profile", "cloud"], "--profile must be embedded or production"),
    (["p2p", "--profile", "embedded", "--bridges", "2"], "more than 1 only with --profile production"),
    (["sync", "--profile", "embedded", "--cold-sync"], "--cold-sync needs --profile production"),
    (["overload", "--profile", "embedded", "--overload-factor", "1"], "--overload-factor must be above 1"),
    (["overload", "--profile", "embedded", "--recovery-seconds", "0"], "--recovery-seconds must be within"),
    (["overload", "--profile", "embedded", "--full-speed", "0"], "--full-speed must be within"),
    (["p2p", "--profile", "embedded", "--proto", "3"], "--proto must be 1 or 2"),
    (["wire", "--profile", "embedded", "--mqtt5"], "--mqtt5 needs a broker that speaks MQTT 5"),
    (["p2p", "--profile", "embedded", "--keep-store"], "--keep-store is for --profile production"),
    (["p2p", "--profile", "embedded", "--no-resend"], "--no-resend is for the failover scenario"),
    (["p2p", "--profile", "production", "--keyspace", "pigeon_test"], "--keyspace must be pigeon_bench or"),
    (["p2p", "--profile", "production", "--keyspace", "pigeon_bench_a;DROP"], "--keyspace must be pigeon_bench or"),
    (["p2p", "--profile", "embedded", "--keyspace", "pigeon_bench_a"], "only with --profile production"),
    (["p2p", "--profile", "embedded", "--rate-per-bridge", "0"], "--rate-per-bridge must be within"),
    (["group", "--profile", "embedded", "--rate-per-bridge", "50"], "--rate-per-bridge is for the p2p scenario"),
    (["failover", "--profile", "embedded"], "failover needs --profile production and --bridges 2"),
    (["failover", "--profile", "production"], "failover needs --profile production and --bridges 2"),
])
def test_bad_arguments_are_refused_before_anything_runs(args: list[str], message: str) -> None:
    done = bench(*args, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


def test_only_loopback_targets_are_loaded() -> None:
    done = bench("p2p", "--http", "http://192.0.2.1:8080", "--mqtt", "192.0.2.1:1883", "--quiet", timeout=60)
    assert done.returncode == 1
    assert "not a loopback address" in done.stderr


def test_a_running_server_is_costed_from_its_metrics_and_without_a_pid_no_cpu(tmp_path: Path) -> None:
    server = ServerProc.start(tmp_path / "server", *BENCH_SERVER_FLAGS)
    try:
        out = tmp_path / "p2p.json"
        done = bench("p2p", "--http", server.http, "--mqtt", f"{server.mqtt_host}:{server.mqtt_port}", *TINY,
                     "--json", str(out))
        assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
        check_cost(json.loads(out.read_text()), cpu_known=False)
        assert "store_ops_per_msg=" in done.stdout
    finally:
        server.stop()


METRICS_PAGE = """# HELP pigeon_store_statements_total Statements the store has run on its database
# TYPE pigeon_store_statements_total counter
pigeon_store_statements_total 1234.0
# HELP pigeon_store_conditional_total Conditional statements (Cassandra lightweight transactions) among them
# TYPE pigeon_store_conditional_total counter
pigeon_store_conditional_total 56.0
pigeon_connected_devices 4.0
"""


def test_store_counts_are_read_from_a_metrics_page() -> None:
    assert parse_store_ops(METRICS_PAGE) == StoreOps(1234, 56)
    # a server without them (an older one) is unknown, not zero
    assert parse_store_ops("pigeon_connected_devices 4.0\n") is None
    assert parse_store_ops(METRICS_PAGE.replace("pigeon_store_conditional_total 56.0", "")) is None


def test_no_metrics_to_read_is_none() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert read_store_ops(f"http://127.0.0.1:{port}") is None  # nothing listens there any more


def test_cost_per_message_arithmetic() -> None:
    ticks_per_100ms = TICKS_PER_S // 10
    cost = cost_per_msg(StoreOps(100, 10), StoreOps(1100, 60), 7, 7 + 2 * ticks_per_100ms, 200)
    assert cost["store_ops_per_msg"] == 5.0 and cost["lwt_per_msg"] == 0.25
    assert cost["bridge_cpu_ms_per_msg"] == pytest.approx(1.0, abs=0.001)  # 200 ms over 200 messages
    assert cost["cost_basis"] == {"messages": 200, "store_statements": 1000, "store_conditional": 50,
                                  "bridge_cpu_ms": round(2 * ticks_per_100ms * 1000 / TICKS_PER_S, 1)}
    # a group message delivered to 99 members counts once: 990 deliveries are 10 messages
    assert cost_per_msg(StoreOps(0, 0), StoreOps(30, 0), None, None, 990 / 99)["store_ops_per_msg"] == 3.0
    unknown = cost_per_msg(None, StoreOps(5, 0), None, None, 10)
    assert unknown["store_ops_per_msg"] is None and unknown["lwt_per_msg"] is None
    assert unknown["bridge_cpu_ms_per_msg"] is None
    nothing = cost_per_msg(StoreOps(0, 0), StoreOps(0, 0), 0, 0, 0)
    assert nothing["store_ops_per_msg"] is None and nothing["bridge_cpu_ms_per_msg"] is None


async def test_the_harness_tells_an_entry_stored_twice_from_a_late_live_copy() -> None:
    """A live event for an inbox entry a sync already fetched is a late copy, not a duplicate;
    another entry at a position already had, or one message at two positions, is a duplicate."""
    from clients.bench.worker import Dev, Worker

    w = Worker(0, [0])
    dev = Dev(w, "u1", "d1", "token")
    msg = {"type": "msg", "chat": "c1", "seq": 1, "id": "m1", "device": "d2", "inbox": 1}
    dev.take(msg, from_store=True)
    dev.take(msg, from_store=False)
    assert (w.tally.late_live, w.tally.duplicates) == (1, 0)
    dev.take({**msg, "seq": 2, "id": "m2"}, from_store=False)  # another message at position 1
    assert w.tally.duplicates == 1
    dev.take({**msg, "inbox": 2}, from_store=True)  # message c1/1 again, at position 2
    assert w.tally.duplicates == 2
    receipt = {"type": "receipt", "chat": "c1", "kind": "delivered", "user": "u2", "up_to": 1, "inbox": 3}
    dev.take(receipt, from_store=True)
    dev.take(receipt, from_store=False)
    assert (w.tally.late_live, w.tally.duplicates) == (2, 2)


async def test_the_harness_fetches_at_once_a_live_msg_it_cannot_place_and_learns_its_chat() -> None:
    """A v2 msg from the peer of a direct chat leaves the chat out: a device that does not know
    it syncs at once (no waiting for a missing position to come live), and knows it after."""
    from bridge.protocol import ChatMessage, MsgEvent
    from bridge.wire_v2 import encode
    from clients.bench.worker import GAP_SYNC_AFTER_S, Dev, Worker

    w = Worker(0, [0])
    dev = Dev(w, "u_b", "d_b", "token")
    dev.proto = 2
    text = ChatMessage(chat="c_1", seq=1, id="1", sender="u_a", device="d_a", ts=time.time_ns() // 1_000_000,
                       kind="text", body="hi")
    dev.on_message("down/u_b/v2", encode(MsgEvent(1, text, direct=True), "u_b"))
    assert dev.cursor == 0 and dev.unresolved == {1: "u_a"} and not w.tally.errors
    now = time.monotonic()
    assert w.due_syncs(now) == [dev]  # at once
    other = Dev(w, "u_c", "d_c", "token")
    other.take({"type": "msg", "chat": "c_2", "seq": 2, "id": "2", "device": "d_a", "inbox": 2}, from_store=False)
    assert w.due_syncs(now) == [dev]  # a plain gap waits a little: its position may still come live
    assert other in w.due_syncs(now + GAP_SYNC_AFTER_S + 1)
    # what the sync brings: the item at that position, with its chat (Dev.sync does this per item)
    dev.learn({"type": "msg", "inbox": 1, "chat": "c_1", "from": "u_a"})
    assert dev.chat_with == {"u_a": "c_1"} and dev.unresolved == {}
    dev.on_message("down/u_b/v2", encode(MsgEvent(2, ChatMessage(**{**_fields(text), "seq": 2, "id": "2"}),
                                                  direct=True), "u_b"))
    assert dev.ahead == {2} and not dev.unresolved  # placed this time (position 1 still to come by sync)


def _fields(m: Any) -> dict[str, Any]:
    return {f: getattr(m, f) for f in ("chat", "seq", "id", "sender", "device", "ts", "kind", "body")}


def test_an_overload_run_reports_refusals_recovery_and_nothing_lost(tmp_path: Path) -> None:
    """A server bounded at 8 requests (2 of a device's own) offered 3 x 400 sends/s: some are
    refused, every send is answered, nothing answered 'sent' is lost, and the run stops itself.
    (A quiet machine handled every v2 send within the bound at 3 x 60/s, and at 3 x 200/s once
    the embedded broker wrote QoS 0 publishes at once: nothing was refused. At 3 x 400/s three
    runs refused 572-676 of 3,600.)"""
    out = tmp_path / "overload.json"
    server = ServerProc.start(tmp_path / "srv", *BENCH_SERVER_FLAGS, "--max-pending", "8",
                              "--max-pending-device", "2")
    try:
        done = bench("overload", "--http", server.http, "--mqtt", f"{server.mqtt_host}:{server.mqtt_port}",
                     "--server-pid", str(server.proc.pid), "--workers", "1", "--pairs", "4", "--seconds", "1",
                     "--full-speed", "400", "--overload-seconds", "3", "--recovery-seconds", "3", "--quiet",
                     "--max-seconds", "200", "--json", str(out))
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    r = json.loads(out.read_text())
    assert r["scenario"] == "overload" and r["msgs_per_s"] == 400 and r["full_speed_measured"] is False
    assert r["proto"] == 2
    assert r["rate_limited"] > 0 and r["overload"]["accepted"] > 0, r["overload"]
    assert r["lost"] == 0 and r["duplicates"] == 0 and r["unanswered"] == 0, r
    assert 2000 <= r["overload"]["offered"] <= 3604  # 3 x 400/s for 3 s, and no more
    assert r["samples"] and all(x["health_ms"] is not None for x in r["samples"])
    assert isinstance(r["responsive"], bool) and r["rss_mb"] > 0 and r["held_max"] is not None
    assert len(r["recovery"]["buckets"]) == 3


def test_latency_by_second_groups_messages_by_when_they_left() -> None:
    from clients.bench.run import by_second

    sent = [100.2, 100.9, 101.5, 99.99]
    took = [10.0, 30.0, 500.0, 1.0]
    assert by_second(sent, took) == [[99, 1, 1.0, 1.0], [100, 2, 30.0, 30.0], [101, 1, 500.0, 500.0]]
    assert by_second([], []) == []


def test_recovery_is_the_end_of_the_last_stretch_not_yet_normal() -> None:
    from clients.bench.run import overload_part, recovery

    # overload ends at 10 s; then 1 s buckets: refused, slow, normal, normal
    answers = [(10.2, 5.0, "rate_limited"), (10.5, 900.0, "sent"), (11.5, 900.0, "sent"),
               (12.2, 20.0, "sent"), (13.7, 30.0, "sent")]
    got = recovery(answers, [], 10.0, 4.0, normal_p99=40.0)
    assert [b["normal"] for b in got["buckets"]] == [False, False, True, True]
    assert got["recovered_after_s"] == 2.0 and got["normal_p99_limit_ms"] == 90.0
    assert recovery(answers, [13.5], 10.0, 4.0, 40.0)["recovered_after_s"] is None  # last one unanswered
    assert recovery([(10.1, 10.0, "sent")], [], 10.0, 1.0, 40.0)["recovered_after_s"] == 0.0
    part = overload_part([(1.0, 10.0, "sent"), (1.5, 1.0, "rate_limited"), (2.0, 1.0, "rate_limited")], 1, 2.0)
    assert part["offered"] == 4 and part["offered_per_s"] == 2.0 and part["accepted"] == 1
    assert part["refused"] == {"rate_limited": 2} and part["no_answer_by_end"] == 1
