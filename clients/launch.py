"""Start ``pigeon serve`` as a child process on free loopback ports and wait until it is ready.

Used by the test suite and by ``pigeon bench`` when it runs its own server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKEND_VARS = ("PIGEON_STORE", "PIGEON_MEDIA", "PIGEON_REDIS", "PIGEON_BROKER", "PIGEON_BROKER_CREDENTIALS_FILE",
                "PIGEON_BROKER_AUTH")
# "pigeon ready http=URL mqtt=HOST:PORT ws=URL [https=URL mqtts=HOST:PORT wss=URL] data=DIR", "off" for a
# listener not served
READY_RE = re.compile(r"pigeon ready (.*)$")
# The interpreter's collector as `pigeon serve` and the bench's load generators set it: a young
# collection every 20,000 new objects, a full one every 100 middle ones (see `serve` in
# clients/cli.py for why)
GC_THRESHOLDS = (20_000, 20, 100)


def _port(value: str) -> int:
    """The port of ``HOST:PORT`` or of a URL; 0 for none."""
    if not value:
        return 0
    return int(value.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[1])


@dataclass
class ServerProc:
    """A running ``pigeon serve`` child process."""

    proc: subprocess.Popen[str]
    http: str
    mqtt_host: str
    mqtt_port: int
    ws_port: int
    data_dir: Path
    log_path: Path
    profile: str = "embedded"
    https: str = ""  # with TLS: the HTTPS base, and the TLS listeners' ports
    mqtts_port: int = 0
    wss_port: int = 0

    @classmethod
    def start(cls, data_dir: Path, *extra: str, timeout: float = 60.0, dev: bool = True) -> ServerProc:
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = data_dir / "server.log"
        log = open(log_path, "a")  # noqa: SIM115 - closed with the process
        cmd = [
            sys.executable, "-m", "clients.cli", "serve", *(["--dev"] if dev else []), "--data-dir", str(data_dir),
            "--host", "127.0.0.1", "--mqtt-port", "0", "--ws-port", "0", "--http-port", "0",
            "--log-level", os.environ.get("PIGEON_TEST_SERVER_LOG_LEVEL", "WARNING"), *extra,
        ]
        # backends are chosen by the flags given here, never inherited by accident
        env = {k: v for k, v in os.environ.items() if k not in BACKEND_VARS}
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        found: list[re.Match[str]] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                m = READY_RE.search(line)
                if m:
                    found.append(m)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        log.close()  # the child holds its own copy
        if not found:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"pigeon serve did not become ready; log:\n{log_path.read_text()[-4000:]}")
        words = dict(word.split("=", 1) for word in found[0].group(1).split() if "=" in word)
        fields = {k: ("" if v == "off" else v) for k, v in words.items()}
        mqtt = fields.get("mqtt") or fields.get("mqtts") or ""
        return cls(proc=proc, http=fields.get("http", ""), mqtt_host=mqtt.rsplit(":", 1)[0],
                   mqtt_port=_port(fields.get("mqtt", "")), ws_port=_port(fields.get("ws", "")), data_dir=data_dir,
                   log_path=log_path, https=fields.get("https", ""), mqtts_port=_port(fields.get("mqtts", "")),
                   wss_port=_port(fields.get("wss", "")))

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
