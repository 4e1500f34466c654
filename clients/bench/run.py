"""The benchmark scenarios: each spreads its devices over the worker processes, drives them in
phases, and reduces what the workers saw to one result (see docs in BENCHMARKS.md)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clients.sdk import tls_context
from storage.base import StoreOps
from storage.cassandra_owner import PARTITIONS
from storage.ids import new_id

from . import worker as worker_mod
from .target import TICKS_PER_S, BenchError, Target, box_shares, box_ticks, cpu_ticks, partitions_held, rss_kb

SCENARIOS = ("p2p", "baseline", "group", "sync", "idle", "wire", "overload", "failover")
# the scenarios whose devices speak --proto (baseline has none; wire measures v1 and v2 side by side)
DEVICE_SCENARIOS = ("p2p", "group", "sync", "idle", "overload", "failover")
# not in "all": overload takes minutes, failover needs two bridges and kills one
ALONE = ("overload", "failover")
RATE_STEPS = (0.25, 0.5, 0.75)
IDLE_RATE = 20.0  # idle: messages a second sent while the devices are held
IDLE_PAIRS = 10
STORE_METRICS = ("pigeon_store_statements_total", "pigeon_store_conditional_total")
COST_FIELDS = ("store_ops_per_msg", "lwt_per_msg", "bridge_cpu_ms_per_msg")
SETTLE_S = 0.25  # the store's counts must hold still this long before a cost reading is taken
SETTLE_LIMIT_S = 5.0
# overload: the server must answer health and login within this long while overloaded
RESPONSIVE_MS = 1000.0
SAMPLE_EVERY_S = 1.0
RECOVERY_BUCKET_S = 1.0
MAX_OFFERED = 2_000_000  # sends one overload run may offer in all


@dataclass
class Options:
    workers: int = 2
    seconds: float = 10.0
    pairs: int = 100
    window: int = 4
    groups: int = 2
    members: int = 100
    messages: int = 10_000
    sync_senders: int = 100
    cold_sync: bool = False  # sync: restart the server before the offline device reconnects
    devices: int = 10_000
    wire_messages: int = 100
    wire_rate: float = 10.0
    max_seconds: float = 900.0
    progress: bool = True
    # overload: offered load at ``overload_factor`` × full speed (measured first unless given)
    # for ``overload_seconds``, then at half of full speed for ``recovery_seconds``
    overload_seconds: float = 60.0
    recovery_seconds: float = 30.0
    overload_factor: float = 3.0
    full_speed: float | None = None
    # failover: devices send a send answered rate_limited or unavailable again, in their order
    resend: bool = True
    # p2p: steps after the usual ones, at these msgs/s per bridge (× the bridges in all)
    rates_per_bridge: tuple[float, ...] = ()
    proto: int = 2  # the protocol the simulated devices speak (wire measures both)
    mqtt5: bool = False  # wire: also a v2 pair over MQTT 5 (topic aliases); the broker must speak it


@dataclass
class Result:
    scenario: str
    profile: str
    fields: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "profile": self.profile, **self.fields}


def percentiles(samples: list[float]) -> dict[str, float | None]:
    if not samples:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50_ms": at(0.50), "p95_ms": at(0.95), "p99_ms": at(0.99)}


def by_second(sent_s: list[float], latencies_ms: list[float]) -> list[list[float]]:
    """Latency by the wall-clock second messages left in: ``[Unix second, messages, p99 ms, max ms]``
    per second, oldest first, to set beside other processes' logs (a stall shows as seconds whose
    p99 stands out)."""
    seconds: dict[int, list[float]] = {}
    for t, ms in zip(sent_s, latencies_ms, strict=True):
        seconds.setdefault(int(t), []).append(ms)
    return [[second, len(v), percentiles(v)["p99_ms"] or 0.0, round(max(v), 2)]
            for second, v in sorted(seconds.items())]


def split(n: int, parts: int) -> list[int]:
    """n items over ``parts`` workers as evenly as possible."""
    return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]


class Pool:
    """The worker processes, each answering commands over its own pipe."""

    def __init__(self, n: int, console: Console, show_progress: bool, deadline: float, ca_file: str | None = None,
                 mqtt_tls: bool = False, mqtt_ws_path: str | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.progress_counts = ctx.Array("q", n, lock=False)
        self.pipes: list[Connection] = []
        self.procs = []
        self.console = console
        self.show_progress = show_progress
        self.deadline = deadline
        for k in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_mod.main,
                               args=(child, k, self.progress_counts, ca_file, mqtt_tls, mqtt_ws_path), daemon=True)
            proc.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(proc)

    def __len__(self) -> int:
        return len(self.pipes)

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def run(self, what: str, calls: dict[int, tuple[str, dict[str, Any]]], total: float | None = None,
            timed: float | None = None) -> dict[int, Any]:
        """Send each worker its command and wait for all answers, showing progress: ``total``
        units the workers count, or ``timed`` seconds."""
        for k in range(len(self)):
            self.progress_counts[k] = 0
        for k, (name, kwargs) in calls.items():
            self.pipes[k].send((name, kwargs))
        answers: dict[int, Any] = {}
        t0 = time.monotonic()
        if self.show_progress and not self.console.is_terminal:  # a log: one line per step, with the time
            self.console.print(f"{time.strftime('%H:%M:%S')} {what}", highlight=False)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=True, disable=not self.show_progress) as bar:
            task = bar.add_task(what, total=total if total is not None else timed)
            while len(answers) < len(calls):
                if time.monotonic() > self.deadline:
                    raise BenchError(f"the run went past its --max-seconds limit during: {what}")
                for k in calls:
                    if k not in answers and self.pipes[k].poll(0.05):
                        status, value = self.pipes[k].recv()
                        if status != "ok":
                            raise BenchError(f"worker {k} failed during {what}:\n{value}")
                        answers[k] = value
                done = sum(self.progress_counts) if total is not None else min(timed or 0, time.monotonic() - t0)
                bar.update(task, completed=done)
        return answers

    def all(self, what: str, name: str, kwargs: Callable[[int], dict[str, Any] | None] | dict[str, Any],
            total: float | None = None, timed: float | None = None) -> dict[int, Any]:
        calls: dict[int, tuple[str, dict[str, Any]]] = {}
        for k in range(len(self)):
            kw = kwargs(k) if callable(kwargs) else kwargs
            if kw is not None:
                calls[k] = (name, kw)
        return self.run(what, calls, total, timed)


class Phones:
    """Fresh phone numbers for every run, so a persistent store never mixes runs."""

    def __init__(self) -> None:
        self._next = random.randrange(100_000_000, 800_000_000)

    def take(self, n: int) -> list[str]:
        out = [f"+19{self._next + i:09d}" for i in range(n)]
        self._next += n
        return out


class Meter:
    """Memory and CPU of the server processes around a phase."""

    def __init__(self, pids: dict[str, int], cpu_only: dict[str, int] | None = None) -> None:
        # read from /proc like the figures themselves
        self.pids = {name: pid for name, pid in pids.items() if os.path.exists(f"/proc/{pid}")}
        # processes whose CPU is reported but not their memory (Cassandra: its heap is sized, not used)
        self.cpu_pids = {**self.pids, **{name: pid for name, pid in (cpu_only or {}).items()
                                         if os.path.exists(f"/proc/{pid}")}}
        self._ticks: dict[str, int] = {}
        self._box: dict[str, int] | None = None
        self._t0 = 0.0

    def rss_mb(self) -> float | None:
        """Total resident memory, or None when no server process is known (--server-pid)."""
        return total_mb(self.rss_by_process())

    def rss_by_process(self) -> dict[str, float]:
        return {name: round(rss_kb(pid) / 1024, 1) for name, pid in self.pids.items()}

    def start(self) -> None:
        self._ticks = {name: cpu_ticks(pid) for name, pid in self.cpu_pids.items()}
        self._box = box_ticks()
        self._t0 = time.monotonic()

    def cpu_pct(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self._t0)
        return {name: round(100 * (cpu_ticks(pid) - self._ticks[name]) / TICKS_PER_S / wall, 1)
                for name, pid in self.cpu_pids.items()}

    def box_pct(self) -> dict[str, float] | None:
        """The whole box's CPU since :meth:`start`: busy, idle and stolen, in % of all its cores
        (everything on the box counts: the servers, the load generator, anything else)."""
        return box_shares(self._box, box_ticks())


class Sampler:
    """While an overload run goes on, every ``SAMPLE_EVERY_S``: the server's ``/healthz`` and a
    whole login (code, then verify), each timed, its memory, and the requests it holds (from
    ``/metrics``). A request that fails or times out (5 s) is recorded as ``None``."""

    def __init__(self, http: str, meter: Meter, phones: Phones) -> None:
        self.http, self.meter, self.phones = http, meter, phones
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="overload-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.http, timeout=5.0) as client:
            while not self._stop.is_set():
                t = time.monotonic()
                login_ms, login_error = self._login(client)
                sample: dict[str, Any] = {"t": t, "health_ms": self._health(client), "login_ms": login_ms,
                          "rss_mb": self.meter.rss_mb(), "held": self._held(client)}
                if login_error is not None:
                    sample["login_error"] = login_error
                self.samples.append(sample)
                self._stop.wait(max(0.0, SAMPLE_EVERY_S - (time.monotonic() - t)))

    @staticmethod
    def _health(client: httpx.Client) -> float | None:
        t0 = time.monotonic()
        try:
            ok = client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return None
        return round((time.monotonic() - t0) * 1000, 1) if ok else None

    def _login(self, client: httpx.Client) -> tuple[float | None, str | None]:
        """A whole login's milliseconds, or None and why it failed (a timeout after 5 s, or the
        answer's status and error code)."""
        phone = self.phones.take(1)[0]
        t0 = time.monotonic()
        try:
            r = client.post("/v1/auth/code", json={"phone": phone})
            code = r.json().get("dev_code") if r.status_code == 202 else None
            if code:
                r = client.post("/v1/auth/verify", json={"phone": phone, "code": code, "device_name": "bench-probe"})
                if r.status_code == 200:
                    return round((time.monotonic() - t0) * 1000, 1), None
        except httpx.TimeoutException:
            return None, "timeout"
        except (httpx.HTTPError, ValueError) as exc:
            return None, type(exc).__name__
        try:
            code = r.json().get("error", {}).get("code", "")
        except (ValueError, AttributeError):
            code = ""
        return None, f"HTTP {r.status_code} {code}".strip()

    @staticmethod
    def _held(client: httpx.Client) -> int | None:
        try:
            text = client.get("/metrics").text
        except httpx.HTTPError:
            return None
        for line in text.splitlines():
            if line.startswith("pigeon_requests_held "):
                return int(float(line.split()[1]))
        return None


