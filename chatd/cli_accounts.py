"""``chatd user ...`` (accounts in the state backend) and ``chatd admin ...`` (live commands).

``user`` subcommands write the backend's account state directly (the SQLite file of the
embedded default, or Redis), so they work whether the server runs or not. ``admin`` subcommands
connect to a running node as an admin (a token minted from the configured signing key, valid
for one minute) and send the admin command of contract section 6, so the effect reaches live
sockets on every node.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Callable
from typing import Any

import orjson

from chatd.config import Config
from chatd.errors import ChatdError, InvalidInput
from chatd.protocol import USER_RE

MIN_PASSWORD_CHARS = 8
ADMIN_OPS = {"kick": "kick", "revoke-tokens": "revoke_tokens", "disable": "disable_user",
             "enable": "enable_user", "revoke-jti": "revoke_jti"}


def add_account_commands(sub: Any, config_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    parser_class = sub._parser_class
    user = sub.add_parser("user", help="manage accounts").add_subparsers(
        dest="action", required=True, parser_class=parser_class)
    for name, text in (("add", "create an account"), ("passwd", "set a new password")):
        p = user.add_parser(name, help=text)
        p.add_argument("user")
        p.add_argument("--password-stdin", action="store_true",
                       help="read the password from the first line of standard input")
        config_arg(p)
    for name, text in (("disable", "refuse login and connections"), ("enable", "allow again"),
                       ("delete", "remove the account")):
        p = user.add_parser(name, help=text)
        p.add_argument("user")
        config_arg(p)
    p = user.add_parser("list", help="list accounts")
    config_arg(p)

    admin = sub.add_parser("admin", help="act on a running cluster").add_subparsers(
        dest="action", required=True, parser_class=parser_class)
    for name, text in (("kick", "close every connection of USER (4410)"),
                       ("revoke-tokens", "refuse every token of USER issued before now"),
                       ("disable", "disable USER and close their connections (4403)"),
                       ("enable", "enable USER again")):
        p = admin.add_parser(name, help=text)
        p.add_argument("user")
        p.add_argument("--url", help="ws:// URL of a node (default: from the config)")
        config_arg(p)
    p = admin.add_parser("revoke-jti", help="refuse one access token by its jti")
    p.add_argument("jti")
    p.add_argument("--exp", type=float, help="the token's exp (unix seconds), bounds the entry")
    p.add_argument("--url", help="ws:// URL of a node (default: from the config)")
    config_arg(p)


def run_account_command(args: argparse.Namespace, load: Callable[[argparse.Namespace], Config]
                        ) -> int:
    from chatd.cli import UsageError

    config = load(args)
    if args.command == "user":
        if getattr(args, "user", None) is not None and not USER_RE.match(args.user):
            raise UsageError(f"chatd user {args.action}: invalid user name {args.user!r}")
        password = None
        if args.action in ("add", "passwd"):
            password = _read_password(args.password_stdin)
        return asyncio.run(_user(config, args, password))
    if getattr(args, "user", None) is not None and not USER_RE.match(args.user):
        raise UsageError(f"chatd admin {args.action}: invalid user name {args.user!r}")
    return asyncio.run(_admin(config, args))


def _read_password(from_stdin: bool) -> str:
    from chatd.cli import UsageError

    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("chatd user: passwords do not match")
    else:
        raise UsageError("chatd user: no terminal to prompt on; use --password-stdin")
    if len(password) < MIN_PASSWORD_CHARS:
        raise UsageError(f"chatd user: password must be at least {MIN_PASSWORD_CHARS} characters")
    return password


async def _user(config: Config, args: argparse.Namespace, password: str | None) -> int:
    """Account changes through :class:`~chatd.auth.accounts.Accounts`, the same rules as a node.

    No node is told (there is none to reach from here): deny entries in the state do the work
    for tokens, and ``chatd admin`` closes live sockets.
    """
    from chatd.app import create_backend
    from chatd.auth.accounts import Accounts
    from chatd.auth.password_service import PasswordService

    backend = create_backend(config)
    passwords = PasswordService(1)
    accounts = Accounts(backend.state, passwords, None, config.auth)
    name = getattr(args, "user", "")
    try:
        if args.action == "list":
            for rec in sorted(await backend.state.list_users(), key=lambda r: r.name):
                print(f"{rec.name}\t{'disabled' if rec.disabled else 'enabled'}")
            return 0
        if args.action == "add":
            assert password is not None
            try:
                await accounts.add_user(name, password)
            except InvalidInput as exc:
                return _fail(f"chatd user add: {exc}", 2)
            ok = True
        elif args.action == "passwd":
            assert password is not None
            try:
                ok = await accounts.set_password(name, password)
            except InvalidInput as exc:
                return _fail(f"chatd user passwd: {exc}", 2)
        elif args.action == "disable":
            ok = await backend.state.get_user(name) is not None
            if ok:
                await accounts.disable_user(name)
        elif args.action == "enable":
            ok = await accounts.enable_user(name)
        else:
            ok = await accounts.delete_user(name)
        if not ok:
            return _fail(f"chatd user {args.action}: no such user {name!r}", 2)
        print(f"user {name}: {args.action} ok")
        return 0
    finally:
        passwords.close()
        backend.state.close()


def _fail(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    return code


async def _admin(config: Config, args: argparse.Namespace) -> int:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

    from chatd.auth.keys import KeyRing
    from chatd.auth.tokens import TokenIssuer

    keyring, _ = KeyRing.from_config(config)
    issuer = TokenIssuer(keyring, issuer=config.auth.issuer, audience=config.auth.audience)
    token, _claims = issuer.issue("chatd-admin", 60.0, role="admin")
    host = config.server.host if config.server.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = args.url or f"ws://{host}:{config.server.port}{config.server.path}"
    frame: dict[str, Any] = {"type": "admin", "op": ADMIN_OPS[args.action], "ref": "cli"}
    if args.action == "revoke-jti":
        frame["jti"] = args.jti
        if args.exp is not None:
            frame["exp"] = args.exp
    else:
        frame["user"] = args.user
    try:
        async with asyncio.timeout(10):
            async with connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                               compression=None) as ws:
                welcome = orjson.loads(await ws.recv())
                if welcome.get("type") != "welcome":
                    return _fail(f"chatd admin: unexpected answer from {url}", 1)
                await ws.send(orjson.dumps(frame).decode())
                while True:
                    answer = orjson.loads(await ws.recv())
                    if answer.get("ref") != "cli":
                        continue
                    if answer.get("type") == "ack":
                        print(f"{args.action} {frame.get('user') or frame.get('jti')}: ok")
                        return 0
                    return _fail(f"chatd admin {args.action}: {answer.get('code')}: "
                                 f"{answer.get('message')}", 1)
    except InvalidURI:
        return _fail(f"chatd admin: not a ws:// URL: {url}", 2)
    except (OSError, InvalidHandshake, ConnectionClosed, TimeoutError) as exc:
        return _fail(f"chatd admin: cannot talk to {url}: {exc}", 1)
    except ChatdError as exc:
        return _fail(f"chatd admin: {exc}", 1)
