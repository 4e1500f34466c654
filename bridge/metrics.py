"""Prometheus metrics, one registry per server instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pigeon_requests", "Device requests handled, by type", ["type"],
                                registry=self.registry)
        self.messages_in = Counter("pigeon_messages_in", "Messages accepted and stored", registry=self.registry)
        self.messages_out = Counter("pigeon_messages_out", "Publications sent to devices", ["qos"],
                                    registry=self.registry)
        self.fanout = Histogram("pigeon_fanout_recipients", "Recipients per stored message",
                                buckets=(1, 2, 5, 10, 25, 50, 100, 250), registry=self.registry)
        self.sync_batches = Counter("pigeon_sync_batches", "Sync batches served", registry=self.registry)
        self.sync_items = Counter("pigeon_sync_items", "Inbox events served by sync", registry=self.registry)
        self.errors = Counter("pigeon_errors", "Errors returned to clients, by code", ["code", "edge"],
                              registry=self.registry)
        self.connected = Gauge("pigeon_connected_devices", "Devices connected to the broker",
                               registry=self.registry)
        self.online = Gauge("pigeon_online_devices", "Devices currently marked online", registry=self.registry)
        self.latency = Histogram(
            "pigeon_handling_seconds", "Time to handle one device request, by type", ["type"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
