"""Prometheus metrics of one node (``GET /metrics``), in a registry of its own.

Counters are incremented once per event or per fan-out (``deliveries`` by the recipient count),
never once per recipient, so metrics cost nothing on the per-recipient hot path.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.connections = Gauge("chatd_connections", "Open WebSocket connections", registry=r)
        self.authenticated = Gauge("chatd_authenticated_connections",
                                   "Authenticated connections", registry=r)
        self.users = Gauge("chatd_authenticated_users", "Distinct users connected", registry=r)
        self.rooms = Gauge("chatd_rooms", "Rooms with local members", registry=r)
        self.messages_in = Counter("chatd_messages_in", "Frames received from clients",
                                   registry=r)
        self.messages_out = Counter("chatd_messages_out", "Messages published by this node",
                                    registry=r)
        self.deliveries = Counter("chatd_deliveries",
                                  "Frames delivered to local sockets by fan-out", registry=r)
        self.auth_failures = Counter("chatd_auth_failures", "Refused credentials", ["reason"],
                                     registry=r)
        self.closes = Counter("chatd_closes", "Connections closed by the server, by code",
                              ["code"], registry=r)
        self.errors = Counter("chatd_errors", "error frames sent, by code", ["code"], registry=r)
        self.fanout = Histogram(
            "chatd_fanout_seconds", "Time to hand one frame to every local recipient",
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25), registry=r)
        self.backend_up = Gauge("chatd_backend_up", "1 while the backend is healthy", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
