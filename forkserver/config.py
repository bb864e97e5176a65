"""Settings: one typed source of truth for TOML, the command line and the README.

Every setting is a field of :class:`Settings` whose metadata holds its help
text, its allowed range and its command-line flag.  The TOML loader, the CLI's
overrides and the README's reference table are all generated from those
fields, so a setting is written down exactly once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["ConfigError", "Settings", "load", "reference_table"]

TABLE = "server"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _setting(
    default: Any,
    help: str,
    *,
    cli: str | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A field of Settings; *check* returns what is wrong with a value, or None."""
    meta = {"help": help, "cli": cli, "min": min, "max": max, "choices": choices, "check": check}
    return field(default=default, metadata=meta)


def _check_cidrs(values: tuple[str, ...]) -> str | None:
    import ipaddress

    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f'"{value}" is not an IPv4 or IPv6 network (like "10.0.0.0/8" or "::1")'
    return None


def _check_early_drop(value: str) -> str | None:
    from .admission import parse_early_drop

    try:
        parse_early_drop(value)
    except ValueError:
        return f'"{value}" is not "start:rate:full" with start < full and rate 0-100'
    return None


def _check_metrics(value: str) -> str | None:
    from .metrics import check_address

    return check_address(value)


def _check_account(kind: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        if not value:
            return None
        import grp
        import pwd

        try:
            (pwd.getpwnam if kind == "user" else grp.getgrnam)(value)
        except KeyError:
            return f'no {kind} "{value}" on this system'
        return None

    return check


def _check_address(value: str) -> str | None:
    from .listeners import address_problem

    return address_problem(value, 8000)


def _check_file(value: str) -> str | None:
    if value and not os.path.isfile(value):
        return f'"{value}": no such file'
    return None


LISTEN_TABLE = "listen"


@dataclass(frozen=True)
class Listen:
    """One ``[[listen]]`` table: an address and how its connections are served."""

    tcp: str = _setting(
        "", 'Listen on TCP "HOST:PORT" ("[::1]:PORT" for IPv6).', check=_check_address
    )
    udp: str = _setting(
        "",
        'Listen on UDP "HOST:PORT": each datagram is served by its own child, whose '
        "request is `(data, socket)` (socketserver's ForkingUDPServer).",
        check=_check_address,
    )
    unix: str = _setting("", "Listen on this Unix-domain socket path.")
    handler: str = _setting(
        "", "This listener's handler (as `server.handler`); empty: `server.handler`."
    )
    tls_cert: str = _setting(
        "",
        "PEM certificate chain: serve TLS here. The handshake runs in the child; the "
        "handler's request is an `ssl.SSLSocket`.",
        check=_check_file,
    )
    tls_key: str = _setting("", "PEM private key for `tls_cert`.", check=_check_file)
    tls_client_ca: str = _setting(
        "",
        "PEM CA bundle: clients must present a certificate it signed (mutual TLS). "
        "Empty: no client certificate asked for.",
        check=_check_file,
    )
    tls_handshake_timeout: float = _setting(
        10.0,
        "Seconds a client gets to complete the TLS handshake; then its child closes "
        "the connection.",
        min=0.001,
        max=3600,
    )
    proxy_protocol: bool = _setting(
        False,
        "Expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy sends) on "
        "each connection: the handler's `client_address`, `allow`/`deny` and the "
        "per-source limits use the client it names. Read by the parent, without "
        "blocking, before the connection is admitted.",
    )
    proxy_trusted: tuple[str, ...] = _setting(
        ("127.0.0.0/8", "::1/128"),
        "Networks (CIDR) allowed to send PROXY headers; connections from elsewhere are "
        "closed. Unix-socket clients are trusted (the socket file's mode guards them).",
        check=_check_cidrs,
    )
    proxy_timeout: float = _setting(
        5.0,
        "Seconds to wait for the whole PROXY header; then the connection is closed.",
        min=0.001,
        max=3600,
    )

    def __post_init__(self) -> None:
        _check_fields(self, LISTEN_TABLE)
        where = LISTEN_TABLE
        given = [k for k in ("tcp", "udp", "unix") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(
                f"each [[{where}]] table needs exactly one of tcp, udp, unix; "
                + (f"got {' and '.join(given)}" if given else "got none")
            )
        name = self.name
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(f"[[{where}]] {name}: tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError(f"[[{where}]] {name}: tls_client_ca needs tls_cert and tls_key")
        if self.udp and (self.tls_cert or self.proxy_protocol):
            key = "tls_cert" if self.tls_cert else "proxy_protocol"
            raise ConfigError(f"[[{where}]] {name}: {key} is for streams (tcp, unix), not udp")
        if self.handler.startswith("exec:") and (self.udp or self.tls_cert):
            raise ConfigError(
                f"[[{where}]] {name}: an exec handler serves plain TCP or Unix streams only"
            )

    @property
    def kind(self) -> str:
        return "tcp" if self.tcp else "udp" if self.udp else "unix"

    @property
    def name(self) -> str:
        """How the table is named in messages: "tcp 127.0.0.1:8000"."""
        return f"{self.kind} {self.tcp or self.udp or self.unix}"

    @property
    def key(self) -> tuple[str, ...]:
        """What identifies the socket across a reload (listeners.Listener.key)."""
        from .listeners import listen_key

        return listen_key(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> Listen:
        try:
            _reject_unknown(cls, values, f"[[{LISTEN_TABLE}]]")
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


@dataclass(frozen=True)
class Settings:
    """The ``[server]`` table.  Construct with keywords; values are checked."""

    host: tuple[str, ...] = _setting(
        ("127.0.0.1",),
        "TCP address(es) to listen on: a string or a list. `::` is dual-stack "
        '(IPv4 and IPv6), `""` means all IPv4 addresses, `[]` means no TCP listener.',
        cli="--host",
    )
    port: int = _setting(
        8000,
        "TCP port for every `host`; 0 picks a free port (logged at start).",
        cli="--port",
        min=0,
        max=65535,
    )
    unix: tuple[str, ...] = _setting(
        (),
        "Unix-domain socket path(s) to listen on. A stale socket file left by a dead "
        "server is replaced; one a live server answers on is not.",
        cli="--unix",
    )
    unix_mode: int = _setting(
        0o666, "File mode of the Unix socket files (write it as 0o660 in TOML).", min=0, max=0o777
    )
    reuse_port: bool = _setting(
        False,
        "SO_REUSEPORT on the TCP listeners: several forkserver instances may listen on "
        "the same port, and the kernel spreads new connections between them.",
    )
    listen: tuple[Listen, ...] = _setting(
        (),
        "Listeners given as `[[listen]]` tables (see below), each with its own protocol "
        "(tcp, udp, unix), handler, TLS and PROXY protocol options. When present, `host`, "
        "`port` and `unix` must not be set.",
    )
    backlog: int = _setting(
        128,
        "listen() backlog: connections the kernel queues while the parent is busy or at "
        "`max_children`. Capped by the kernel at net.core.somaxconn (a warning says so).",
        cli="--backlog",
        min=1,
        max=65535,
    )
    handler: str = _setting(
        "",
        'What serves a connection, as "module:attr": a handler class '
        "(socketserver-style) or a plain function `handler(conn, addr)`. Imported once, "
        'in the parent, before the first fork. Or "exec:/path/prog arg...": a program '
        "run with the connection as stdin and stdout and the UCSPI environment, as "
        "tcpserver and inetd do (split into words, never through a shell). Required, "
        "unless every `[[listen]]` table names its own.",
        cli="--handler",
    )
    max_children: int = _setting(
        1024,
        "Most children alive at once. At the limit the parent stops accepting and "
        "new connections wait in the kernel backlog.",
        cli="--max-children",
        min=1,
        max=100_000,
    )
    spare_children: int = _setting(
        0,
        "Pre-forked one-shot children kept waiting for a connection, so that no "
        "connection waits for a fork: each still serves exactly one connection, and the "
        "parent forks its replacement meanwhile. Spares accept from TCP and Unix "
        "listeners themselves; the parent accepts and hands the connection over where it "
        "must look first (admission rules, PROXY protocol) and for UDP. 0 forks on "
        "accept. Counts toward `max_children`.",
        cli="--spare-children",
        min=0,
        max=100_000,
    )
    graceful_timeout: float = _setting(
        30.0,
        "Seconds that running children get to finish after SIGTERM or SIGINT to the "
        "parent before they are sent SIGTERM. (Ctrl-C in a terminal signals the "
        "children too: send SIGTERM to the parent for a graceful stop.)",
        cli="--graceful-timeout",
        min=0,
        max=86400,
    )
    kill_timeout: float = _setting(
        5.0,
        "Seconds between SIGTERM to straggling children at shutdown and SIGKILL.",
        min=0,
        max=3600,
    )
    log_level: str = _setting("info", "Logging level.", cli="--log-level", choices=LOG_LEVELS)
    log_format: str = _setting(
        "text",
        'Log lines as "text" or as "json" objects (time, level, logger, pid, message, '
        "and for access lines their fields).",
        cli="--log-format",
        choices=("text", "json"),
    )
    log_file: str = _setting(
        "",
        "Append the log (the parent's, the children's, and anything they write to "
        "stderr) to this file instead of stderr; SIGUSR1 reopens it, for logrotate.",
        cli="--log-file",
    )
    access_log: bool = _setting(
        False,
        "One line per connection: peer, pid, duration, bytes in and out, and how it "
        "ended (exit status, signal, or the refusal reason). Costs nothing when off.",
    )
    metrics: str = _setting(
        "",
        "Serve Prometheus metrics (/metrics) and the live children (/children, read by "
        '`forkserver status`) on "HOST:PORT"; each scrape is served by a forked child. '
        "Keep it on loopback. Empty: off.",
        cli="--metrics",
        check=_check_metrics,
    )
    pidfile: str = _setting(
        "",
        "Write the parent's pid here once it is ready; removed at exit. Refuses to start "
        "while the file names a live process.",
        cli="--pidfile",
    )
    # -- admission: decided in the parent after accept(), before any fork ----
    when_full: str = _setting(
        "wait",
        "At `max_children`: `wait` stops accepting, so connections wait in the kernel "
        "backlog (tcpserver, Apache); `refuse` accepts them and closes them at once, "
        "after `busy_message` (PostgreSQL).",
        choices=("wait", "refuse"),
    )
    busy_message: str = _setting(
        "",
        'Sent to every refused client before the close (e.g. "busy, try later\\r\\n"); '
        "empty sends nothing.",
    )
    early_drop: str = _setting(
        "",
        'Random early drop, like sshd\'s MaxStartups: "start:rate:full" refuses new '
        "connections with probability rate% once `start` children are alive, rising "
        "linearly to 100% at `full`. Empty: off.",
        check=_check_early_drop,
    )
    allow: tuple[str, ...] = _setting(
        (),
        "Networks (CIDR) whose clients are served; empty allows all. Unix-socket "
        "clients are not filtered.",
        check=_check_cidrs,
    )
    deny: tuple[str, ...] = _setting(
        (), "Networks (CIDR) whose clients are refused; wins over `allow`.", check=_check_cidrs
    )
    per_source_limit: int = _setting(
        0,
        "Most connections served at once per client address (IPv6: per "
        "`ipv6_prefix` network); 0: no limit.",
        min=0,
        max=100_000,
    )
    per_source_rate: float = _setting(
        0.0,
        "New connections per second allowed per client address (a token bucket "
        "holding `per_source_burst`); 0: no limit. One flooding source is refused; "
        "others are not affected.",
        min=0,
        max=1e6,
    )
    per_source_burst: int = _setting(
        10,
        "Connections a source may open at once before `per_source_rate` applies.",
        min=1,
        max=100_000,
    )
    ipv6_prefix: int = _setting(
        64,
        "IPv6 clients count as one source per network of this prefix length.",
        min=1,
        max=128,
    )
    # -- timeouts ------------------------------------------------------------
    idle_timeout: float = _setting(
        0.0,
        "Seconds any receive or send on the connection may wait (the socket's timeout): a "
        "client that sends nothing, or reads nothing, for this long is disconnected and "
        "its child exits. A handler that sets its own timeout replaces it. 0: none.",
        cli="--idle-timeout",
        min=0,
        max=86400,
    )
    send_timeout: float = _setting(
        0.0,
        "Seconds a send may wait for a client that does not read (SO_SNDTIMEO), when "
        "`idle_timeout` is 0 (otherwise that bounds sends too). 0: none.",
        min=0,
        max=86400,
    )
    max_lifetime: float = _setting(
        0.0,
        "Seconds a child may serve one connection; then the parent sends it SIGTERM, and "
        "SIGKILL after `kill_timeout`. 0: no limit.",
        min=0,
        max=1e7,
    )
    # -- what a child may use, and as whom ------------------------------------
    limit_cpu: int = _setting(
        -1,
        "RLIMIT_CPU of each child, in seconds (SIGXCPU past it); -1: inherited.",
        min=-1,
        max=1 << 31,
    )
    limit_memory_mb: int = _setting(
        -1, "RLIMIT_AS of each child, in MiB; -1: inherited.", min=-1, max=1 << 31
    )
    limit_open_files: int = _setting(
        -1, "RLIMIT_NOFILE of each child; -1: inherited.", min=-1, max=1 << 20
    )
    limit_core_mb: int = _setting(
        -1,
        "RLIMIT_CORE of each child, in MiB (0: no core dumps); -1: inherited.",
        min=-1,
        max=1 << 31,
    )
    user: str = _setting(
        "",
        "Run every child as this user (the parent binds first, as root). Empty: as the parent.",
        check=_check_account("user"),
    )
    group: str = _setting(
        "",
        "The children's group; empty: the user's primary group.",
        check=_check_account("group"),
    )
    umask: int = _setting(
        -1,
        "The parent's and children's umask (write 0o027 in TOML); -1: inherited.",
        min=-1,
        max=0o777,
    )

    def __post_init__(self) -> None:
        _check_fields(self, TABLE)
        if self.user and os.geteuid() != 0:
            import pwd

            if pwd.getpwnam(self.user).pw_uid != os.geteuid():
                raise ConfigError(f'{TABLE}.user: switching to "{self.user}" needs root')
        if self.group and os.geteuid() != 0:
            import grp

            if grp.getgrnam(self.group).gr_gid != os.getegid():
                raise ConfigError(f'{TABLE}.group: switching to "{self.group}" needs root')
        if self.spare_children > self.max_children:
            raise ConfigError(
                f"{TABLE}.spare_children must be at most max_children ({self.max_children}), "
                f"got {self.spare_children}"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> Settings:
        """Build settings from a TOML-like mapping; *source* prefixes every error."""
        try:
            _reject_unknown(cls, values, TABLE)
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def replace(self, source: str, **changes: Any) -> Settings:
        """Return a copy with *changes* applied and checked; *source* names them."""
        try:
            return dataclasses.replace(self, **changes)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def listeners(self) -> tuple[Listen, ...]:
        """Every listener: the ``[[listen]]`` tables, or those host, port and unix make."""
        if self.listen:
            return self.listen
        tcp = tuple(
            Listen(tcp=f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}") for h in self.host
        )
        return tcp + tuple(Listen(unix=path) for path in self.unix)


def _reject_unknown(cls: type, values: Mapping[str, Any], table: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f'did you mean "{close[0]}"?' if close else f"known keys: {', '.join(sorted(known))}"
        shown = f"{table}.{unknown[0]}" if table == TABLE else f"{unknown[0]} in {table}"
        raise ConfigError(f"unknown key {shown} ({hint})")


def _check_fields(instance: Any, table: str) -> None:
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        object.__setattr__(instance, f.name, _check(f, value, f.name, table))


_FIELD_TYPES: dict[str, dict[str, Any]] = {
    TABLE: typing.get_type_hints(Settings),
    LISTEN_TABLE: typing.get_type_hints(Listen),
}
_LISTENS = _FIELD_TYPES[TABLE]["listen"]


def _describe(f: dataclasses.Field[Any], table: str = TABLE) -> str:
    """What a field expects, in words, for error messages and the README."""
    kind = _FIELD_TYPES[table][f.name]
    if kind == _LISTENS:
        return "an array of tables"
    lo, hi, choices = f.metadata["min"], f.metadata["max"], f.metadata["choices"]
    if choices:
        return "one of " + ", ".join(f'"{c}"' for c in choices)
    if kind is int:
        text = "an integer"
    elif kind is float:
        text = "a number"
    elif kind is str:
        return "a string"
    elif kind is bool:
        return "true or false"
    else:
        return "a string or a list of strings"
    if lo is None or hi is None:
        return text
    if f.name == "unix_mode":
        return f"{text} 0o000-0o777"
    if f.name == "umask":
        return f"{text} 0o000-0o777, or -1"
    return f"{text} {lo:g}-{hi:g}" if kind is float else f"{text} {lo}-{hi}"


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _check(f: dataclasses.Field[Any], value: Any, name: str, table: str = TABLE) -> Any:
    """Validate and normalise one value, or raise ConfigError naming the key."""
    kind = _FIELD_TYPES[table][f.name]
    octal = name in ("unix_mode", "umask") and type(value) is int and value >= 0
    shown = f"0o{value:o}" if octal else _show(value)
    key = f"{table}.{name}" if table == TABLE else f"[[{table}]] {name}"
    bad = ConfigError(f"{key} must be {_describe(f, table)}, got {shown}")
    if kind == _LISTENS:
        if not isinstance(value, list | tuple):
            raise bad
        tables = []
        for item in value:
            if isinstance(item, Mapping):
                _reject_unknown(Listen, item, f"[[{LISTEN_TABLE}]]")
                tables.append(Listen(**item))
            elif isinstance(item, Listen):
                tables.append(item)
            else:
                raise bad
        keys = [t.key for t in tables]
        for i, k in enumerate(keys):
            if k in keys[:i] and k[-1] != "0":  # port 0: a fresh port each
                raise ConfigError(f"[[{LISTEN_TABLE}]] {tables[i].name} is given twice")
        return tuple(tables)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        value = float(value)
        if not math.isfinite(value):
            raise bad
    elif kind is str:
        if not isinstance(value, str):
            raise bad
        if f.metadata["choices"]:
            value = value.lower()
            if value not in f.metadata["choices"]:
                raise bad
    elif kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif isinstance(value, str):
        value = (value,)
    elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        value = tuple(value)
    else:
        raise bad
    lo, hi = f.metadata["min"], f.metadata["max"]
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad
    if f.metadata["check"] is not None and value and (problem := f.metadata["check"](value)):
        raise ConfigError(f"{key}: {problem}")
    return value


def load(path: str) -> Settings:
    """Read a TOML file into :class:`Settings`; every problem is a ConfigError."""
    try:
        with open(path, "rb") as fp:
            document = tomllib.load(fp)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    extra = sorted(set(document) - {TABLE, LISTEN_TABLE})
    if extra:
        raise ConfigError(
            f"{path}: unknown table or key {extra[0]!r} "
            f"(expected a [{TABLE}] table and [[{LISTEN_TABLE}]] tables)"
        )
    table = document.get(TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {TABLE} must be a table, got {_show(table)}")
    if LISTEN_TABLE in document:
        listen = document[LISTEN_TABLE]
        if not isinstance(listen, list) or not all(isinstance(t, dict) for t in listen):
            raise ConfigError(f"{path}: listen must be [[{LISTEN_TABLE}]] tables")
        if LISTEN_TABLE in table:
            raise ConfigError(
                f"{path}: give listeners as [[{LISTEN_TABLE}]] tables, not server.listen"
            )
        clash = sorted({"host", "port", "unix"} & set(table))
        if clash:
            raise ConfigError(
                f"{path}: server.{clash[0]} cannot be combined with [[{LISTEN_TABLE}]] "
                "tables: give every listener as a table"
            )
        table = {**table, LISTEN_TABLE: listen}
    return Settings.from_mapping(table, path)


def cli_flags() -> list[tuple[str, dataclasses.Field[Any]]]:
    """(flag, field) for every setting that has a command-line override."""
    return [(f.metadata["cli"], f) for f in dataclasses.fields(Settings) if f.metadata["cli"]]


def field_type(f: dataclasses.Field[Any]) -> Any:
    return _FIELD_TYPES[TABLE][f.name]


def _toml_literal(value: Any, name: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if name in ("unix_mode", "umask") and value >= 0:
        return f"0o{value:o}"
    if isinstance(value, str):
        return f'"{value}"'
    return f"{value!r}"


def reference_table() -> str:
    """The README's config reference: [server], then [[listen]], as Markdown tables."""
    rows = ["| key | default | flag | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(Settings):
        default = "(required)" if f.name == "handler" else f"`{_toml_literal(f.default, f.name)}`"
        flag = f"`{f.metadata['cli']}`" if f.metadata["cli"] else ""
        rows.append(
            f"| `{f.name}` | {default} | {flag} | {f.metadata['help']} Expects {_describe(f)}. |"
        )
    rows += ["", f"Each `[[{LISTEN_TABLE}]]` table:", ""]
    rows += ["| key | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(Listen):
        default = f"`{_toml_literal(f.default, f.name)}`"
        help_text = f"{f.metadata['help']} Expects {_describe(f, LISTEN_TABLE)}."
        rows.append(f"| `{f.name}` | {default} | {help_text} |")
    return "\n".join(rows)
