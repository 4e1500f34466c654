"""``pigeon bench`` smoke runs: every scenario with tiny counts, so the harness cannot rot.

Nothing here asserts a speed; the figures live in BENCHMARKS.md. What is asserted is that each
scenario runs to the end, reports every field it promises, and lost or duplicated nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clients.launch import ROOT
from tests.conftest import production_url

TINY = ["--workers", "2", "--seconds", "0.5", "--pairs", "2", "--window", "2", "--groups", "2", "--members", "3",
        "--messages", "30", "--devices", "6", "--wire-messages", "3", "--max-seconds", "240", "--quiet"]
COMMON = {"scenario", "profile", "p50_ms", "p95_ms", "p99_ms", "rss_mb", "bytes_per_msg", "lost", "duplicates"}


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
    group = by_name["group"]
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


def test_every_scenario_runs_on_the_embedded_default(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = bench("all", "--profile", "embedded", *TINY, "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    check_results(json.loads(out.read_text()), "embedded")
    assert "p2p (embedded)" in done.stdout


def test_every_scenario_runs_on_the_production_profile(tmp_path: Path) -> None:
    production_url("PIGEON_BROKER", "mqtt://")  # the servers scripts/test started (skips or fails without)
    out = tmp_path / "bench.json"
    done = bench("all", "--profile", "production", *TINY, "--json", str(out))
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    check_results(json.loads(out.read_text()), "production")


@pytest.mark.parametrize(("args", "message"), [
    (["nope", "--profile", "embedded"], "unknown scenario"),
    (["p2p"], "give either --profile"),
    (["p2p", "--profile", "embedded", "--pairs", "0"], "--pairs must be between"),
    (["p2p", "--profile", "cloud"], "--profile must be embedded or production"),
])
def test_bad_arguments_are_refused_before_anything_runs(args: list[str], message: str) -> None:
    done = bench(*args, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr


def test_only_loopback_targets_are_loaded() -> None:
    done = bench("p2p", "--http", "http://192.0.2.1:8080", "--mqtt", "192.0.2.1:1883", "--quiet", timeout=60)
    assert done.returncode == 1
    assert "not a loopback address" in done.stderr
