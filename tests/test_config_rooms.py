"""``[[rooms.namespaces]]``: loading, validation naming the key, the documented example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatd import config
from chatd.config import ConfigError, RoomNamespace
from chatd.core.rooms import Policies

ROOT = Path(__file__).resolve().parents[1]
CONFIG_TOML = ROOT / "config.toml"


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return config.load(path, env={})


def refused(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def test_no_namespaces_means_every_room_is_open(tmp_path: Path) -> None:
    c = load(tmp_path, "")
    assert c.rooms.namespaces == ()
    policy = Policies(c.rooms.namespaces).for_room("general")
    assert policy is not None and policy.access == "open"
    assert Policies(c.rooms.namespaces).for_room("team:acme") is None


def test_namespaces_load_with_their_defaults(tmp_path: Path) -> None:
    c = load(tmp_path, '[[rooms.namespaces]]\nname = "team"\naccess = "members"\n'
                       'allow_create = true\nmax_members = 50\n'
                       '[[rooms.namespaces]]\nname = "support"\naccess = "token"\n'
                       'history = false\npresence = false\n')
    assert c.rooms.namespaces == (
        RoomNamespace("team", "members", True, True, True, 50),
        RoomNamespace("support", "token", False, False, False, 0),
    )


@pytest.mark.parametrize(("text", "key", "message"), [
    ('name = "te am"', "rooms.namespaces[0].name", "room name prefix without ':'"),
    ('name = "a:b"', "rooms.namespaces[0].name", "without ':'"),
    ('access = "private"', "rooms.namespaces[0].access", "must be open, members or token"),
    ('allow_create = true', "rooms.namespaces[0].allow_create", 'only to access = "members"'),
    ('max_members = -1', "rooms.namespaces[0].max_members", "must be >= 0"),
    ('max_members = "many"', "rooms.namespaces[0].max_members", "must be an integer"),
    ('history = "sometimes"', "rooms.namespaces[0].history", "true or false"),
    ('colour = "blue"', "rooms.namespaces[0].colour", "unknown key"),
])
def test_a_bad_namespace_is_refused_naming_the_key(tmp_path: Path, text: str, key: str,
                                                   message: str) -> None:
    err = refused(tmp_path, f"[[rooms.namespaces]]\n{text}\n")
    assert err.key == key
    assert message in str(err)


def test_a_namespace_listed_twice_is_refused(tmp_path: Path) -> None:
    err = refused(tmp_path, '[[rooms.namespaces]]\nname = "x"\n[[rooms.namespaces]]\nname = "x"\n')
    assert err.key == "rooms.namespaces[1].name"


def test_rooms_namespaces_must_be_tables(tmp_path: Path) -> None:
    assert refused(tmp_path, "[rooms]\nnamespaces = 3\n").key == "rooms.namespaces"
    assert refused(tmp_path, "[rooms]\nnamespaces = [1]\n").key == "rooms.namespaces[0]"


def test_the_documented_example_loads_when_uncommented(tmp_path: Path) -> None:
    lines = CONFIG_TOML.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines)
                 if re.match(r"^#\s*\[\[rooms\.namespaces\]\]", line))
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        body = line[1:].lstrip()
        if re.match(r"^(\[\[rooms\.namespaces\]\]|[A-Za-z_]+\s*=)", body):
            block.append(body)
    c = load(tmp_path, "\n".join(block) + "\n")
    (ns,) = c.rooms.namespaces
    assert ns.name == "team" and ns.access == "members"
    documented = {b.split("=")[0].strip() for b in block[1:]}
    assert documented == {f for f in RoomNamespace.__dataclass_fields__}


def test_check_config_names_the_bad_namespace_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[rooms.namespaces]]\nname = "team"\naccess = "secret"\n')
    proc = subprocess.run([sys.executable, "-m", "chatd", "check-config", "-c", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "chatd: config error: rooms.namespaces[0].access: "
        "must be open, members or token, got 'secret'"]