# one send of an overload run: seconds from the run's start it left, ms until its answer, and the
# answer ("sent" or the error code)
Answer = tuple[float, float, str]


def overload_part(items: list[Answer], unanswered: int, seconds: float) -> dict[str, Any]:
    """What one stretch of an overload run offered, and what became of it; ``unanswered``: sends
    with no answer yet 2 s after the run's last send (still queued somewhere, or lost: the
    result's own ``unanswered`` and ``lost``, after the final drain and sync, say which)."""
    accepted = [ms for _, ms, outcome in items if outcome == "sent"]
    refused = Counter(outcome for _, _, outcome in items if outcome != "sent")
    offered = len(items) + unanswered
    return {"offered": offered, "offered_per_s": round(offered / max(1e-9, seconds), 1),
            "accepted": len(accepted), "accepted_per_s": round(len(accepted) / max(1e-9, seconds), 1),
            "refused": dict(refused), "no_answer_by_end": unanswered, "accepted_send_ms": percentiles(accepted)}


def recovery(answers: list[Answer], unanswered: list[float], start_s: float, seconds: float,
             normal_p99: float | None, bucket_s: float = RECOVERY_BUCKET_S) -> dict[str, Any]:
    """From ``start_s`` (the end of the overload) on, in buckets of ``bucket_s`` by when the sends
    left: a bucket is *normal* when it had sends, all of them answered ``sent``, with a p99 within
    twice the normal one (or 50 ms more, whichever is larger). ``recovered_after_s`` is the end of
    the last bucket that was not normal, 0 if none was, None if the last one was not."""
    limit = None if normal_p99 is None else max(2 * normal_p99, normal_p99 + 50)
    buckets = []
    n = max(1, int(seconds / bucket_s))
    for k in range(n):
        lo, hi = start_s + k * bucket_s, start_s + (k + 1) * bucket_s
        items = [a for a in answers if lo <= a[0] < hi]
        waiting = sum(1 for t in unanswered if lo <= t < hi)
        accepted = [ms for _, ms, outcome in items if outcome == "sent"]
        refused = len(items) - len(accepted)
        p99 = percentiles(accepted)["p99_ms"]
        normal = bool(items) and not refused and not waiting and (limit is None or (p99 or 0) <= limit)
        buckets.append({"from_s": round(k * bucket_s, 1), "sends": len(items) + waiting, "refused": refused,
                        "no_answer_by_end": waiting, "p99_ms": p99, "normal": normal})
    bad = [k for k, b in enumerate(buckets) if not b["normal"]]
    after = None if bad and bad[-1] == n - 1 else round((bad[-1] + 1) * bucket_s if bad else 0.0, 1)
    return {"recovered_after_s": after, "normal_p99_limit_ms": limit, "buckets": buckets}


