"""``forkserver`` / ``python -m forkserver``: load config, bind, serve.

Exit status: 0 after a clean stop, 1 when the server could not start (bind
failure), 2 for a usage or configuration error.  Only ``main()`` turns errors
into exit codes.

Once the config is valid and the listeners are bound, the process re-executes
itself into a lean parent (``boot.py``) so that the parsing machinery is not
copied at every fork; that is why the heavy imports live inside functions.
"""

from __future__ import annotations

import os
import sys

from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from .handover import BOOT_ENV

TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import NoReturn

    from .config import Settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    import argparse

    from . import __version__
    from .addresses import BIND_FORMS
    from .config import cli_flags, field_type, listen_flags, metavar
    from .status import _parser as status_parser

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            """A usage error as one line, like every other error (exit 2)."""
            from .config.text import one_line

            self.exit(EXIT_USAGE, f"forkserver: {one_line(message)} (see forkserver --help)\n")

    status_usage = status_parser().format_usage().removeprefix("usage: ").strip()
    parser = Parser(
        prog="forkserver",
        usage="%(prog)s [-c FILE] [--check] [--bind ADDRESS]... [OPTIONS]\n       " + status_usage,
        description="Serve each TCP, UDP or Unix-socket connection in its own forked child.",
        epilog="Settings come from the config's [server] and [[listen]] tables; flags "
        "override them. Relative paths in a config file are relative to its directory; "
        "on the command line, to the working directory. "
        "'forkserver status --help': the live children of a running server.",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML config file")
    parser.add_argument(
        "--check",
        action="store_true",
        help="validate the config and import the handler, then exit (0 ok, 2 error)",
    )
    parser.add_argument("--version", action="version", version=f"forkserver {__version__}")
    parser.add_argument(
        "-b",
        "--bind",
        action="append",
        metavar="ADDRESS",
        help=f"listen here, instead of the config's listeners; repeatable. {BIND_FORMS}",
    )
    for flag, f in [*cli_flags(), *listen_flags()]:
        kind = field_type(f)
        kwargs: dict[str, object] = {"dest": f.name, "default": None, "metavar": metavar(f)}
        kwargs["help"] = f.metadata["help"]
        if kind in (int, float):
            kwargs["type"] = kind
        elif kind is not str:  # a list setting: the flag may be repeated
            kwargs["action"] = "append"
        parser.add_argument(flag, **kwargs)  # type: ignore[arg-type]
    return parser


def _bind_tables(args: argparse.Namespace) -> list[dict[str, str]]:
    """The [[listen]] tables that ``--bind`` (with ``--tls-cert``/``--tls-key``) gives."""
    from .addresses import BIND_FORMS, parse_bind
    from .config import ConfigError
    from .config.text import show

    tables = []
    for text in args.bind or ():
        try:
            kind, address, tls = parse_bind(text)
        except ValueError as exc:
            raise ConfigError(
                f"command line: --bind {show(text)}: {exc} (expected {BIND_FORMS})"
            ) from None
        table = {kind: address}
        if tls:
            if not (args.tls_cert and args.tls_key):
                raise ConfigError(
                    f"command line: --bind {show(text)} needs --tls-cert FILE and --tls-key FILE"
                )
            table.update(tls_cert=args.tls_cert, tls_key=args.tls_key)
        tables.append(table)
    if (args.tls_cert or args.tls_key) and not any("tls_cert" in t for t in tables):
        flag = "--tls-cert" if args.tls_cert else "--tls-key"
        raise ConfigError(f"command line: {flag} is for a --bind tls:HOST:PORT listener")
    return tables


def _settings(args: argparse.Namespace, activated: bool = False) -> Settings:
    from .config import ConfigError, Settings, cli_flags, load

    settings = load(args.config) if args.config else Settings()
    overrides = {
        f.name: getattr(args, f.name) for _, f in cli_flags() if getattr(args, f.name) is not None
    }
    where = args.config or "command line"
    clash = sorted({"host", "port", "unix"} & set(overrides))
    if clash and args.bind:
        raise ConfigError(f"command line: --{clash[0]} cannot be combined with --bind")
    if clash and settings.listen:
        raise ConfigError(f"{where}: --{clash[0]} cannot be combined with [[listen]] tables")
    if tables := _bind_tables(args):
        overrides["listen"] = tables  # replace the config's listeners, as the flags do
    if overrides:
        settings = settings.replace("command line", **overrides)
    specs = settings.listeners()
    if not settings.handler and (not specs or not all(spec.handler for spec in specs)):
        raise ConfigError(f'{where}: server.handler is required (e.g. handler = "module:attr")')
    if not specs and not activated:
        raise ConfigError(f"{where}: no listener: host and unix are both empty")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    blob = os.environ.pop(BOOT_ENV, None)
    if blob is not None:  # the re-executed, lean parent: see boot.py
        from .boot import lean_main

        return lean_main(blob)
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["status"]:
        from .status import main as status_main

        return status_main(args[1:])
    return _start(args)


def _start(argv: list[str]) -> int:
    from . import log, pidfile
    from .boot import exec_lean_parent
    from .errors import BindError, ConfigError
    from .handlers import import_handler
    from .handover import take_handover
    from .listeners import Listener, adopt_activated, open_listeners, open_metrics_listener
    from .systemd import listen_fds

    args = _parser().parse_args(argv)
    # Like gunicorn: handler modules next to where the server is started are
    # importable, also through the console script (which has no '' on sys.path).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    where = args.config or "command line"
    handover = take_handover()  # a reload or an upgrade: listeners (and children) to keep
    activated = [] if handover else listen_fds()  # systemd: its sockets, not ours
    try:
        settings = _settings(args, bool(activated or handover))  # checks --log-level first
        log.setup(settings.log_level, settings.log_format)
        if args.check:
            from .service import tls_context

            for spec in settings.listeners():
                import_handler(spec.handler or settings.handler, where)
                if spec.tls_cert:
                    tls_context(spec, where)
            return _say(f"{where}: config OK", EXIT_OK)
    except ConfigError as exc:
        return _say(str(exc), EXIT_USAGE)
    # The config's checks saw to the pidfile's directory; this is the one thing left.
    if settings.pidfile and not handover and (other := pidfile.running(settings.pidfile)):
        return _say(f"{settings.pidfile}: already running as pid {other}", EXIT_FAILURE)
    s = settings
    inherited = [Listener.adopt(**info) for info in (handover or {}).get("listeners", [])]
    # Under socket activation a reload inherits systemd's sockets: they stay
    # the listeners, and the config's addresses are not bound beside them.
    from_systemd = [lis for lis in inherited if lis.key[:1] == ("systemd",)]
    try:
        if activated:
            listeners = adopt_activated(activated)
        elif from_systemd:
            listeners = from_systemd
        else:
            listeners = open_listeners(
                s.listeners(), s.backlog, s.unix_mode, inherited, s.reuse_port
            )
    except BindError as exc:
        if not inherited:
            return _say(str(exc), EXIT_FAILURE)
        # A reload must not take the server down: serve on what we had.
        log.get_logger("forkserver.cli").error("%s; keeping the listeners we had", exc)
        listeners = [lis for lis in inherited if lis.key[:1] != ("metrics",)]
    try:
        metrics_listener = open_metrics_listener(s.metrics, s.backlog, inherited)
    except BindError as exc:
        return _say(f"metrics: {exc}", EXIT_FAILURE)
    if settings.log_file:  # only now: errors before this belong on the terminal
        try:
            log.reopen(settings.log_file)
        except OSError as exc:
            return _say(f"log_file {settings.log_file}: {exc.strerror}", EXIT_FAILURE)
    try:
        exec_lean_parent(settings, where, listeners, argv, handover, metrics_listener)
    except OSError as exc:
        return _say(f"cannot start the serving parent: {exc}", EXIT_FAILURE)
    return EXIT_FAILURE  # not reached: exec_lean_parent returns only by raising


def _say(message: str, status: int) -> int:
    """Print *message* on stderr as one line, escaped (it may quote any value), and
    return *status*, the exit status."""
    from .config.text import one_line

    print(f"forkserver: {one_line(message)}", file=sys.stderr)
    return status
