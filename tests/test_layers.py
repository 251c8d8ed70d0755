"""The direction of dependencies (design notes, "Direction of dependencies"), read with ``ast``.

Every ``import`` counts: at module level, inside functions, under ``if TYPE_CHECKING:``; relative
imports are resolved. A rule names the files it applies to and the modules they may not import,
and the first tests make sure the scanner really sees imports, so the rules cannot pass by
seeing nothing.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHATD = ROOT / "chatd"
LOADTEST = ROOT / "loadtest"

#: Libraries that do I/O or run an event loop: the sans-I/O core imports none of them.
IO_MODULES = ("asyncio", "websockets", "redis", "socket", "sqlite3")
#: Modules of the shell and of backend implementations: the core never reaches up or across.
SHELL_MODULES = ("chatd.server", "chatd.connection", "chatd.handshake", "chatd.app",
                 "chatd.commands", "chatd.cli", "chatd.cli_accounts", "chatd.systemd",
                 "chatd.backends.memory", "chatd.backends.redis",
                 "chatd.backends.redis.broker", "chatd.backends.redis.client",
                 "chatd.backends.redis.feed",
                 "chatd.backends.redis.presence", "chatd.backends.redis.state",
                 "chatd.backends.sqlite.state")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` (the code of ``module``) imports, as absolute dotted names.

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (``c`` may be a submodule).
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(p for p in [*base_parts, node.module or ""] if p)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


@functools.cache
def imports_of(path: Path) -> frozenset[str]:
    return frozenset(imported_modules(path.read_text(encoding="utf-8"), module_name(path),
                                      path.name == "__init__.py"))


def uses(imports: Iterable[str], module: str) -> bool:
    return any(name == module or name.startswith(module + ".") for name in imports)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


ALL_FILES = sorted([*CHATD.rglob("*.py"), *LOADTEST.rglob("*.py")])
CHATD_FILES = sorted(CHATD.rglob("*.py"))

CORE = [CHATD / f"{name}.py" for name in ("protocol", "session", "hub", "ids", "codes", "errors",
                                                  "ratelimit")]
CORE += sorted(p for p in (CHATD / "auth").glob("*.py") if p.name != "password_service.py")


def offenders(files: Iterable[Path], module: str) -> list[str]:
    return [rel(p) for p in files if uses(imports_of(p), module)]


# -- the scanner sees imports ----------------------------------------------------------------


def test_the_scanner_sees_module_function_and_type_checking_imports() -> None:
    source = (
        "from __future__ import annotations\n"
        "import os.path\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from chatd.auth.tokens import Claims\n"
        "def f():\n"
        "    import websockets.asyncio.client\n"
        "    from redis import asyncio as aioredis\n"
    )
    found = imported_modules(source, "chatd.x")
    assert uses(found, "os")
    assert uses(found, "chatd.auth.tokens")
    assert uses(found, "websockets")
    assert uses(found, "redis")
    assert not uses(found, "redis_thing")
    assert not uses(found, "chatd.auth.token")


def test_the_scanner_resolves_relative_imports() -> None:
    found = imported_modules("from . import base\nfrom ..session import Session\n"
                             "from .redis.client import Keys\n", "chatd.backends.memory")
    assert {"chatd.backends.base", "chatd.session", "chatd.backends.redis.client"} <= found
    found = imported_modules("from .tokens import Claims\n", "chatd.auth", is_package=True)
    assert "chatd.auth.tokens" in found


def test_the_scanner_sees_the_real_trees_imports() -> None:
    assert uses(imports_of(CHATD / "server.py"), "websockets")
    assert uses(imports_of(CHATD / "cli_accounts.py"), "websockets")  # inside a function
    assert uses(imports_of(CHATD / "session.py"), "chatd.auth.tokens")  # under TYPE_CHECKING
    assert offenders(ALL_FILES, "redis")
    assert offenders(ALL_FILES, "jwt")


@pytest.mark.parametrize("path", CORE, ids=rel)
def test_every_core_module_exists(path: Path) -> None:
    assert path.is_file(), f"{rel(path)} moved: update tests/test_layers.py"


# -- the rules -------------------------------------------------------------------------------


@pytest.mark.parametrize("module", IO_MODULES)
def test_the_core_does_no_io(module: str) -> None:
    """protocol, session, hub, ids, codes, errors and auth/ are driven by plain calls.

    auth/password_service.py is the one exception: it runs argon2 in a thread pool for asyncio.
    """
    assert offenders(CORE, module) == []


@pytest.mark.parametrize("module", SHELL_MODULES)
def test_the_core_never_imports_the_shell_or_a_backend_implementation(module: str) -> None:
    assert offenders(CORE, module) == []


def test_redis_is_imported_only_by_the_redis_backend() -> None:
    allowed = {rel(p) for p in (CHATD / "backends" / "redis").glob("*.py")}
    assert set(offenders(ALL_FILES, "redis")) - allowed == set()


def test_jwt_is_imported_only_in_chatd_auth() -> None:
    """Within chatd (the load harness mints its own tokens as any client would)."""
    assert [p for p in offenders(CHATD_FILES, "jwt") if not p.startswith("chatd/auth/")] == []


def test_websockets_is_imported_only_by_the_shell_and_the_load_harness() -> None:
    allowed = {"chatd/server.py", "chatd/handshake.py", "chatd/connection.py",
               "chatd/cli_accounts.py"}
    bad = [p for p in offenders(ALL_FILES, "websockets")
           if p not in allowed and not p.startswith("loadtest/")]
    assert bad == []


@pytest.mark.parametrize("module", ["chatd.session", "chatd.hub", "chatd.server",
                                    "chatd.connection", "chatd.commands", "chatd.handshake",
                                    "chatd.app"])
def test_backends_never_see_sessions_the_hub_or_the_server(module: str) -> None:
    assert offenders(sorted((CHATD / "backends").rglob("*.py")), module) == []


@pytest.mark.parametrize("module", ["chatd.server", "chatd.app"])
def test_the_load_harness_never_imports_the_server(module: str) -> None:
    assert offenders(sorted(LOADTEST.rglob("*.py")), module) == []
