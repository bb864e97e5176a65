"""``forkserver`` / ``python -m forkserver``: load config, bind, serve.

Exit status: 0 after a clean stop, 1 when the server could not start (bind
failure) or died of an error, 2 for a usage or configuration error.  Only
``main()`` turns errors into exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__, log
from .config import ConfigError, Settings, cli_flags, field_type, load
from .listeners import BindError
from .server import Server

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forkserver",
        description="Serve each TCP or Unix-socket connection in its own forked child.",
        epilog="Settings come from the config's [server] table; flags override them.",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML config file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and import the handler, then exit (0 ok, 2 error)",
    )
    parser.add_argument("--version", action="version", version=f"forkserver {__version__}")
    for flag, f in cli_flags():
        kind = field_type(f)
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": f.metadata["help"]}
        if kind is int:
            kwargs.update(type=int, metavar="N")
        elif kind is float:
            kwargs.update(type=float, metavar="SECONDS")
        elif kind is str:
            kwargs["metavar"] = "LEVEL" if f.metadata["choices"] else "VALUE"
        else:  # repeatable list setting
            kwargs.update(action="append", metavar="ADDR")
        parser.add_argument(flag, **kwargs)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = load(args.config) if args.config else Settings()
    overrides = {
        f.name: getattr(args, f.name) for _, f in cli_flags() if getattr(args, f.name) is not None
    }
    if overrides:
        settings = settings.replace("command line", **overrides)
    if not settings.handler:
        where = args.config or "command line"
        raise ConfigError(f'{where}: server.handler is required (e.g. handler = "module:attr")')
    if not settings.host and not settings.unix:
        raise ConfigError(f"{args.config or 'command line'}: no listener: host and unix are empty")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Like gunicorn: handler modules next to where the server is started are
    # importable, also through the console script (which has no '' on sys.path).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    log.setup(args.log_level or "info")
    try:
        settings = _settings(args)
        server = Server.from_settings(settings)
        # After the handler import: if it brought in stdlib logging, use it.
        log.setup(settings.log_level)
    except ConfigError as exc:
        print(f"forkserver: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.check:
        print(f"forkserver: {args.config or 'command line'}: config OK", file=sys.stderr)
        return EXIT_OK
    try:
        server.server_activate()
    except BindError as exc:
        print(f"forkserver: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return EXIT_OK