def total_mb(by_process: dict[str, float]) -> float | None:
    return round(sum(by_process.values()), 1) if by_process else None


def parse_store_ops(text: str) -> StoreOps | None:
    """The store's counts from a ``/metrics`` page, or None when it does not show both."""
    found: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in STORE_METRICS:
            try:
                found[name] = int(float(value.split()[0]))
            except (ValueError, IndexError):
                return None
    if len(found) != len(STORE_METRICS):
        return None
    return StoreOps(found[STORE_METRICS[0]], found[STORE_METRICS[1]])


def read_store_ops(http: str, ca_file: str | None = None) -> StoreOps | None:
    """The server's store counts now, or None when its ``/metrics`` cannot be read or lacks them."""
    try:
        r = httpx.get(f"{http}/metrics", timeout=5.0, verify=tls_context(ca_file))
        r.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_store_ops(r.text)


def settled_store_ops(http: str, ca_file: str | None = None) -> StoreOps | None:
    """The store's counts once they hold still for ``SETTLE_S`` (the server has finished the acks
    and receipts still on their way), or as they are after ``SETTLE_LIMIT_S``."""
    last = read_store_ops(http, ca_file)
    deadline = time.monotonic() + SETTLE_LIMIT_S
    while last is not None and time.monotonic() < deadline:
        time.sleep(SETTLE_S)
        now = read_store_ops(http, ca_file)
        if now == last:
            break
        last = now
    return last


def cost_per_msg(ops0: StoreOps | None, ops1: StoreOps | None, ticks0: int | None, ticks1: int | None,
                 messages: float) -> dict[str, Any]:
    """The three cost figures over a stretch that delivered ``messages``: store statements and
    conditional ones (None when ``/metrics`` could not be read at either end) and the bridge's
    CPU milliseconds (None without its pid), each per message; and what they were worked out from."""
    statements = conditional = None
    if ops0 is not None and ops1 is not None:
        statements, conditional = ops1.statements - ops0.statements, ops1.conditional - ops0.conditional
    cpu_ms = None if ticks0 is None or ticks1 is None else (ticks1 - ticks0) * 1000 / TICKS_PER_S

    def per(total: float | None, digits: int) -> float | None:
        return None if total is None or messages <= 0 else round(total / messages, digits)

    return {
        "store_ops_per_msg": per(statements, 2), "lwt_per_msg": per(conditional, 3),
        "bridge_cpu_ms_per_msg": per(cpu_ms, 3),
        "cost_basis": {"messages": round(messages, 1), "store_statements": statements,
                       "store_conditional": conditional,
                       "bridge_cpu_ms": None if cpu_ms is None else round(cpu_ms, 1)},
    }


class CostMeter:
    """Store statements (from the server's ``/metrics``) and the bridge process's CPU around a
    stretch of traffic, for the cost per delivered message."""

    def __init__(self, target: Target) -> None:
        self.urls = target.metrics_urls()
        self.ca_file = target.ca_file
        self.pids = [pid for pid in target.bridge_pids if os.path.exists(f"/proc/{pid}")]
        self._ops0: StoreOps | None = None
        self._ticks0: int | None = None

    def _ticks(self) -> int | None:
        return sum(cpu_ticks(pid) for pid in self.pids) if self.pids else None

    def _ops(self) -> StoreOps | None:
        """The store counts of every bridge added up (None if any cannot be read)."""
        total = StoreOps(0, 0)
        for url in self.urls:
            ops = settled_store_ops(url, self.ca_file)
            if ops is None:
                return None
            total = StoreOps(total.statements + ops.statements, total.conditional + ops.conditional)
        return total

    def start(self) -> None:
        self._ops0 = self._ops()
        self._ticks0 = self._ticks()

    def per_msg(self, messages: float) -> dict[str, Any]:
        """Once the server has settled: the cost of each of the ``messages`` delivered since
        :meth:`start`."""
        ops1 = self._ops() if self._ops0 is not None else None
        return cost_per_msg(self._ops0, ops1, self._ticks0, self._ticks(), messages)


