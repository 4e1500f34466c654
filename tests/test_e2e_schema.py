"""`pigeon serve` refuses a store whose schema is missing or old, and `pigeon db migrate` fixes it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from clients.launch import BACKEND_VARS, ROOT, ServerProc
from tests.conftest import production_url


def pigeon(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in BACKEND_VARS}
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_serve_refuses_an_unmigrated_keyspace_until_migrate(tmp_path: Path) -> None:
    base = production_url("PIGEON_STORE", "cassandra://").rsplit("/", 1)[0]
    store = f"{base}/pigeon_fresh_{uuid.uuid4().hex[:8]}"
    refused = pigeon("serve", "--dev", "--store", store, "--data-dir", str(tmp_path / "a"), "--http-port", "0",
                     "--mqtt-port", "0", "--ws-port", "0")
    assert refused.returncode == 1
    assert "pigeon db migrate" in refused.stderr + refused.stdout
    migrated = pigeon("db", "migrate", "--store", store)
    assert migrated.returncode == 0, migrated.stderr
    srv = ServerProc.start(tmp_path / "b", "--store", store)
    srv.stop()
