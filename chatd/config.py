"""Configuration: frozen dataclasses, loaded from TOML, overridden by ``CHATD_*`` variables.

This is the only module that reads the environment. Every setting has a ``DEFAULT_*``-style
default in its dataclass field, is documented in the top-level ``config.toml``, and is validated
here with a message naming the key (``limits.max_frame_bytes: must be an integer >= 1024``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import math
import os
import re
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatd.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class Duration(float):
    """Seconds; in TOML and the environment also ``"30s"``, ``"15m"``, ``"7d"``."""


def parse_duration(value: object, key: str = "") -> float:
    """Seconds from a number or a string like ``30s``, ``15m``, ``7d``."""
    if isinstance(value, bool):
        raise ConfigError(key, "must be a duration like 30s, 15m, 7d or a number of seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(key, f"must be a duration like 30s, 15m, 7d, got {value!r}")
    if seconds < 0:
        raise ConfigError(key, "must not be negative")
    return seconds


@dataclass(frozen=True)
class KeySpec:
    """One JWT key (``[[auth.keys]]``): bound to exactly one algorithm, chosen by ``kid``.

    Secrets come from ``secret_env`` (a variable name) or ``secret_file``, public keys from
    ``public_key_file`` (PEM) or ``jwks_file``; private keys for signing from ``private_key_file``.
    """

    kid: str = ""
    alg: str = "HS256"
    secret_env: str = ""
    secret_file: str = ""
    public_key_file: str = ""
    private_key_file: str = ""
    jwks_file: str = ""
    signing: bool = False


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    path: str = "/ws"
    node_id: str = ""
    state_dir: str = ""
    allowed_origins: tuple[str, ...] = ()
    max_unauthenticated: int = 5000
    max_unauthenticated_per_address: int = 1000
    #: WebSocket handshakes per second one client address may start (HTTP 429 past it);
    #: 0 disables. IPv6 addresses count per /64.
    accept_rate_per_address: float = 200.0
    accept_burst_per_address: int = 1000
    #: Reverse proxies (addresses or networks) whose X-Forwarded-For is believed.
    trusted_proxies: tuple[str, ...] = ()
    backlog: int = 4096
    ping_interval: Duration = Duration(20)
    ping_timeout: Duration = Duration(20)
    open_timeout: Duration = Duration(10)
    shutdown_timeout: Duration = Duration(10)
    drain_window: Duration = Duration(2)


@dataclass(frozen=True)
class AuthConfig:
    handshake_token: bool = True
    timeout: Duration = Duration(5)
    expiry_grace: Duration = Duration(15)
    leeway: Duration = Duration(30)
    issuer: str = ""
    audience: str = ""
    access_ttl: Duration = Duration(900)
    refresh_ttl: Duration = Duration(7 * 86400)
    refresh_reuse_grace: Duration = Duration(0)
    max_refreshes_per_day: int = 200
    max_sessions_per_user: int = 0
    login_attempts_per_user: int = 10
    login_attempts_per_address: int = 50
    login_window: Duration = Duration(300)
    hash_concurrency: int = 2
    keys: tuple[KeySpec, ...] = ()


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = 20000
    max_frame_bytes: int = 65536
    max_text_chars: int = 4000
    max_rooms_per_connection: int = 100
    max_connections_per_user: int = 20
    max_outbound_bytes: int = 1 << 20
    socket_send_buffer: int = 1 << 18
    rate: float = 20.0
    burst: int = 40
    max_bad_frames: int = 10
    max_rate_limited: int = 20


@dataclass(frozen=True)
class HistoryConfig:
    on_join: int = 20
    max_replay: int = 500
    max_per_room: int = 1000
    ttl: Duration = Duration(86400)


@dataclass(frozen=True)
class PresenceConfig:
    ttl: Duration = Duration(30)


@dataclass(frozen=True)
class RedisConfig:
    url: str = ""
    prefix: str = "chatd:"
    command_timeout: Duration = Duration(2)
    probe_interval: Duration = Duration(1)

    def __repr__(self) -> str:
        return f"RedisConfig(url={_mask_url(self.url)!r}, prefix={self.prefix!r})"


@dataclass(frozen=True)
class MetricsConfig:
    allow: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"


@dataclass(frozen=True)
class RoomNamespace:
    """One ``[[rooms.namespaces]]`` entry: the policy of rooms named ``NAME:...`` (section 9)."""

    name: str = ""
    access: str = "open"
    allow_create: bool = False
    presence: bool = True
    history: bool = True
    max_members: int = 0


@dataclass(frozen=True)
class RoomsConfig:
    namespaces: tuple[RoomNamespace, ...] = ()


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    rooms: RoomsConfig = field(default_factory=RoomsConfig)
    #: HS256 secret from CHATD_JWT_SECRET (never from the file); masked in repr().
    jwt_secret: str = field(default="", repr=False)
    source: str = ""

    @property
    def state_dir(self) -> Path:
        return Path(self.server.state_dir)

    @property
    def node_id(self) -> str:
        return self.server.node_id


def _mask_url(url: str) -> str:
    """A Redis URL without its password (in the user-info part or as a query parameter)."""
    url = re.sub(r"//([^@/]*)@", "//***@", url)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


# Environment variables of the CLI contract (../shared/spec/cli.md) -> (section, key).
_ENV = {
    "CHATD_HOST": ("server", "host"),
    "CHATD_PORT": ("server", "port"),
    "CHATD_STATE_DIR": ("server", "state_dir"),
    "CHATD_NODE_ID": ("server", "node_id"),
    "CHATD_REDIS_URL": ("redis", "url"),
    "CHATD_LOG_LEVEL": ("log", "level"),
}


def _convert(value: object, tp: Any, key: str) -> object:
    """Check and convert one raw value to the field type ``tp``."""
    if tp is Duration:
        return Duration(parse_duration(value, key))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(key, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if typing.get_origin(tp) is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {value!r}")
        if dataclasses.is_dataclass(item):
            return tuple(_build(item, v, f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    raise ConfigError(key, f"unsupported type {tp!r}")  # pragma: no cover - a bug in this module


def _build(cls: Any, raw: object, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix, "must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}" if prefix else unknown[0],
            f"unknown key (known: {', '.join(sorted(names))})",
        )
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if isinstance(tp, types.UnionType):  # pragma: no cover - no optional fields today
            tp = typing.get_args(tp)[0]
        values[name] = _convert(value, tp, key)
    return cls(**values)


_SECTIONS = ("server", "auth", "limits", "history", "presence", "redis", "metrics", "log",
             "rooms")


def default_state_dir(env: Mapping[str, str]) -> str:
    """``$XDG_STATE_HOME/chatd``, else ``~/.local/state/chatd`` (CHATD_STATE_DIR comes later)."""
    xdg = env.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path(env.get("HOME", str(Path.home()))) / ".local" / "state"
    return str(base / "chatd")


def load(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
) -> Config:
    """Load and validate the configuration.

    Precedence, lowest first: defaults, the file (``path``, else ``$CHATD_CONFIG``), ``CHATD_*``
    variables, ``overrides`` (command-line flags).

    Raises:
        ConfigError: naming the offending key.
    """
    env = os.environ if env is None else env
    path = path or env.get("CHATD_CONFIG") or None
    raw: dict[str, dict[str, object]] = {s: {} for s in _SECTIONS}
    source = ""
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("", f"config file not found: {path}") from None
        except OSError as exc:
            raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("", f"{path}: invalid TOML: {exc}") from None
        for section, table in data.items():
            if section not in raw:
                raise ConfigError(section, f"unknown section (known: {', '.join(_SECTIONS)})")
            if not isinstance(table, dict):
                raise ConfigError(section, "must be a table")
            raw[section].update(table)
    for var, (section, key) in _ENV.items():
        if env.get(var):
            hint = typing.get_type_hints(_class_of(section))[key]
            # Checked here so the message names the variable as well as the setting.
            raw[section][key] = _convert(env[var], hint, f"{var} ({section}.{key})")
    for section, table in (overrides or {}).items():
        raw[section].update({k: v for k, v in table.items() if v is not None})
    raw["server"].setdefault("state_dir", default_state_dir(env))
    parts = {s: _build(_class_of(s), raw[s], s) for s in _SECTIONS}
    config = Config(**parts, jwt_secret=env.get("CHATD_JWT_SECRET", ""), source=source)
    if not config.server.node_id:
        config = dataclasses.replace(
            config,
            server=dataclasses.replace(
                config.server,
                node_id=default_node_id(config.server.port, config.server.state_dir),
            ),
        )
    validate(config)
    return config


def _class_of(section: str) -> Any:
    return typing.get_type_hints(Config)[section]


def _at_least(key: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ConfigError(key, f"must be >= {minimum:g}, got {value:g}")


_ORIGIN_RE = re.compile(r"\A(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?\Z")


def origin_problem(origin: str) -> str | None:
    """Why an ``allowed_origins`` entry can never equal a browser's ``Origin``, or None.

    Browsers send the serialised origin (RFC 6454 section 6.1): scheme and host in lower case,
    no default port, no path, no wildcard; the comparison is exact, so anything else is dead.
    """
    if origin == "*":
        return None
    if origin != origin.strip() or any(ch.isspace() for ch in origin):
        return "must not contain whitespace or line breaks"
    if origin != origin.lower():
        return "must be lower case (browsers send the origin in lower case)"
    if "*" in origin:
        return "wildcards are not supported (only * alone): list each origin"
    m = _ORIGIN_RE.match(origin)
    if m is None:
        return "must be an origin like https://chat.example.com (scheme and host, no path)"
    scheme, port = m.group(1), m.group(3)
    if port is not None and (scheme, int(port)) in (("https", 443), ("http", 80)):
        return f"must not name the default port :{port} (browsers omit it)"
    if port is not None and not 0 < int(port) <= 65535:
        return "port must be 1-65535"
    return None


def default_node_id(port: int, state_dir: str) -> str:
    """A stable node id that does not reveal the host name (it is sent in every ``welcome``):
    ``node-`` and 12 hex digits of a SHA-256 of host name, port and state directory."""
    seed = f"{socket.gethostname()}\0{port}\0{state_dir}".encode()
    return "node-" + hashlib.sha256(seed).hexdigest()[:12]


def validate(c: Config) -> None:
    """Cross-field and range checks; each failure names its key."""
    s, a, lim = c.server, c.auth, c.limits
    if not 0 <= s.port <= 65535:
        raise ConfigError("server.port", f"must be 0-65535, got {s.port}")
    if not s.path.startswith("/"):
        raise ConfigError("server.path", "must start with /")
    for i, origin in enumerate(s.allowed_origins):
        problem = origin_problem(origin)
        if problem is not None:
            raise ConfigError(f"server.allowed_origins[{i}]", f"{problem}, got {origin!r}")
    for key, value, minimum in (
        ("limits.max_connections", lim.max_connections, 1),
        ("server.max_unauthenticated", s.max_unauthenticated, 1),
        ("server.max_unauthenticated_per_address", s.max_unauthenticated_per_address, 1),
        ("server.accept_rate_per_address", s.accept_rate_per_address, 0),
        ("server.accept_burst_per_address", s.accept_burst_per_address, 1),
        ("server.backlog", s.backlog, 1),
        ("server.ping_interval", s.ping_interval, 0),
        ("server.shutdown_timeout", s.shutdown_timeout, 0.1),
        ("auth.timeout", a.timeout, 0.1),
        ("auth.access_ttl", a.access_ttl, 1),
        ("auth.refresh_ttl", a.refresh_ttl, 1),
        ("auth.max_refreshes_per_day", a.max_refreshes_per_day, 1),
        ("auth.max_sessions_per_user", a.max_sessions_per_user, 0),
        ("auth.hash_concurrency", a.hash_concurrency, 1),
        ("limits.max_frame_bytes", lim.max_frame_bytes, 256),
        ("limits.max_text_chars", lim.max_text_chars, 1),
        ("limits.max_rooms_per_connection", lim.max_rooms_per_connection, 1),
        ("limits.max_connections_per_user", lim.max_connections_per_user, 1),
        ("limits.max_outbound_bytes", lim.max_outbound_bytes, 1024),
        ("limits.socket_send_buffer", lim.socket_send_buffer, 0),
        ("limits.rate", lim.rate, 0.001),
        ("limits.burst", lim.burst, 1),
        ("limits.max_bad_frames", lim.max_bad_frames, 1),
        ("limits.max_rate_limited", lim.max_rate_limited, 1),
        ("history.on_join", c.history.on_join, 0),
        ("history.max_replay", c.history.max_replay, 1),
        ("history.max_per_room", c.history.max_per_room, 1),
        ("presence.ttl", c.presence.ttl, 3),
        ("redis.command_timeout", c.redis.command_timeout, 0.05),
        ("redis.probe_interval", c.redis.probe_interval, 0.01),
    ):
        _at_least(key, value, minimum)
    if a.leeway > 300:
        raise ConfigError("auth.leeway", f"must be at most 300 seconds, got {a.leeway:g}")
    if c.history.on_join > 100:
        raise ConfigError("history.on_join", "must be at most 100")
    if c.history.max_replay > c.history.max_per_room:
        raise ConfigError("history.max_replay", "must not exceed history.max_per_room")
    if c.redis.url and not re.match(r"^(redis|rediss|unix)://", c.redis.url):
        raise ConfigError("redis.url", "must start with redis://, rediss:// or unix://")
    if c.log.level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level",
                          f"must be debug, info, warning or error, got {c.log.level!r}")
    for i, net in enumerate(c.metrics.allow):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"metrics.allow[{i}]",
                              f"not an address or network: {net!r}") from None
    if not math.isfinite(s.accept_rate_per_address):
        raise ConfigError("server.accept_rate_per_address",
                          "must be a finite number of handshakes per second (0 disables)")
    for i, net in enumerate(s.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies[{i}]",
                              f"not an address or network: {net!r}") from None
    if c.jwt_secret and len(c.jwt_secret.encode()) < 32:
        raise ConfigError("CHATD_JWT_SECRET", "must be at least 32 bytes")
    _validate_rooms(c.rooms)
    kids = [k.kid for k in a.keys]
    if len(set(kids)) != len(kids):
        raise ConfigError("auth.keys", "kid values must be unique")
    if sum(k.signing for k in a.keys) > 1:
        raise ConfigError("auth.keys", "at most one key may have signing = true")


def _validate_rooms(rooms: RoomsConfig) -> None:
    """``[[rooms.namespaces]]``: valid unique names, a known access mode, sane limits."""
    seen: set[str] = set()
    for i, ns in enumerate(rooms.namespaces):
        key = f"rooms.namespaces[{i}]"
        if ns.name and not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z", ns.name):
            raise ConfigError(f"{key}.name", "must be empty (the default namespace) or a room "
                                             f"name prefix without ':', got {ns.name!r}")
        if ns.name in seen:
            raise ConfigError(f"{key}.name", f"namespace {ns.name!r} is listed twice")
        seen.add(ns.name)
        if ns.access not in ("open", "members", "token"):
            raise ConfigError(f"{key}.access",
                              f"must be open, members or token, got {ns.access!r}")
        if ns.allow_create and ns.access != "members":
            raise ConfigError(f"{key}.allow_create", 'applies only to access = "members"')
        _at_least(f"{key}.max_members", ns.max_members, 0)
