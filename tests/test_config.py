"""chatd.config: defaults, file + environment + flags, validation naming the key, masked repr.

Also keeps the top-level ``config.toml`` honest: it must load to exactly the defaults and
mention every setting of every section (and of ``[[auth.keys]]``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import typing
from pathlib import Path
from typing import Any

import pytest

from chatd import config
from chatd.config import Config, KeySpec, RedisConfig, parse_duration
from chatd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CONFIG_TOML = ROOT / "config.toml"
SECRET = "k" * 40


def write(tmp_path: Path, text: str, name: str = "chatd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return config.load(write(tmp_path, text), env=env or {})


def refused(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, env)
    return info.value


# -- defaults --------------------------------------------------------------------------------


def test_defaults_load_without_file_or_environment() -> None:
    c = config.load(None, env={})
    assert (c.server.host, c.server.port, c.server.path) == ("127.0.0.1", 8765, "/ws")
    assert c.auth.handshake_token is True
    assert (float(c.auth.timeout), float(c.auth.expiry_grace), float(c.auth.leeway)) == (5, 15, 30)
    assert (c.limits.max_frame_bytes, c.limits.max_text_chars) == (65536, 4000)
    assert (c.limits.max_rooms_per_connection, c.limits.rate, c.limits.burst) == (100, 20, 40)
    assert c.limits.max_bad_frames == 10
    assert (c.history.on_join, c.history.max_replay) == (20, 500)
    assert float(c.presence.ttl) == 30
    assert c.redis.url == ""
    assert (float(c.server.ping_interval), float(c.server.ping_timeout)) == (20, 20)
    assert c.metrics.allow == ("127.0.0.0/8", "::1/128")
    assert c.log.level == "info"
    assert c.jwt_secret == ""
    assert c.source == ""
    assert c.auth.keys == ()


def test_the_default_node_id_is_stable_per_port_and_does_not_reveal_the_host_name(
        tmp_path: Path) -> None:
    env = {"CHATD_STATE_DIR": str(tmp_path)}
    first = config.load(None, env=env).node_id
    assert first == config.load(None, env=env).node_id
    assert first != config.load(None, env={**env, "CHATD_PORT": "9100"}).node_id
    assert first.startswith("node-") and socket.gethostname() not in first


@pytest.mark.parametrize(("origin", "why"), [
    ("https://Chat.example.com", "lower case"),
    ("https://chat.example.com:443", "default port :443"),
    ("http://chat.example.com:80", "default port :80"),
    ("https://*.example.com", "wildcards"),
    ("https://chat.example.com\n", "whitespace"),
    ("https://chat.example.com/", "no path"),
])
def test_allowed_origins_that_can_never_match_are_refused_with_the_reason(
        tmp_path: Path, origin: str, why: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.allowed_origins\[1\]") as info:
        load_text(tmp_path, "[server]\nallowed_origins = [\"https://ok.example.com\", "
                            f"{json.dumps(origin)}]\n")
    assert why in str(info.value)


def test_default_state_dir_is_under_home(tmp_path: Path) -> None:
    c = config.load(None, env={"HOME": str(tmp_path)})
    assert c.state_dir == tmp_path / ".local" / "state" / "chatd"


def test_xdg_state_home_moves_the_default_state_dir(tmp_path: Path) -> None:
    c = config.load(None, env={"HOME": "/nonexistent", "XDG_STATE_HOME": str(tmp_path)})
    assert c.state_dir == tmp_path / "chatd"


def test_chatd_state_dir_wins_over_xdg_state_home(tmp_path: Path) -> None:
    c = config.load(None, env={"XDG_STATE_HOME": "/elsewhere",
                               "CHATD_STATE_DIR": str(tmp_path / "s")})
    assert c.state_dir == tmp_path / "s"


# -- precedence ------------------------------------------------------------------------------

FILE = """
[server]
host = "10.0.0.1"
port = 9000
node_id = "from-file"