def merge(answers: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Add up what the workers counted in one traffic phase."""
    out: dict[str, Any] = {"delivered": 0, "delivered_measured": 0, "sent_ok": 0, "duplicates": 0, "late_live": 0,
                           "stalled": 0, "cpu_s": 0.0, "seconds": 0.0, "latencies_ms": [], "sent_s": [],
                           "errors": Counter(), "resent": Counter()}
    for a in answers.values():
        for key in ("delivered", "delivered_measured", "sent_ok", "duplicates", "late_live", "stalled", "cpu_s"):
            out[key] += a[key]
        out["seconds"] = max(out["seconds"], a["seconds"])
        out["latencies_ms"].extend(a["latencies_ms"])
        out["sent_s"].extend(a.get("sent_s", ()))
        out["errors"].update(a["errors"])
        out["resent"].update(a.get("resent", {}))
    return out


def merge_drain(answers: dict[int, dict[str, Any]]) -> dict[str, int]:
    keys = ("lost_live", "lost", "unanswered", "duplicates", "late_live", "recovered_by_sync", "gap_syncs",
            "delivered_total")
    return {key: sum(int(a[key]) for a in answers.values()) for key in keys}


class Bench:
    def __init__(self, target: Target, opts: Options, console: Console) -> None:
        self.target = target
        self.opts = opts
        self.console = console
        self.phones = Phones()
        self.meter = Meter(target.pids, target.cpu_only_pids)

    @contextlib.contextmanager
    def pool(self) -> Iterator[Pool]:
        pool = Pool(self.opts.workers, self.console, self.opts.progress, time.monotonic() + self.opts.max_seconds,
                    self.target.ca_file, self.target.mqtt_tls, self.target.mqtt_ws_path)
        try:
            yield pool
        finally:
            pool.close()

    def say(self, text: str) -> None:
        if self.opts.progress:
            self.console.print(text)

    # -- shared phases --------------------------------------------------------------------------------------
    def login(self, pool: Pool, per_worker: list[int]) -> dict[int, list[dict[str, str]]]:
        phones = [self.phones.take(n) for n in per_worker]
        return pool.all("logging in devices", "login",
                        lambda k: {"http": self.target.http, "phones": phones[k], "name": "bench",
                                   "proto": self.opts.proto}
                        if per_worker[k] else None, total=sum(per_worker))

    def connect(self, pool: Pool, per_worker: list[int], presence: bool = True) -> dict[int, Any]:
        return pool.all("connecting devices", "connect",
                        lambda k: {"host": self.target.mqtt_host, "port": self.target.mqtt_port, "presence": presence,
                                   "proto": self.opts.proto}
                        if per_worker[k] else None, total=sum(per_worker))

    def phase(self, pool: Pool, what: str, active: list[int], args: Callable[[int], dict[str, Any]],
              seconds: float, per_delivery: float | None = None) -> dict[str, Any]:
        """One timed traffic phase on the workers with ``active[k]`` > 0, then a drain. With
        ``per_delivery``, also its cost per message (``merged["cost"]``), from before the first
        send until the server has settled after the drain, a message being ``1 / per_delivery``
        deliveries (1 for p2p)."""
        cost = CostMeter(self.target) if per_delivery is not None else None
        if cost is not None:
            cost.start()
        self.meter.start()
        merged = merge(pool.all(what, "traffic", lambda k: args(k) if active[k] else None, timed=seconds))
        merged["server_cpu_pct"], merged["box_cpu_pct"] = self.meter.cpu_pct(), self.meter.box_pct()
        drained = self.drain(pool, active)
        merged.update(drained, duplicates=merged["duplicates"] + drained["duplicates"],
                      late_live=merged["late_live"] + drained["late_live"])
        if cost is not None and per_delivery is not None:
            merged["cost"] = cost.per_msg(drained["delivered_total"] * per_delivery)
        return merged

    def drain(self, pool: Pool, per_worker: list[int]) -> dict[str, int]:
        return merge_drain(pool.all("waiting for deliveries", "drain", lambda k: {"timeout": 30.0}
                                    if per_worker[k] else None))

    def relay_rate(self, pool: Pool, per_worker: list[int], subscribers: int, address: tuple[str, str],
                   window: int) -> dict[str, Any]:
        """The broker alone: one publisher per topic, ``subscribers`` each, closed loop."""
        relay = self.target.relay
        if relay is None:
            raise BenchError("no baseline broker for this target")
        tag = f"{random.randrange(16 ** 6):06x}"
        pool.all("connecting baseline clients", "relay_connect", lambda k: {
            "host": relay.host, "port": relay.port, "username": relay.username, "password": relay.password,
            "topics": [f"bench/{tag}/{k}/{j}" for j in range(per_worker[k])], "subscribers_per_topic": subscribers,
            "address": address} if per_worker[k] else None, total=sum(per_worker) * (subscribers + 1))
        kw = {"flow": "relay", "mode": "closed", "members": subscribers}
        server_meter = self.meter
        if relay.pid is not None:
            self.meter = Meter({"relay-broker": relay.pid})
        try:
            return self._relay_phases(pool, per_worker, kw, window)
        finally:
            self.meter = server_meter

    def _relay_phases(self, pool: Pool, per_worker: list[int], kw: dict[str, Any], window: int) -> dict[str, Any]:
        self.phase(pool, "baseline warm-up", per_worker,
                   lambda k: {**kw, "seconds": 2.0, "window": 1, "measured": False}, 2.0)
        run = self.phase(pool, "baseline: the broker alone at full speed", per_worker,
                         lambda k: {**kw, "seconds": self.opts.seconds, "window": window}, self.opts.seconds)
        pool.all("closing baseline clients", "disconnect", {})
        return {"deliveries_per_s": run["delivered"] / max(1e-9, run["seconds"]), **percentiles(run["latencies_ms"]),
                "lost": run["lost"], "duplicates": run["duplicates"], "broker_cpu_pct": run["server_cpu_pct"],
                "client_cpu_pct": round(100 * run["cpu_s"] / max(1e-9, run["seconds"]), 1)}

    # -- scenarios --------------------------------------------------------------------------------------------
    def pairs_phase(self, pool: Pool, per_worker: list[int]) -> Callable[..., dict[str, Any]]:
        """What runs a p2p phase on ``per_worker`` pairs of each worker's devices (2j sends to
        2j + 1), a total ``rate`` spread over them."""
        o = self.opts
        pairs = {k: [(2 * j, 2 * j + 1) for j in range(n)] for k, n in enumerate(per_worker)}

        def phase(what: str, per_delivery: float | None = None, **kw: Any) -> dict[str, Any]:
            rate = kw.pop("rate", 0.0)
            return self.phase(pool, what, per_worker, lambda k: {
                "flow": "p2p", **kw, "pairs": pairs[k], "rate": rate * per_worker[k] / o.pairs}, kw["seconds"],
                per_delivery)

        return phase

    def p2p(self, with_baseline: bool = True) -> Result:
        o = self.opts
        per_worker = split(o.pairs, o.workers)
        with self.pool() as pool:
            creds = self.login(pool, [2 * n for n in per_worker])
            self.connect(pool, [2 * n for n in per_worker])
            phase = self.pairs_phase(pool, per_worker)
            phase("warm-up", mode="closed", seconds=2.0, window=1, measured=False)
            full = phase("p2p: full speed", 1.0, mode="closed", seconds=o.seconds, window=o.window)
            max_rate = full["delivered"] / max(1e-9, full["seconds"])
            rss = self.meter.rss_by_process()
            bridges = len(self.target.bridge_pids) or None

            def step_at(label: str, offered: float) -> dict[str, Any]:
                step = phase(f"p2p: {label}", 1.0, mode="open", seconds=o.seconds, rate=offered)
                rate = step["delivered"] / max(1e-9, step["seconds"])
                return {"offered_per_s": round(offered, 1), "msgs_per_s": round(rate, 1),
                        # what each bridge carried, and what a message cost at that rate: a
                        # bridge's CPU per message falls as its own rate rises, so N bridges
                        # compare with one at the same rate per bridge, not the same total
                        "msgs_per_s_per_bridge": None if bridges is None else round(rate / bridges, 1),
                        **{k: step["cost"][k] for k in COST_FIELDS},
                        **percentiles(step["latencies_ms"]),
                        "lost": step["lost"], "unanswered": step["unanswered"],
                        "duplicates": step["duplicates"], "late_live": step["late_live"],
                        "errors": dict(step["errors"]), "server_cpu_pct": step["server_cpu_pct"],
                        "box_cpu_pct": step["box_cpu_pct"],
                        "by_second": by_second(step["sent_s"], step["latencies_ms"])}

            steps = [step_at(f"{int(frac * 100)}% of full speed", frac * max_rate) for frac in RATE_STEPS]
            # then the same load per bridge whatever the number of bridges (--rate-per-bridge)
            fixed = [step_at(f"{r:g} msgs/s a bridge", r * (bridges or 1)) for r in o.rates_per_bridge]
            steps_all = steps + fixed
            fields: dict[str, Any] = {
                "msgs_per_s": round(max_rate, 1), "pairs": o.pairs, "window": o.window, **full["cost"],
                "bridges": bridges,
                "msgs_per_s_per_bridge": None if bridges is None else round(max_rate / bridges, 1),
            }
            baseline = None
            if with_baseline:
                user_len = len(next(iter(creds.values()))[1]["user"])
                baseline = self.relay_rate(pool, per_worker, 1, ("to", "u" * user_len), o.window)
                fields["baseline_msgs_per_s"] = round(baseline["deliveries_per_s"], 1)
                fields["ratio"] = round(max_rate / max(1e-9, baseline["deliveries_per_s"]), 3)
            half = steps[1]
            fields.update({
                "p50_ms": half["p50_ms"], "p95_ms": half["p95_ms"], "p99_ms": half["p99_ms"],
                "latency_at": "50% of full speed", "full_speed": percentiles(full["latencies_ms"]),
                "rates": steps, "rates_per_bridge": fixed, "rss_mb": total_mb(rss), "rss_by_process_mb": rss,
                "bytes_per_msg": None,
                "lost": full["lost"] + sum(s["lost"] for s in steps_all),
                "unanswered": full["unanswered"] + sum(s["unanswered"] for s in steps_all),
                "duplicates": full["duplicates"] + sum(s["duplicates"] for s in steps_all),
                "late_live": full["late_live"] + sum(s["late_live"] for s in steps_all),
                "lost_live": full["lost_live"], "recovered_by_sync": full["recovered_by_sync"],
                "errors": dict(full["errors"]), "stalled": full["stalled"],
                "server_cpu_pct": full["server_cpu_pct"], "box_cpu_pct": full["box_cpu_pct"],
                "client_cpu_pct": round(100 * full["cpu_s"] / max(1e-9, full["seconds"]), 1),
            })
            if baseline is not None:
                fields["baseline"] = baseline
            pool.all("disconnecting", "disconnect", {})
        return Result("p2p", self.target.profile, fields)

    def failover(self) -> Result:
        """Two bridges or more (production): p2p traffic offered open loop at half of full speed
        (measured first, for --seconds, unless --full-speed gives it) for three times --seconds;
        --seconds into it the last bridge is killed with SIGKILL, never to start again. How long
        until the others hold every partition, and the latency of the sends made before the kill,
        until that takeover and after it. Nothing answered 'sent' may be lost or duplicated, and
        every send must be answered (the dead bridge's devices' publishes wait in its broker
        sessions until a survivor takes them over). With ``--resend`` (the default) the devices send
        what was refused or could not be stored (``rate_limited``, ``unavailable``) again under the
        same id, in their order, as the SDK does: a latency then runs from a send's first attempt to
        its delivery, ``resent`` counts the attempts made again, and ``errors`` the sends given up."""
        o, target = self.opts, self.target
        if target.kill_bridge is None:
            raise BenchError("failover needs --profile production and --bridges 2 or more")
        per_worker = split(o.pairs, o.workers)
        with self.pool() as pool:
            self.login(pool, [2 * n for n in per_worker])
            self.connect(pool, [2 * n for n in per_worker])
            phase = self.pairs_phase(pool, per_worker)
            phase("warm-up", mode="closed", seconds=2.0, window=1, measured=False)
            max_rate = o.full_speed
            if max_rate is None:
                full = phase("failover: full speed first", mode="closed", seconds=o.seconds, window=o.window)
                max_rate = full["delivered"] / max(1e-9, full["seconds"])
            bridges, victim = len(target.bridge_pids), target.bridge_pids[-1]
            self.meter = Meter({n: p for n, p in target.pids.items() if p != victim}, target.cpu_only_pids)
            took: dict[str, float] = {}
            killer = threading.Thread(target=self._kill_and_watch, args=(o.seconds, took), daemon=True)
            killer.start()
            run = phase(f"failover: {max_rate / 2:.0f} msgs/s, the last bridge killed {o.seconds:g} s in",
                        mode="open", seconds=3 * o.seconds, rate=max_rate / 2, resend=o.resend)
            killer.join(60.0)
            if "takeover_s" not in took:
                raise BenchError(f"the other bridges did not hold every partition within 60 s of the kill: {took}")
            killed, over = took["killed_at"], took["killed_at"] + took["takeover_s"]
            stretches: dict[str, list[float]] = {"before": [], "during": [], "after": []}
            for t, ms in zip(run["sent_s"], run["latencies_ms"], strict=True):
                stretches["before" if t < killed else "during" if t < over else "after"].append(ms)
            during = stretches["during"]
            fields: dict[str, Any] = {
                "offered_per_s": round(max_rate / 2, 1), "bridges": bridges,
                "msgs_per_s": round(run["delivered"] / max(1e-9, run["seconds"]), 1),
                "killed_after_s": o.seconds, "takeover_s": round(took["takeover_s"], 2),
                **{name: {"messages": len(v), **percentiles(v)} for name, v in stretches.items()},
                # sends made while a partition had no holder that were answered as if nothing had
                # happened: those whose devices, chat and inboxes all lay with the survivors
                "during_within_1s_pct": round(100 * sum(ms <= 1000 for ms in during) / len(during), 1)
                if during else None,
                "max_ms": round(max(run["latencies_ms"], default=0.0), 1),
                "lost": run["lost"], "unanswered": run["unanswered"], "duplicates": run["duplicates"],
                "late_live": run["late_live"], "errors": dict(run["errors"]), "resend": o.resend,
                "resent": dict(run["resent"]), "server_cpu_pct": run["server_cpu_pct"],
                "box_cpu_pct": run["box_cpu_pct"],
                "by_second": by_second(run["sent_s"], run["latencies_ms"]),
            }
            pool.all("disconnecting", "disconnect", {})
        return Result("failover", target.profile, fields)

    def _kill_and_watch(self, after_s: float, took: dict[str, float]) -> None:
        """``after_s`` from now, kill the last bridge; then note (in ``took``) when it was killed
        and how long until the others held every partition."""
        time.sleep(after_s)
        assert self.target.kill_bridge is not None
        took["killed_at"] = time.time()
        t0 = time.monotonic()
        self.target.kill_bridge()
        while time.monotonic() - t0 < 60.0:
            if sum(partitions_held(url) for url in self.target.bridge_urls) >= PARTITIONS:
                took["takeover_s"] = time.monotonic() - t0
                return
            time.sleep(0.1)

    def baseline(self) -> Result:
        o = self.opts
        per_worker = split(o.pairs, o.workers)
        with self.pool() as pool:
            base = self.relay_rate(pool, per_worker, 1, ("to", new_id("u")), o.window)
        return Result("baseline", self.target.profile, {
            "msgs_per_s": round(base["deliveries_per_s"], 1), "pairs": o.pairs, "window": o.window,
            "p50_ms": base["p50_ms"], "p95_ms": base["p95_ms"], "p99_ms": base["p99_ms"],
            "latency_at": "full speed", "rss_mb": self.meter.rss_mb(), "bytes_per_msg": None,
            "lost": base["lost"], "duplicates": base["duplicates"], "server_cpu_pct": base["broker_cpu_pct"],
        })

    def group(self) -> Result:
        o = self.opts
        groups = split(o.groups, o.workers)
        devices = [g * o.members for g in groups]
        with self.pool() as pool:
            self.login(pool, devices)
            self.connect(pool, devices)
            chats = pool.all("creating groups", "make_groups", lambda k: {"http": self.target.http, "size": o.members}
                             if groups[k] else None, total=o.groups)
            chat_len = len(next(iter(chats.values()))[0])

            def phase(what: str, per_delivery: float | None = None, **kw: Any) -> dict[str, Any]:
                rate = kw.pop("rate", 0.0)
                return self.phase(pool, what, groups, lambda k: {
                    "flow": "group", "members": o.members, "group_senders": 1, **kw,
                    "rate": rate * groups[k] / o.groups}, kw["seconds"], per_delivery)

            phase("warm-up", mode="closed", seconds=2.0, window=1, measured=False)
            # cost per group message: its members - 1 deliveries count as one
            full = phase("group: full speed", 1 / max(1, o.members - 1), mode="closed", seconds=o.seconds,
                         window=o.window)
            rate = full["delivered"] / max(1e-9, full["seconds"])
            rss = self.meter.rss_by_process()
            msgs_rate = rate / max(1, o.members - 1)
            half = phase("group: 50% of full speed", mode="open", seconds=o.seconds, rate=msgs_rate / 2)
            pool.all("disconnecting", "disconnect", {})
            baseline = self.relay_rate(pool, groups, o.members, ("chat", "c" * chat_len), o.window)
        return Result("group", self.target.profile, {
            "deliveries_per_s": round(rate, 1), "msgs_per_s": round(msgs_rate, 1), "groups": o.groups,
            "members": o.members, "window": o.window,
            "baseline_deliveries_per_s": round(baseline["deliveries_per_s"], 1),
            "ratio": round(rate / max(1e-9, baseline["deliveries_per_s"]), 3),
            **percentiles(half["latencies_ms"]), "latency_at": "50% of full speed",
            "full_speed": percentiles(full["latencies_ms"]),
            "rss_mb": total_mb(rss), "rss_by_process_mb": rss, "bytes_per_msg": None,
            "lost": full["lost"] + half["lost"], "unanswered": full["unanswered"] + half["unanswered"],
            "duplicates": full["duplicates"] + half["duplicates"],
            "late_live": full["late_live"] + half["late_live"],
            "lost_live": full["lost_live"], "recovered_by_sync": full["recovered_by_sync"],
            "errors": dict(full["errors"] + half["errors"]), "server_cpu_pct": full["server_cpu_pct"],
            "box_cpu_pct": full["box_cpu_pct"], "box_cpu_pct_at_half": half["box_cpu_pct"],
            "client_cpu_pct": round(100 * full["cpu_s"] / max(1e-9, full["seconds"]), 1), **full["cost"],
            "baseline": baseline,
        })

    def sync(self) -> Result:
        o = self.opts
        senders = min(o.sync_senders, o.messages)
        per_worker = split(senders, o.workers)
        per_worker_devices = [n + (1 if k == 0 else 0) for k, n in enumerate(per_worker)]
        each = split(o.messages, senders)
        with self.pool() as pool:
            creds = self.login(pool, per_worker_devices)
            recipient = creds[0][0]["user"]
            pool.all("connecting senders", "connect", lambda k: {
                "host": self.target.mqtt_host, "port": self.target.mqtt_port, "first": 1 if k == 0 else 0,
                "proto": o.proto} if per_worker[k] else None, total=senders)
            offset = [sum(per_worker[:k]) for k in range(o.workers)]
            cost = CostMeter(self.target)  # from the first send to the last 'delivered' receipt
            cost.start()
            sent = pool.all(f"sending {o.messages} messages to an offline device", "send_batch", lambda k: {
                "to_user": recipient, "window": 2,
                "senders": [((1 if k == 0 else 0) + i, each[offset[k] + i]) for i in range(per_worker[k])]}
                if per_worker[k] else None, total=o.messages)
            errors: Counter[str] = Counter()
            for answer in sent.values():
                errors.update(answer["errors"])
            time.sleep(0.5)
            restart_s = None
            if o.cold_sync:  # the sync then reads what the store holds, not what a holder kept
                assert self.target.restart is not None
                self.say("restarting the server before the offline device reconnects")
                t0 = time.monotonic()
                self.target.restart()
                restart_s = round(time.monotonic() - t0, 3)
                self.meter = Meter(self.target.pids, self.target.cpu_only_pids)
                cost = CostMeter(self.target)  # then only the sync and its receipts are costed
                cost.start()
            rss_before = self.meter.rss_mb()
            got = pool.run("offline device reconnects and syncs", {0: ("catch_up", {
                "host": self.target.mqtt_host, "port": self.target.mqtt_port, "index": 0, "proto": o.proto})},
                total=o.messages)[0]
            rss = self.meter.rss_by_process()
            told = pool.all("senders waiting to be told 'delivered'", "receipts",
                            lambda k: {"timeout": 60.0} if per_worker[k] else None)
            costs = cost.per_msg(got["unique_msgs"])
            pool.all("disconnecting", "disconnect", {})
        accepted = o.messages - sum(errors.values())
        last_told = [a["last_at"] for a in told.values() if a["last_at"] is not None]
        untold = sum(a["untold"] for a in told.values())
        return Result("sync", self.target.profile, {
            "messages": o.messages, "senders": senders, "cold_sync": o.cold_sync, "restart_s": restart_s,
            "seconds": round(got["seconds"], 3),
            "connect_s": round(got["connect_s"], 3), "sync_s": round(got["sync_s"], 3), "batches": got["batches"],
            "batch_wait_ms": got["batch_wait_ms"],
            "receipts_s": round(max(last_told) - got["t0"], 3) if last_told and not untold else None,
            "senders_not_told": untold,
            "msgs_per_s": round(got["unique_msgs"] / max(1e-9, got["seconds"]), 1),
            "p50_ms": None, "p95_ms": None, "p99_ms": None, "rss_mb": total_mb(rss),
            "rss_by_process_mb": rss, "rss_before_sync_mb": rss_before, "bytes_per_msg": None,
            "lost": accepted - got["unique_msgs"], "duplicates": got["msgs"] - got["unique_msgs"],
            "errors": dict(errors), **costs,
        })

    def idle(self) -> Result:
        o = self.opts
        per_worker = split(o.devices, o.workers)
        with self.pool() as pool:
            self.login(pool, per_worker)
            time.sleep(1.0)
            before = self.meter.rss_by_process()
            t0 = time.monotonic()
            connected = self.connect(pool, per_worker)
            wall = time.monotonic() - t0
            time.sleep(5.0)  # let presence and the server's bookkeeping settle
            after = self.meter.rss_by_process()
            lat = self.traffic_pairs(pool, per_worker[0])
            pool.all("disconnecting", "disconnect", {})
        grown = {name: round(after[name] - before.get(name, 0.0), 1) for name in after}
        per_device_kb = round(1024 * sum(grown.values()) / max(1, o.devices), 2) if grown else None
        slowest = max(a["seconds"] for a in connected.values())
        return Result("idle", self.target.profile, {
            "devices": o.devices, "connects_per_s": round(o.devices / max(1e-9, slowest), 1),
            "connect_s": round(wall, 2), "rss_mb": total_mb(after), "rss_by_process_mb": after,
            "rss_growth_mb": grown, "kb_per_device": per_device_kb,
            "projected_mb_for_10k": None if per_device_kb is None
            else round(per_device_kb * 10_000 / 1024 + sum(before.values()), 1),
            **percentiles(lat["latencies_ms"]),
            "latency_at": f"{IDLE_RATE:g} msgs/s over {lat['pairs']} pairs of the idle devices",
            "bytes_per_msg": None, "lost": lat["lost"], "unanswered": lat["unanswered"],
            "duplicates": lat["duplicates"],
            "errors": dict(lat["errors"]),
        })

    def traffic_pairs(self, pool: Pool, held: int) -> dict[str, Any]:
        """20 messages/s for ``seconds``, spread over up to 10 pairs of worker 0's held devices
        (2 a second each: people chatting, not one device flooding its own ordered queue)."""
        pairs = [(2 * j, 2 * j + 1) for j in range(max(1, min(IDLE_PAIRS, held // 2)))]
        answer = pool.run("messages while the devices are held", {0: ("traffic", {
            "flow": "p2p", "mode": "open", "seconds": self.opts.seconds, "rate": IDLE_RATE, "pairs": pairs})},
            timed=self.opts.seconds)
        merged = merge(answer)
        drained = merge_drain(pool.run("waiting for deliveries", {0: ("drain", {"timeout": 30.0})}))
        merged.update(drained, duplicates=merged["duplicates"] + drained["duplicates"], pairs=len(pairs))
        return merged

    def wire(self) -> Result:
        """Bytes on the devices' connections per delivered 20-character text, one pair speaking
        protocol v1 and then one pair speaking v2 (the top-level figures are v1's, under
        ``v2`` the same for v2)."""
        o = self.opts
        t = self.target
        # (name, protocol, over MQTT 5): a pair of devices each
        kinds = [("v1", 1, False), ("v2", 2, False)] + ([("v2_mqtt5", 2, True)] if o.mqtt5 else [])
        with self.pool() as pool:
            self.login(pool, [2 * len(kinds)] + [0] * (o.workers - 1))
            for k, (name, proto, mqtt5) in enumerate(kinds):
                pool.run(f"connecting a {name} pair", {0: ("connect", {
                    "host": t.mqtt_host, "port": t.mqtt_port, "first": 2 * k, "count": 2, "proto": proto,
                    "mqtt5": mqtt5})}, total=2)
            got: dict[str, dict[str, Any]] = {}
            for k, (name, _, _) in enumerate(kinds):
                pair = (2 * k, 2 * k + 1)
                pool.run(f"warm-up ({name})", {0: ("traffic", {
                    "flow": "p2p", "mode": "closed", "seconds": 1.0, "window": 1, "pairs": [pair],
                    "measured": False})}, timed=1.0)
                pool.run("waiting for deliveries", {0: ("drain", {"timeout": 30.0})})
                got[name] = pool.run(f"{o.wire_messages} messages at {o.wire_rate:g}/s ({name})", {0: ("wire", {
                    "sender": pair[0], "recipient": pair[1], "count": o.wire_messages, "rate": o.wire_rate})},
                    timed=o.wire_messages / o.wire_rate + 2)[0]
            pool.all("disconnecting", "disconnect", {})

        def figures(g: dict[str, Any]) -> dict[str, Any]:
            parts = {k: g[k] for k in ("sender_up", "sender_down", "recipient_up", "recipient_down")}
            delivered = max(1, g["delivered"])
            return {
                "delivered": g["delivered"], "bytes_per_msg": round(sum(parts.values()) / delivered, 1),
                "bytes_per_msg_by_direction": {k: round(v / delivered, 1) for k, v in parts.items()},
                **percentiles(g["latencies_ms"]), "lost": g["lost"], "unanswered": g["unanswered"],
                "duplicates": g["duplicates"],
            }

        def mqtt5_figures(g: dict[str, Any]) -> dict[str, Any]:
            return {**figures(g), "topic_aliases_to_broker": g["topic_aliases_to_broker"],
                    "aliased_by_broker": g["aliased_by_broker"]}

        v1, v2 = figures(got["v1"]), figures(got["v2"])
        extra = {"v2_mqtt5": mqtt5_figures(got["v2_mqtt5"])} if "v2_mqtt5" in got else {}
        every = [v1, v2, *extra.values()]
        return Result("wire", self.target.profile, {
            "messages": o.wire_messages, "rate_per_s": o.wire_rate, **v1,
            "latency_at": f"{o.wire_rate:g} msgs/s, one pair", "rss_mb": self.meter.rss_mb(),
            "v2": v2, **extra,
            # nothing lost, unanswered or duplicated in any of the pairs
            "lost": sum(f["lost"] for f in every), "unanswered": sum(f["unanswered"] for f in every),
            "duplicates": sum(f["duplicates"] for f in every),
        })

    def overload(self) -> Result:
        """Full speed (measured first, unless given), half of it for the normal latency, then
        ``overload_factor`` × full speed for ``overload_seconds`` and straight back to half for
        ``recovery_seconds``, open loop; health, login and memory sampled all along."""
        o = self.opts
        per_worker = split(o.pairs, o.workers)
        with self.pool() as pool:
            self.login(pool, [2 * n for n in per_worker])
            self.connect(pool, [2 * n for n in per_worker])
            pairs = {k: [(2 * j, 2 * j + 1) for j in range(n)] for k, n in enumerate(per_worker)}
            self.phase(pool, "warm-up", per_worker, lambda k: {
                "flow": "p2p", "mode": "closed", "seconds": 2.0, "window": 1, "measured": False, "pairs": pairs[k]},
                2.0)
            full = None
            if o.full_speed is None:
                full = self.phase(pool, "overload: full speed first", per_worker, lambda k: {
                    "flow": "p2p", "mode": "closed", "seconds": o.seconds, "window": o.window, "pairs": pairs[k]},
                    o.seconds)
                max_rate = full["delivered"] / max(1e-9, full["seconds"])
            else:
                max_rate = o.full_speed
            offered = max_rate * (o.overload_factor * o.overload_seconds + 0.5 * (o.seconds + o.recovery_seconds))
            if offered > MAX_OFFERED:
                raise BenchError(f"the run would offer {offered:,.0f} sends, more than {MAX_OFFERED:,}: "
                                 "shorten it or lower --overload-factor")

            def plan(what: str, segments: list[tuple[float, float]]) -> tuple[list[Answer], list[float], Any]:
                got = pool.all(what, "plan", lambda k: {
                    "pairs": pairs[k], "segments": [(sec, rate * per_worker[k] / o.pairs) for sec, rate in segments]}
                    if per_worker[k] else None, timed=sum(sec for sec, _ in segments) + 2.0)
                answers: list[Answer] = []
                unanswered: list[float] = []
                for a in got.values():  # times from each worker's own start
                    answers.extend((t0 - a["t_start"], (t1 - t0) * 1000, outcome) for t0, t1, outcome in a["answers"])
                    unanswered.extend(t0 - a["t_start"] for t0 in a["unanswered_at"])
                return answers, unanswered, merge(got)

            normal, _, _ = plan("overload: half of full speed (the normal latency)", [(o.seconds, 0.5 * max_rate)])
            normal_drain = self.drain(pool, per_worker)
            normal_part = overload_part(normal, 0, o.seconds)
            normal_p99 = normal_part["accepted_send_ms"]["p99_ms"]
            rss_before = self.meter.rss_mb()
            with Sampler(self.target.http, self.meter, self.phones) as sampler:
                t_start = time.monotonic()
                answers, unanswered, merged = plan(
                    f"overload: {o.overload_factor:g}x full speed, then half", [
                        (o.overload_seconds, o.overload_factor * max_rate), (o.recovery_seconds, 0.5 * max_rate)])
            drained = self.drain(pool, per_worker)
            pool.all("disconnecting", "disconnect", {})
        over = [a for a in answers if a[0] < o.overload_seconds]
        during = overload_part(over, sum(1 for t in unanswered if t < o.overload_seconds), o.overload_seconds)
        after = recovery(answers, unanswered, o.overload_seconds, o.recovery_seconds, normal_p99)
        samples = [{**x, "t": round(x["t"] - t_start, 1)} for x in sampler.samples]
        in_overload = [x for x in samples if x["t"] < o.overload_seconds]

        def worst(key: str) -> float | None:
            values = [x[key] for x in in_overload]
            return None if None in values or not values else max(values)

        health_max, login_max = worst("health_ms"), worst("login_ms")
        rss = [x["rss_mb"] for x in samples if x["rss_mb"] is not None]
        held = [x["held"] for x in samples if x["held"] is not None]
        refused = Counter(during["refused"])
        return Result("overload", self.target.profile, {
            "msgs_per_s": round(max_rate, 1), "full_speed_measured": o.full_speed is None,
            "overload_factor": o.overload_factor, "overload_seconds": o.overload_seconds,
            "recovery_seconds": o.recovery_seconds, "pairs": o.pairs,
            **during["accepted_send_ms"], "latency_at": f"accepted sends, {o.overload_factor:g}x full speed "
            "(from send to 'sent')",
            "overload": during, "normal": normal_part,
            "delivery_ms": percentiles(merged["latencies_ms"]),
            "rate_limited": refused.get("rate_limited", 0), "unavailable": refused.get("unavailable", 0),
            "responsive": health_max is not None and login_max is not None
            and health_max <= RESPONSIVE_MS and login_max <= RESPONSIVE_MS,
            "health_max_ms": health_max, "login_max_ms": login_max, "samples_in_overload": len(in_overload),
            "rss_mb": max(rss) if rss else None, "rss_before_mb": rss_before, "rss_end_mb": rss[-1] if rss else None,
            "held_max": max(held) if held else None,
            "recovered_after_s": after["recovered_after_s"], "recovery": after,
            "samples": samples, "bytes_per_msg": None,
            "lost": drained["lost"] + normal_drain["lost"], "unanswered": drained["unanswered"],
            "duplicates": drained["duplicates"] + normal_drain["duplicates"] + merged["duplicates"],
            "late_live": drained["late_live"], "recovered_by_sync": drained["recovered_by_sync"],
            "full_speed": None if full is None else percentiles(full["latencies_ms"]),
        })

    def run(self, scenario: str) -> Result:
        runners: dict[str, Callable[[], Result]] = {
            "p2p": self.p2p, "baseline": self.baseline, "group": self.group, "sync": self.sync,
            "idle": self.idle, "wire": self.wire, "overload": self.overload, "failover": self.failover,
        }
        result = runners[scenario]()
        if scenario in DEVICE_SCENARIOS:
            result.fields["proto"] = self.opts.proto
        return result
