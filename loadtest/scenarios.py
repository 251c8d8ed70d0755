"""Scenarios: who connects, which rooms they join, who sends what and when.

A :class:`Plan` is computed once by the coordinator from :class:`Params` and handed, whole, to every
worker process; worker ``w`` of ``W`` drives the connections whose index ``i`` has
``i % W == w``. Round-robin assignment spreads every room, and every kind of connection, over
all workers, so each worker sees a representative share of the traffic.

Sending is an *open model*: sender ``k`` of a plan sends message ``n`` at the intended time
``offset_k + n * interval`` after the phase start, whatever happened to the previous message, and
latency is measured from that intended time (no coordinated omission: a stalled server shows up
as latency, not as a lower send rate).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

SCENARIOS = (
    "connect-storm",
    "idle-soak",
    "fan-out",
    "many-rooms",
    "dm",
    "churn",
    "slow-consumers",
)


@dataclass(frozen=True)
class Params:
    """Every knob of a run; the defaults are the *full* benchmark (see :data:`SMOKE`).

    Attributes:
        connections: connections of the scenario (members, or sockets for connect-storm).
        connect_rate: arrivals per second while connecting (open model: a fixed schedule).
        rate: messages per second, all senders together.
        senders: number of senders (fan-out, slow-consumers).
        room_size: members per room (idle-soak, many-rooms, churn).
        duration: seconds of sending (idle-soak: seconds of holding the sockets open).
        size: characters of each message's ``text`` (at least the header the harness needs).
        slow_fraction: share of members that stop reading a quarter of the way in (slow-consumers).
        churn: connections that keep connecting, living ``churn_life`` and leaving (churn).
        churn_life: seconds a churning connection stays.
        auth: ``query`` (``?token=``), ``frame`` (first-frame ``auth``) or ``login``.
        password: the password for ``login`` (users ``<prefix><i>`` must exist).
        user_prefix: user names are ``<prefix><i>``; churners ``<prefix>c<j>``.
        connect_timeout: seconds from the intended time to ``joined`` before a connect fails.
        drain: the most seconds to wait for in-flight deliveries after the last send.
        ttl: lifetime of minted tokens.
        max_outbound: ``limits.max_outbound_bytes`` for servers the harness starts (None: the
            server's default, 1 MiB); the smoke run lowers it so slow consumers trip in seconds.
    """

    scenario: str = "fan-out"
    connections: int = 1000
    connect_rate: float = 2000.0
    rate: float = 100.0
    senders: int = 10
    room_size: int = 10
    duration: float = 20.0
    size: int = 64
    slow_fraction: float = 0.05
    churn: int = 0
    churn_life: float = 2.0
    auth: str = "query"
    password: str = ""
    user_prefix: str = "lt"
    connect_timeout: float = 15.0
    drain: float = 10.0
    ttl: float = 7200.0
    max_outbound: int | None = None

#: Share of the measured phase after which slow consumers stop reading. A quarter leaves three
#: quarters for a stalled socket to fill the kernel's send buffer (Linux autotunes it up to
#: ``tcp_wmem``'s 4 MiB) and then the server's ``limits.max_outbound_bytes`` (1 MiB) at
#: ~100 KB/s, so every slow consumer is closed within the run rather than only some.
SLOW_AT = 0.25

#: Full-run defaults per scenario (one command each reproduces a row of docs/benchmarks.md).
FULL: dict[str, dict[str, object]] = {
    "connect-storm": {"connections": 10000, "connect_rate": 2000.0, "duration": 0.0},
    "idle-soak": {"connections": 10000, "connect_rate": 2000.0, "room_size": 10, "duration": 10.0},
    "fan-out": {"connections": 1000, "senders": 10, "rate": 50.0, "duration": 20.0},
    "many-rooms": {"connections": 5000, "room_size": 10, "rate": 2000.0, "duration": 20.0},
    "dm": {"connections": 5000, "rate": 2000.0, "duration": 20.0},
    "churn": {
        "connections": 2000, "room_size": 20, "rate": 500.0, "churn": 200, "churn_life": 2.0,
        "duration": 20.0,
    },
    "slow-consumers": {
        "connections": 1000, "senders": 10, "rate": 50.0, "duration": 60.0, "size": 2000,
        "slow_fraction": 0.05,
    },
}

#: Smoke-run defaults: a few hundred sockets for a few seconds (CI).
SMOKE: dict[str, dict[str, object]] = {
    "connect-storm": {"connections": 300, "connect_rate": 1000.0, "duration": 0.0},
    "idle-soak": {"connections": 300, "connect_rate": 1000.0, "room_size": 10, "duration": 1.0},
    "fan-out": {"connections": 200, "senders": 4, "rate": 40.0, "duration": 2.0},
    "many-rooms": {"connections": 300, "room_size": 10, "rate": 200.0, "duration": 2.0},
    "dm": {"connections": 200, "rate": 200.0, "duration": 2.0},
    "churn": {
        "connections": 200, "room_size": 20, "rate": 100.0, "churn": 20, "churn_life": 0.5,
        "duration": 2.0,
    },
    "slow-consumers": {
        "connections": 200, "senders": 4, "rate": 100.0, "duration": 6.0, "size": 2000,
        "slow_fraction": 0.05, "max_outbound": 65536,
    },
}


def defaults(scenario: str, smoke: bool) -> Params:
    """The preset parameters of ``scenario`` (full benchmark, or smoke run)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")
    table = SMOKE if smoke else FULL
    return replace(Params(scenario=scenario), **table[scenario])  # type: ignore[arg-type]


@dataclass(frozen=True)
class ConnSpec:
    """One long-lived connection of the plan."""

    idx: int
    user: str
    rooms: tuple[str, ...] = ()
    slow: bool = False


@dataclass(frozen=True)
class SenderSpec:
    """A sending connection and its fixed schedule (times relative to the phase start)."""

    idx: int
    room: str | None
    to: str | None
    count: int
    interval: float
    offset: float


@dataclass(frozen=True)
class ChurnSpec:
    """A churn slot: a connection that repeatedly joins ``room``, stays, and leaves."""

    slot: int
    user: str
    room: str


@dataclass
class Plan:
    """Everything the workers need; identical in every worker."""

    params: Params
    workers: int
    conns: list[ConnSpec]
    senders: list[SenderSpec]
    churn: list[ChurnSpec] = field(default_factory=list)
    #: room -> indices of the senders sending to it.
    room_senders: dict[str, list[int]] = field(default_factory=dict)
    #: recipient connection index -> indices of the senders sending DMs to it.
    dm_senders: dict[int, list[int]] = field(default_factory=dict)
    #: seconds after the phase start at which slow consumers stop reading (None: never).
    slow_at: float | None = None

    @property
    def counts(self) -> dict[int, int]:
        """sender index -> messages it will send."""
        return {s.idx: s.count for s in self.senders}

    def audience(self, sender: SenderSpec) -> int:
        """How many connections of the plan should receive each message of ``sender``."""
        if sender.to is not None:
            return 1
        return sum(1 for c in self.conns if sender.room in c.rooms)


def _schedule(idxs: list[int], targets: list[tuple[str | None, str | None]], p: Params) -> list[
    SenderSpec
]:
    """Spread ``p.rate`` over the senders: each sends every ``n/rate`` s, offsets interleaved."""
    n = len(idxs)
    if n == 0 or p.rate <= 0 or p.duration <= 0:
        return []
    interval = n / p.rate
    count = max(1, int(p.duration / interval))
    return [
        SenderSpec(idx=i, room=room, to=to, count=count, interval=interval, offset=k / p.rate)
        for k, (i, (room, to)) in enumerate(zip(idxs, targets, strict=True))
    ]


def build(p: Params, workers: int) -> Plan:
    """The plan of ``p.scenario`` for ``workers`` worker processes."""
    n, pre = p.connections, p.user_prefix
    user = [f"{pre}{i}" for i in range(n)]
    if p.scenario == "connect-storm":
        return Plan(p, workers, [ConnSpec(i, user[i]) for i in range(n)], [])
    if p.scenario in ("idle-soak", "many-rooms", "churn"):
        k = max(1, p.room_size)
        conns = [ConnSpec(i, user[i], (f"{pre}-room-{i // k}",)) for i in range(n)]
        if p.scenario == "idle-soak":
            return Plan(p, workers, conns, [])
        # One member of every room sends: member r % k of room r, so that the senders are spread
        # over the workers (i % W) even when k is a multiple of W.
        idxs = [r * k + r % k for r in range((n + k - 1) // k) if r * k + r % k < n]
        senders = _schedule(idxs, [(conns[i].rooms[0], None) for i in idxs], p)
        churn = []
        if p.scenario == "churn":
            rooms = sorted({c.rooms[0] for c in conns})
            churn = [ChurnSpec(j, f"{pre}c{j}", rooms[j % len(rooms)]) for j in range(p.churn)]
        plan = Plan(p, workers, conns, senders, churn)
    elif p.scenario in ("fan-out", "slow-consumers"):
        room = f"{pre}-fan"
        s = max(1, min(p.senders, n))
        slow: set[int] = set()
        if p.scenario == "slow-consumers" and p.slow_fraction > 0:
            listeners = n - s
            want = min(listeners, round(listeners * p.slow_fraction))
            slow = {s + int(j * listeners / want) for j in range(want)} if want else set()
        conns = [ConnSpec(i, user[i], (room,), slow=i in slow) for i in range(n)]
        senders = _schedule(list(range(s)), [(room, None)] * s, p)
        plan = Plan(p, workers, conns, senders)
        if p.scenario == "slow-consumers":
            plan.slow_at = p.duration * SLOW_AT
    elif p.scenario == "dm":
        conns = [ConnSpec(i, user[i]) for i in range(n)]
        # The partner is W connections further on, so (when W divides n) it lives in the same
        # worker and that worker can time the delivery with its own clock.
        partner = [(i + workers) % n if n > workers else (i + 1) % n for i in range(n)]
        senders = _schedule(list(range(n)), [(None, user[partner[i]]) for i in range(n)], p)
        plan = Plan(p, workers, conns, senders)
        for sp in senders:
            plan.dm_senders.setdefault(partner[sp.idx], []).append(sp.idx)
        return plan
    else:
        raise ValueError(f"unknown scenario {p.scenario!r}")
    for sp in plan.senders:
        if sp.room is not None:
            plan.room_senders.setdefault(sp.room, []).append(sp.idx)
    return plan