[log]
level = "warning"
"""


def test_the_file_overrides_defaults(tmp_path: Path) -> None:
    c = load_text(tmp_path, FILE)
    assert (c.server.host, c.server.port, c.node_id, c.log.level) == (
        "10.0.0.1", 9000, "from-file", "warning")
    assert c.source == str(tmp_path / "chatd.toml")
    assert c.limits.burst == 40  # untouched settings keep their defaults


def test_the_environment_overrides_the_file(tmp_path: Path) -> None:
    c = load_text(tmp_path, FILE, env={"CHATD_PORT": "9001", "CHATD_HOST": "10.0.0.2"})
    assert (c.server.host, c.server.port, c.node_id) == ("10.0.0.2", 9001, "from-file")


def test_overrides_win_over_environment_and_file(tmp_path: Path) -> None:
    c = config.load(write(tmp_path, FILE), env={"CHATD_PORT": "9001"},
                    overrides={"server": {"port": 9002, "host": None, "node_id": "flag"}})
    assert (c.server.port, c.server.host, c.node_id) == (9002, "10.0.0.1", "flag")


def test_an_override_of_none_is_no_override(tmp_path: Path) -> None:
    c = config.load(write(tmp_path, FILE), env={"CHATD_PORT": "9001"},
                    overrides={"server": {"port": None, "state_dir": None}})
    assert c.server.port == 9001


def test_an_empty_environment_variable_is_unset(tmp_path: Path) -> None:
    c = load_text(tmp_path, FILE, env={"CHATD_PORT": "", "CHATD_REDIS_URL": ""})
    assert (c.server.port, c.redis.url) == (9000, "")


def test_chatd_config_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FILE)
    c = config.load(None, env={"CHATD_CONFIG": str(path)})
    assert (c.server.port, c.source) == (9000, str(path))


def test_an_explicit_path_wins_over_chatd_config(tmp_path: Path) -> None:
    other = write(tmp_path, "[server]\nport = 9300\n", "other.toml")
    c = config.load(other, env={"CHATD_CONFIG": str(write(tmp_path, FILE))})
    assert c.server.port == 9300


# -- every CHATD_* variable of the CLI contract ----------------------------------------------


@pytest.mark.parametrize("var,value,get", [
    ("CHATD_HOST", "0.0.0.0", lambda c: c.server.host),
    ("CHATD_PORT", "8000", lambda c: c.server.port),
    ("CHATD_STATE_DIR", "/var/lib/chatd", lambda c: c.server.state_dir),
    ("CHATD_JWT_SECRET", SECRET, lambda c: c.jwt_secret),
    ("CHATD_REDIS_URL", "redis://127.0.0.1:6390/2", lambda c: c.redis.url),
    ("CHATD_REDIS_URL", "rediss://cache.example.com:6380/0", lambda c: c.redis.url),
    ("CHATD_NODE_ID", "node-b", lambda c: c.node_id),
    ("CHATD_LOG_LEVEL", "debug", lambda c: c.log.level),
])
def test_each_chatd_variable_sets_its_setting(var: str, value: str, get: Any) -> None:
    expected: object = int(value) if var == "CHATD_PORT" else value
    assert get(config.load(None, env={var: value})) == expected


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_every_log_level_of_the_contract_is_accepted(level: str) -> None:
    assert config.load(None, env={"CHATD_LOG_LEVEL": level}).log.level == level


@pytest.mark.parametrize("env,key", [
    ({"CHATD_PORT": "eighty"}, "server.port"),
    ({"CHATD_PORT": "70000"}, "server.port"),
    ({"CHATD_PORT": "-1"}, "server.port"),
    ({"CHATD_LOG_LEVEL": "loud"}, "log.level"),
    ({"CHATD_REDIS_URL": "http://127.0.0.1:6379"}, "redis.url"),
    ({"CHATD_JWT_SECRET": "short"}, "CHATD_JWT_SECRET"),
])
def test_a_bad_environment_value_names_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, env=env)
    assert key in info.value.key
    assert str(info.value).startswith(f"{info.value.key}: ")


def test_a_badly_typed_environment_value_names_the_variable_too() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, env={"CHATD_PORT": "eighty"})
    assert str(info.value).startswith("CHATD_PORT (server.port): ")


# -- unknown names and wrong types -----------------------------------------------------------


def test_an_unknown_section_is_named(tmp_path: Path) -> None:
    error = refused(tmp_path, "[sever]\nport = 1\n")
    assert error.key == "sever"
    assert "unknown section" in str(error) and "server" in str(error)


def test_an_unknown_key_is_named_with_its_section(tmp_path: Path) -> None:
    error = refused(tmp_path, "[limits]\nmax_frame_bytez = 1\n")
    assert error.key == "limits.max_frame_bytez"
    assert "unknown key" in str(error) and "max_frame_bytes" in str(error)


def test_an_unknown_key_in_a_key_spec_is_named(tmp_path: Path) -> None:
    error = refused(tmp_path, '[[auth.keys]]\nkid = "a"\nsecret = "inline"\n')
    assert error.key == "auth.keys[0].secret"


def test_a_top_level_key_is_an_unknown_section(tmp_path: Path) -> None:
    assert refused(tmp_path, "port = 8765\n").key == "port"


def test_a_section_that_is_not_a_table_is_named(tmp_path: Path) -> None:
    assert refused(tmp_path, "server = 5\n").key == "server"


@pytest.mark.parametrize("text,key", [
    ('[limits]\nburst = "many"\n', "limits.burst"),
    ("[limits]\nburst = 4.5\n", "limits.burst"),
    ("[limits]\nburst = true\n", "limits.burst"),
    ('[limits]\nrate = "fast"\n', "limits.rate"),
    ("[limits]\nrate = false\n", "limits.rate"),
    ("[server]\nport = \"http\"\n", "server.port"),
    ("[server]\nhost = 127\n", "server.host"),
    ("[server]\nallowed_origins = 5\n", "server.allowed_origins"),
    ("[server]\nallowed_origins = [5]\n", "server.allowed_origins[0]"),
    ('[auth]\nhandshake_token = "maybe"\n', "auth.handshake_token"),
    ("[auth]\nhandshake_token = 1\n", "auth.handshake_token"),
    ("[auth]\nkeys = 5\n", "auth.keys"),
    ("[auth]\nkeys = [5]\n", "auth.keys[0]"),
    ('[[auth.keys]]\nsigning = "yes please"\n', "auth.keys[0].signing"),
    ("[metrics]\nallow = \"10.0.0.0/8 11.0.0.0/8\"\n", "metrics.allow[0]"),
    ("[redis]\nurl = 6379\n", "redis.url"),
    ("[history]\nttl = [1]\n", "history.ttl"),
])
def test_a_wrong_type_is_named(tmp_path: Path, text: str, key: str) -> None:
    error = refused(tmp_path, text)
    assert error.key == key
    assert str(error).startswith(f"{key}: ")


@pytest.mark.parametrize("text,key", [
    ("[server]\nport = 65536\n", "server.port"),
    ('[server]\npath = "ws"\n', "server.path"),
    ('[server]\nallowed_origins = ["chat.example.com"]\n', "server.allowed_origins[0]"),
    ("[limits]\nmax_connections = 0\n", "limits.max_connections"),
    ("[limits]\nmax_frame_bytes = 100\n", "limits.max_frame_bytes"),
    ("[limits]\nmax_text_chars = 0\n", "limits.max_text_chars"),
    ("[limits]\nrate = 0\n", "limits.rate"),
    ("[limits]\nburst = 0\n", "limits.burst"),
    ("[limits]\nmax_bad_frames = 0\n", "limits.max_bad_frames"),
    ("[history]\non_join = 101\n", "history.on_join"),
    ("[history]\nmax_replay = 2000\n", "history.max_replay"),
    ("[presence]\nttl = 1\n", "presence.ttl"),
    ('[log]\nlevel = "verbose"\n', "log.level"),
    ('[[auth.keys]]\nkid = "a"\n[[auth.keys]]\nkid = "a"\n', "auth.keys"),
    ('[[auth.keys]]\nkid = "a"\nsigning = true\n[[auth.keys]]\nkid = "b"\nsigning = true\n',
     "auth.keys"),
])
def test_an_out_of_range_value_is_named(tmp_path: Path, text: str, key: str) -> None:
    assert refused(tmp_path, text).key == key


def test_valid_origins_are_accepted(tmp_path: Path) -> None:
    c = load_text(tmp_path, '[server]\nallowed_origins = ["https://chat.example.com", '
                            '"http://localhost:3000"]\n')
    assert c.server.allowed_origins == ("https://chat.example.com", "http://localhost:3000")
    assert load_text(tmp_path, '[server]\nallowed_origins = ["*"]\n').server.allowed_origins \
        == ("*",)


def test_a_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(missing, env={})
    assert str(missing) in str(info.value)


def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    error = refused(tmp_path, "[server\nport = 1\n")
    assert "chatd.toml" in str(error) and "TOML" in str(error)


def test_a_directory_as_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        config.load(tmp_path, env={})


# -- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize("value,seconds", [
    ("30s", 30.0), ("15m", 900.0), ("7d", 604800.0), ("2h", 7200.0), ("250ms", 0.25),
    ("45", 45.0), ("1.5s", 1.5), (" 10s ", 10.0), (30, 30.0), (2.5, 2.5), (0, 0.0),
])
def test_durations_accept_units_and_plain_seconds(value: object, seconds: float) -> None:
    assert parse_duration(value, "k") == seconds


@pytest.mark.parametrize("value", ["soon", "5x", "s", "", "-5s", "1e3s", "5 minutes", "5 m s",
                                   True, None, [5], -1, -0.5])
def test_bad_durations_are_refused_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "auth.timeout")
    assert info.value.key == "auth.timeout"


@pytest.mark.parametrize("text,attr,seconds", [
    ('[auth]\naccess_ttl = "15m"\n', "access_ttl", 900),
    ('[auth]\nrefresh_ttl = "7d"\n', "refresh_ttl", 604800),
    ('[auth]\ntimeout = "30s"\n', "timeout", 30),
    ("[auth]\ntimeout = 2\n", "timeout", 2),
    ("[auth]\nexpiry_grace = 7.5\n", "expiry_grace", 7.5),
])
def test_duration_settings_in_the_file(tmp_path: Path, text: str, attr: str,
                                       seconds: float) -> None:
    assert getattr(load_text(tmp_path, text).auth, attr) == seconds


def test_a_bad_duration_in_the_file_names_the_key(tmp_path: Path) -> None:
    error = refused(tmp_path, '[server]\nping_interval = "often"\n')
    assert error.key == "server.ping_interval"
    assert "often" in str(error)


# -- auth limits and secrets -----------------------------------------------------------------


@pytest.mark.parametrize("leeway", ["300s", "5m", 300, 0])
def test_leeway_up_to_300_seconds_is_accepted(tmp_path: Path, leeway: object) -> None:
    value = f'"{leeway}"' if isinstance(leeway, str) else str(leeway)
    c = load_text(tmp_path, f"[auth]\nleeway = {value}\n")
    assert c.auth.leeway == parse_duration(leeway)


@pytest.mark.parametrize("leeway", ['"301s"', '"6m"', "300.5", '"1d"'])
def test_leeway_over_300_seconds_is_refused(tmp_path: Path, leeway: str) -> None:
    error = refused(tmp_path, f"[auth]\nleeway = {leeway}\n")
    assert error.key == "auth.leeway"
    assert "300" in str(error)


@pytest.mark.parametrize("secret", ["", "k" * 32, "é" * 16, "k" * 200])
def test_a_jwt_secret_of_at_least_32_bytes_is_accepted(secret: str) -> None:
    assert config.load(None, env={"CHATD_JWT_SECRET": secret}).jwt_secret == secret


@pytest.mark.parametrize("secret", ["k", "k" * 31, "é" * 15 + "k"])
def test_a_jwt_secret_under_32_bytes_is_refused_naming_chatd_jwt_secret(secret: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, env={"CHATD_JWT_SECRET": secret})
    assert "CHATD_JWT_SECRET" in str(info.value)
    assert "32" in str(info.value)
    assert secret not in str(info.value)


def test_the_jwt_secret_is_never_read_from_the_file(tmp_path: Path) -> None:
    assert refused(tmp_path, f'jwt_secret = "{SECRET}"\n').key == "jwt_secret"


# -- metrics.allow and redis.url -------------------------------------------------------------


def test_metrics_allow_takes_addresses_and_networks(tmp_path: Path) -> None:
    c = load_text(tmp_path, '[metrics]\nallow = ["10.0.0.0/8", "192.168.1.7", "::1", '
                            '"fd00::/8", "10.1.2.3/8"]\n')
    assert c.metrics.allow == ("10.0.0.0/8", "192.168.1.7", "::1", "fd00::/8", "10.1.2.3/8")


@pytest.mark.parametrize("net", ["10.0.0.0/33", "not-an-ip", "300.1.1.1", "localhost", "",
                                 "::1/129"])
def test_metrics_allow_refuses_what_is_not_a_network(tmp_path: Path, net: str) -> None:
    error = refused(tmp_path, f'[metrics]\nallow = ["127.0.0.0/8", "{net}"]\n')
    assert error.key == "metrics.allow[1]"


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://user:pw@host:6380/1",
                                 "unix:///run/redis.sock"])
def test_redis_url_accepts_redis_schemes(tmp_path: Path, url: str) -> None:
    assert load_text(tmp_path, f'[redis]\nurl = "{url}"\n').redis.url == url


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis:/x",
                                 "REDIS", "tcp://127.0.0.1:6379"])
def test_redis_url_refuses_other_schemes(tmp_path: Path, url: str) -> None:
    error = refused(tmp_path, f'[redis]\nurl = "{url}"\n')
    assert error.key == "redis.url"
    assert "redis://" in str(error)


# -- secrets never in repr -------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "redis://:hunter2-pw@cache:6379/0",
    "redis://default:hunter2-pw@cache:6379/0",
    "rediss://user:hunter2-pw@cache.example.com:6380",
    "redis://cache:6379/0?password=hunter2-pw",
    "redis://user@cache:6379/0?db=1&password=hunter2-pw",
])
def test_repr_never_shows_the_jwt_secret_or_a_redis_password(url: str) -> None:
    c = config.load(None, env={"CHATD_JWT_SECRET": SECRET, "CHATD_REDIS_URL": url})
    for text in (repr(c), str(c), repr(c.redis), str(c.redis), f"{c!r}"):
        assert SECRET not in text
        assert "hunter2-pw" not in text
    assert "cache" in repr(c.redis)  # still useful: the host is shown


def test_redis_repr_without_a_password_shows_the_url() -> None:
    assert "redis://cache:6379/0" in repr(RedisConfig(url="redis://cache:6379/0"))


# -- the documented config.toml --------------------------------------------------------------


def test_config_toml_loads_to_exactly_the_defaults() -> None:
    from_file = config.load(CONFIG_TOML, env={})
    assert from_file.source == str(CONFIG_TOML)
    assert dataclasses.replace(from_file, source="") == config.load(None, env={})


def test_config_toml_holds_no_secret() -> None:
    text = CONFIG_TOML.read_text(encoding="utf-8")
    assert "jwt_secret" not in text
    assert not re.search(r"redis[s]?://[^\s\"]*:[^\s\"]*@", text)


def _documented(text: str) -> dict[str, set[str]]:
    """Keys mentioned per section, whether set or commented out (``# key = value``)."""
    sections: dict[str, set[str]] = {}
    current = ""
    for line in text.splitlines():
        header = re.match(r"^\s*#?\s*\[\[?([A-Za-z0-9_.]+)\]\]?\s*$", line)
        if header:
            current = header.group(1)
            sections.setdefault(current, set())
            continue
        key = re.match(r"^\s*#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if key and current:
            sections[current].add(key.group(1))
    return sections


def _fields(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_config_toml_documents_every_setting() -> None:
    documented = _documented(CONFIG_TOML.read_text(encoding="utf-8"))
    hints = typing.get_type_hints(Config)
    for section in config._SECTIONS:
        missing = set(_fields(hints[section])) - {"keys"} - documented.get(section, set())
        assert not missing, f"config.toml [{section}] does not document {sorted(missing)}"
    missing = set(_fields(KeySpec)) - documented.get("auth.keys", set())
    assert not missing, f"config.toml [[auth.keys]] does not document {sorted(missing)}"


def test_config_toml_explains_every_setting_in_a_comment_above_it() -> None:
    lines = CONFIG_TOML.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[A-Za-z_]+\s*=", line):
            above = lines[i - 1].strip()
            assert above.startswith("#") or re.match(r"^[A-Za-z_]+\s*=", above), (
                f"config.toml line {i + 1} ({line!r}) has no explanation above it")


def test_config_toml_auth_keys_example_loads_when_uncommented(tmp_path: Path) -> None:
    text = CONFIG_TOML.read_text(encoding="utf-8")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^#\s*\[\[auth\.keys\]\]", line))
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        body = line[1:].lstrip()
        if re.match(r"^(\[\[auth\.keys\]\]|[A-Za-z_]+\s*=)", body):
            block.append(body)
    example = "\n".join(block) + "\n"
    c = load_text(tmp_path, example)
    assert len(c.auth.keys) == 1
    key = c.auth.keys[0]
    assert key.kid and key.alg in ("HS256", "HS384", "HS512", "RS256", "ES256", "EdDSA")
    assert set(_fields(KeySpec)) <= {b.split("=")[0].strip() for b in block[1:]}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_rate_that_is_not_a_finite_number_is_refused(tmp_path: Path, value: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[limits]\nrate = {value}\n")
    with pytest.raises(ConfigError) as info:
        config.load(f, env={})
    assert info.value.key == "limits.rate"
