"""``[server]``: every setting, once, with its help text, flag, range and checks.

The TOML loader (``load.py``), the command line's flags and the README's
reference table (``reference.py``) are generated from these fields.  Importing
this module costs the serving parent nothing it does not hold already: it
rebuilds its settings with :meth:`Settings.from_dict`, without the checks and
without ``dataclasses`` (see ``fields.py``).
"""

from __future__ import annotations

from ..addresses import host_port
from ..errors import ConfigError
from .fields import Table, deferred_dataclass, setting
from .listen import Listen, check_unique
from .paths import check_log_file, check_pidfile, check_socket_paths
from .sandbox import Sandbox
from .together import check_together
from .values import (
    check_account,
    check_address,
    check_early_drop,
    check_hosts,
    check_networks,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = ["LOG_LEVELS", "TABLE", "Settings"]

TABLE = "server"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@deferred_dataclass(frozen=True)
class Settings(Table):
    """The ``[server]`` table.  Construct with keywords; values are checked."""

    section = TABLE

    host: tuple[str, ...] = setting(
        ("127.0.0.1",),
        "TCP address(es) to listen on: a string or a list. `::` is dual-stack "
        '(IPv4 and IPv6), `""` means all IPv4 addresses, `[]` means no TCP listener.',
        cli="--host",
        metavar="HOST",
        check=check_hosts,
    )
    port: int = setting(
        8000,
        "TCP port for every `host`; 0 picks a free port (logged at start).",
        cli="--port",
        metavar="PORT",
        min=0,
        max=65535,
    )
    unix: tuple[str, ...] = setting(
        (),
        "Unix-domain socket path(s) to listen on. A stale socket file left by a dead "
        "server is replaced; one a live server answers on is not.",
        cli="--unix",
        metavar="PATH",
        path=True,
        check=check_socket_paths,
    )
    unix_mode: int = setting(
        0o666,
        "File mode of the Unix socket files (write it as 0o660 in TOML).",
        min=0,
        max=0o777,
        octal=True,
    )
    reuse_port: bool = setting(
        False,
        "SO_REUSEPORT on the TCP listeners: several forkserver instances may listen on "
        "the same port, and the kernel spreads new connections between them.",
    )
    listen: tuple[Listen, ...] = setting(
        (),
        "Listeners given as `[[listen]]` tables (see below), each with its own protocol "
        "(tcp, udp, unix), handler, TLS and PROXY protocol options. When present, `host`, "
        "`port` and `unix` must not be set.",
        check=check_unique,
    )
    backlog: int = setting(
        128,
        "listen() backlog: connections the kernel queues while the parent is busy or at "
        "`max_children`. Capped by the kernel at net.core.somaxconn (a warning says so).",
        cli="--backlog",
        metavar="N",
        min=1,
        max=65535,
    )
    handler: str = setting(
        "",
        'What serves a connection, as "module:attr": a handler class '
        "(socketserver-style) or a plain function `handler(conn, addr)`. Imported once, "
        'in the parent, before the first fork. Or "exec:/path/prog arg...": a program '
        "run with the connection as stdin and stdout and the UCSPI environment, as "
        "tcpserver and inetd do (split into words, never through a shell). Required, "
        "unless every `[[listen]]` table names its own.",
        cli="--handler",
        metavar="MODULE:ATTR",
    )
    max_children: int = setting(
        1024,
        "Most children alive at once. At the limit the parent stops accepting and "
        "new connections wait in the kernel backlog.",
        cli="--max-children",
        metavar="N",
        min=1,
        max=100_000,
    )
    spare_children: int = setting(
        0,
        "Pre-forked one-shot children kept waiting for a connection, so that no "
        "connection waits for a fork: each still serves exactly one connection, and the "
        "parent forks its replacement meanwhile. Spares accept from TCP and Unix "
        "listeners themselves; the parent accepts and hands the connection over where it "
        "must look first (admission rules, PROXY protocol) and for UDP. 0 forks on "
        "accept. Counts toward `max_children`.",
        cli="--spare-children",
        metavar="N",
        min=0,
        max=100_000,
    )
    graceful_timeout: float = setting(
        30.0,
        "Seconds that running children get to finish after SIGTERM or SIGINT to the "
        "parent before they are sent SIGTERM. (Ctrl-C in a terminal signals the "
        "children too: send SIGTERM to the parent for a graceful stop.)",
        cli="--graceful-timeout",
        metavar="SECONDS",
        min=0,
        max=86400,
    )
    kill_timeout: float = setting(
        5.0,
        "Seconds between SIGTERM to straggling children at shutdown and SIGKILL.",
        min=0,
        max=3600,
    )
    log_level: str = setting("info", "Logging level.", cli="--log-level", choices=LOG_LEVELS)
    log_format: str = setting(
        "text",
        'Log lines as "text" or as "json" objects (time, level, logger, pid, message, '
        "and for access lines their fields).",
        cli="--log-format",
        choices=("text", "json"),
    )
    log_file: str = setting(
        "",
        "Append the log (the parent's, the children's, and anything they write to "
        "stderr) to this file instead of stderr; SIGUSR1 reopens it, for logrotate.",
        cli="--log-file",
        metavar="FILE",
        path=True,
        check=check_log_file,
    )
    access_log: bool = setting(
        False,
        "One line per connection: peer, pid, duration, bytes in and out, how it ended "
        "(exit status, signal and why, or the refusal reason), CPU user and system "
        "time and peak RSS. Costs nothing when off.",
    )
    proc_title: bool = setting(
        True,
        "Process titles for ps and top, with the optional setproctitle (the `[title]` "
        "extra), when serving from the command line: the parent shows its config and "
        'listeners, a child "conn PEER", a spare "spare". Costs each connection about '
        "18 page faults and 0.1 ms of CPU; false costs nothing.",
    )
    metrics: str = setting(
        "",
        "Serve Prometheus metrics (/metrics) and the live children (/children, read by "
        '`forkserver status`) on "HOST:PORT"; each scrape is served by a forked child. '
        "Keep it on loopback. Empty: off.",
        cli="--metrics",
        metavar="HOST:PORT",
        check=check_address(9100),
    )
    pidfile: str = setting(
        "",
        "Write the parent's pid here once it is ready; removed at exit. Refuses to start "
        "while the file names a live process.",
        cli="--pidfile",
        metavar="FILE",
        path=True,
        check=check_pidfile,
    )
    # -- admission: decided in the parent after accept(), before any fork ----
    when_full: str = setting(
        "wait",
        "At `max_children`: `wait` stops accepting, so connections wait in the kernel "
        "backlog (tcpserver, Apache); `refuse` accepts them and closes them at once, "
        "after `busy_message` (PostgreSQL).",
        choices=("wait", "refuse"),
    )
    busy_message: str = setting(
        "",
        'Sent to every refused client before the close (e.g. "busy, try later\\r\\n"); '
        "empty sends nothing.",
    )
    early_drop: str = setting(
        "",
        'Random early drop, like sshd\'s MaxStartups: "start:rate:full" refuses new '
        "connections with probability rate% once `start` children are alive, rising "
        "linearly to 100% at `full`. Empty: off.",
        check=check_early_drop,
    )
    allow: tuple[str, ...] = setting(
        (),
        "Networks (CIDR) whose clients are served; empty allows all. Unix-socket "
        "clients are not filtered.",
        check=check_networks,
    )
    deny: tuple[str, ...] = setting(
        (), "Networks (CIDR) whose clients are refused; wins over `allow`.", check=check_networks
    )
    per_source_limit: int = setting(
        0,
        "Most connections served at once per client address (IPv6: per "
        "`ipv6_prefix` network); 0: no limit.",
        min=0,
        max=100_000,
    )
    per_source_rate: float = setting(
        0.0,
        "New connections per second allowed per client address (a token bucket "
        "holding `per_source_burst`); 0: no limit. One flooding source is refused; "
        "others are not affected.",
        min=0,
        max=1e6,
    )
    per_source_burst: int = setting(
        10,
        "Connections a source may open at once before `per_source_rate` applies.",
        min=1,
        max=100_000,
    )
    ipv6_prefix: int = setting(
        64,
        "IPv6 clients count as one source per network of this prefix length.",
        min=1,
        max=128,
    )
    # -- timeouts ------------------------------------------------------------
    idle_timeout: float = setting(
        0.0,
        "Seconds any receive or send on the connection may wait (the socket's timeout): a "
        "client that sends nothing, or reads nothing, for this long is disconnected and "
        "its child exits. A handler that sets its own timeout replaces it. 0: none.",
        cli="--idle-timeout",
        metavar="SECONDS",
        min=0,
        max=86400,
    )
    send_timeout: float = setting(
        0.0,
        "Seconds a whole `sendall()` (or a `wfile` write and flush) may take, however "
        "many sends it makes: a client that reads too slowly or not at all is "
        "disconnected. exec services get the kernel's bounds instead (see Timeouts). "
        "0: `idle_timeout` bounds each sendall.",
        min=0,
        max=86400,
    )
    request_timeout: float = setting(
        0.0,
        "Seconds the client gets to send its request: from the accept until the "
        "handler's first send after the client's first byte (Apache's mod_reqtimeout "
        "`header=`). Then the connection is closed and its child exits. 0: none.",
        min=0,
        max=86400,
    )
    request_min_rate: int = setting(
        0,
        "Bytes per second that extend `request_timeout` by one second each as they "
        "arrive (mod_reqtimeout's `MinRate`), up to `request_timeout_max`: a client "
        "trickling a byte a second is cut at `request_timeout`. 0: a fixed deadline.",
        min=0,
        max=1 << 30,
    )
    request_timeout_max: float = setting(
        0.0,
        "The most `request_min_rate` may extend `request_timeout` to, in seconds "
        "from the accept; 0: no cap.",
        min=0,
        max=86400,
    )
    max_lifetime: float = setting(
        0.0,
        "Seconds a child may serve one connection; then the parent sends it SIGTERM, and "
        "SIGKILL after `kill_timeout`. 0: no limit.",
        min=0,
        max=1e7,
    )
    # -- what a child may use, and as whom ------------------------------------
    limit_cpu: int = setting(
        -1,
        "RLIMIT_CPU of each child, in seconds (SIGXCPU past it, SIGKILL a second "
        "later); -1: inherited.",
        min=-1,
        max=1 << 31,
    )
    limit_memory_mb: int = setting(
        -1, "RLIMIT_AS of each child, in MiB; -1: inherited.", min=-1, max=1 << 31
    )
    limit_open_files: int = setting(
        -1, "RLIMIT_NOFILE of each child; -1: inherited.", min=-1, max=1 << 20
    )
    limit_core_mb: int = setting(
        -1,
        "RLIMIT_CORE of each child, in MiB (0: no core dumps); -1: inherited.",
        min=-1,
        max=1 << 31,
    )
    user: str = setting(
        "",
        "Run every child as this user (the parent binds first, as root). Empty: as the parent.",
        cli="--user",
        metavar="USER",
        check=check_account("user"),
    )
    group: str = setting(
        "",
        "The children's group; empty: the user's primary group.",
        cli="--group",
        metavar="GROUP",
        check=check_account("group"),
    )
    umask: int = setting(
        -1,
        "The parent's and children's umask (write 0o027 in TOML); -1: inherited.",
        min=-1,
        max=0o777,
        octal=True,
    )
    sandbox: Sandbox | None = setting(
        None,
        "Each connection's sandbox (Landlock, seccomp, no network), given as a "
        "`[sandbox]` table (see below and docs/sandbox.md). Absent: none, at no cost.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_together(self)  # what one key's own check cannot see (together.py)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Settings:
        """Settings holding *values*, unchecked, as ``dataclasses.asdict`` gave them
        (``listen``: a dict for each table).  For the lean parent: imports nothing."""
        listen = tuple(Listen.from_dict(table) for table in values["listen"])
        box = values["sandbox"]
        sandbox = Sandbox.from_dict(box) if box is not None else None
        return super().from_dict({**values, "listen": listen, "sandbox": sandbox})

    def replace(self, source: str, **changes: Any) -> Settings:
        """Return a copy with *changes* applied and checked; *source* names them."""
        import dataclasses

        try:
            return dataclasses.replace(self, **changes)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def listeners(self) -> tuple[Listen, ...]:
        """Every listener: the ``[[listen]]`` tables, or those host, port and unix make."""
        if self.listen:
            return self.listen
        tcp = tuple(Listen(tcp=host_port(h, self.port)) for h in self.host)
        return tcp + tuple(Listen(unix=path) for path in self.unix)
