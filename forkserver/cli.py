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

    from .config import Settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    import argparse

    from . import __version__
    from .config import cli_flags, field_type

    parser = argparse.ArgumentParser(
        prog="forkserver",
        description="Serve each TCP or Unix-socket connection in its own forked child.",
        epilog="Settings come from the config's [server] table; flags override them. "
        "'forkserver status --help': the live children of a running server.",
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
        kwargs: dict[str, object] = {"dest": f.name, "default": None, "help": f.metadata["help"]}
        if kind is int:
            kwargs.update(type=int, metavar="N")
        elif kind is float:
            kwargs.update(type=float, metavar="SECONDS")
        elif kind is str:
            kwargs["metavar"] = "LEVEL" if f.metadata["choices"] else "VALUE"
        else:  # a list setting: the flag may be repeated
            kwargs.update(action="append", metavar="ADDR")
        parser.add_argument(flag, **kwargs)  # type: ignore[arg-type]
    return parser


def _settings(args: argparse.Namespace, activated: bool = False) -> Settings:
    from .config import ConfigError, Settings, cli_flags, load

    settings = load(args.config) if args.config else Settings()
    overrides = {
        f.name: getattr(args, f.name) for _, f in cli_flags() if getattr(args, f.name) is not None
    }
    where = args.config or "command line"
    if settings.listen and (clash := sorted({"host", "port", "unix"} & set(overrides))):
        flag = "--" + clash[0]
        raise ConfigError(f"{where}: {flag} cannot be combined with [[listen]] tables")
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
            print(f"forkserver: {where}: config OK", file=sys.stderr)
            return EXIT_OK
    except ConfigError as exc:
        print(f"forkserver: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if settings.pidfile and not handover and (other := pidfile.running(settings.pidfile)):
        print(f"forkserver: {settings.pidfile}: already running as pid {other}", file=sys.stderr)
        return EXIT_FAILURE
    if settings.pidfile and not os.access(os.path.dirname(settings.pidfile) or ".", os.W_OK):
        print(f"forkserver: pidfile {settings.pidfile}: directory not writable", file=sys.stderr)
        return EXIT_FAILURE
    s = settings
    inherited = [Listener.adopt(**info) for info in (handover or {}).get("listeners", [])]
    try:
        if activated:
            listeners = adopt_activated(activated)
        else:
            listeners = open_listeners(
                s.listeners(), s.backlog, s.unix_mode, inherited, s.reuse_port
            )
    except BindError as exc:
        if not inherited:
            print(f"forkserver: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        # A reload must not take the server down: serve on what we had.
        log.get_logger("forkserver.cli").error("%s; keeping the listeners we had", exc)
        listeners = [lis for lis in inherited if lis.key[:1] != ("metrics",)]
    try:
        metrics_listener = open_metrics_listener(s.metrics, s.backlog, inherited)
    except BindError as exc:
        print(f"forkserver: metrics: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if settings.log_file:  # only now: errors before this belong on the terminal
        try:
            log.reopen(settings.log_file)
        except OSError as exc:
            print(f"forkserver: log_file {settings.log_file}: {exc.strerror}", file=sys.stderr)
            return EXIT_FAILURE
    try:
        exec_lean_parent(settings, where, listeners, argv, handover, metrics_listener)
    except OSError as exc:
        print(f"forkserver: cannot start the serving parent: {exc}", file=sys.stderr)
    return EXIT_FAILURE  # reached only when the exec failed
