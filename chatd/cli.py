"""The ``chatd`` command line (../shared/spec/cli.md).

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error (one line on stderr,
never a traceback). This is the only place that installs uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from chatd import __version__
from chatd import config as config_module
from chatd.config import Config
from chatd.errors import ChatdError, ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command-line usage: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", metavar="FILE",
                   help="config file (default: $CHATD_CONFIG, else built-in defaults)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chatd", description="chatd: a self-hosted WebSocket chat server")
    parser.add_argument("--version", action="version", version=f"chatd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run a node")
    _config_arg(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--state-dir")
    p.add_argument("--node-id")

    p = sub.add_parser("check-config", help="validate the configuration (exit 0 or 2)")
    _config_arg(p)

    token = sub.add_parser("token", help="access tokens").add_subparsers(
        dest="action", required=True, parser_class=_Parser)
    p = token.add_parser("issue", help="print one access token signed with the configured key")
    p.add_argument("user")
    p.add_argument("--ttl", default="15m", help="lifetime: 30s, 15m, 7d or seconds (default 15m)")
    p.add_argument("--admin", action="store_true", help="grant the admin role")
    _config_arg(p)

    from chatd.cli_accounts import add_account_commands

    add_account_commands(sub, _config_arg)
    from chatd.cli_rooms import add_room_commands

    add_room_commands(sub, _config_arg)
    return parser


def load_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, Any]] = {"server": {
        "host": getattr(args, "host", None),
        "port": getattr(args, "port", None),
        "state_dir": getattr(args, "state_dir", None),
        "node_id": getattr(args, "node_id", None),
    }}
    return config_module.load(args.config, overrides=overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from chatd import logs
    from chatd.app import serve

    config = load_config(args)
    logs.setup(config.log.level)
    _install_uvloop()
    return asyncio.run(serve(config))


def cmd_check_config(args: argparse.Namespace) -> int:
    from chatd.auth.keys import KeyRing

    config = load_config(args)
    KeyRing.from_config(config, create_secret=False)
    print(f"config ok{' (' + config.source + ')' if config.source else ' (defaults)'}")
    return EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    from chatd.auth.keys import KeyRing
    from chatd.auth.tokens import TokenIssuer
    from chatd.protocol import USER_RE

    if not USER_RE.match(args.user):
        raise UsageError(f"chatd token issue: invalid user name {args.user!r}")
    ttl = config_module.parse_duration(args.ttl, "--ttl")
    if ttl <= 0:
        raise UsageError("chatd token issue: --ttl must be positive")
    config = load_config(args)
    keyring, _ = KeyRing.from_config(config)
    issuer = TokenIssuer(keyring, issuer=config.auth.issuer, audience=config.auth.audience)
    token, _claims = issuer.issue(args.user, ttl, role="admin" if args.admin else None)
    print(token)
    return EXIT_OK


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


COMMANDS = {"serve": cmd_serve, "check-config": cmd_check_config, "token": cmd_token}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command in COMMANDS:
            return COMMANDS[args.command](args)
        if args.command == "room":
            from chatd.cli_rooms import run_room_command

            return run_room_command(args, load_config)
        from chatd.cli_accounts import run_account_command

        return run_account_command(args, load_config)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"chatd: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ChatdError as exc:
        print(f"chatd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"chatd: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
