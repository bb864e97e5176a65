"""Metrics: counted by the parent, reported by a child forked for each scrape.

The parent only counts (``Server.accepted``, ``refused``, ``fork_failures``,
the child table's ``exited_*``) and computes nothing for metrics.  A connection
to the metrics listener is forked like any other; that scrape child holds a
copy-on-write image of the parent's counters and child table as they were at
fork time, reads them with :func:`snapshot`, asks the kernel about each live
child through psutil, answers with :func:`serve_metrics`, and exits:

* ``GET /metrics``: Prometheus text format 0.0.4 (:func:`render_prometheus`);
* ``GET /children``: JSON for ``forkserver status`` (:func:`render_children`).

Only the scrape child imports psutil and json: psutil imports threading, whose
at-fork hook would cost every child of the parent (see log.py).  At module
level this file imports nothing the parent has not imported already.
"""

from __future__ import annotations

import os
import socket
import time

from .addresses import address_problem, parse_address

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Protocol, TypedDict

    class ChildView(Protocol):
        """What a snapshot reads from a :class:`forkserver.children.Child`."""

        @property
        def pid(self) -> int: ...
        @property
        def peer(self) -> object: ...
        @property
        def started(self) -> float: ...  # time.monotonic() when it began serving
        @property
        def peer_text(self) -> str: ...

    class ChildTableView(Protocol):
        """What a snapshot reads from a :class:`forkserver.children.ChildTable`."""

        def __iter__(self) -> Iterator[ChildView]: ...
        @property
        def exited_ok(self) -> int: ...
        @property
        def exited_error(self) -> int: ...
        @property
        def exited_signal(self) -> int: ...

    class SettingsView(Protocol):
        @property
        def max_children(self) -> int: ...
        @property
        def spare_children(self) -> int: ...

    class ServerView(Protocol):
        """What a snapshot reads from a :class:`forkserver.server.Server`."""

        @property
        def accepted(self) -> int: ...
        @property
        def fork_failures(self) -> int: ...
        @property
        def refused(self) -> dict[str, int]: ...
        @property
        def children(self) -> ChildTableView: ...
        @property
        def _idle(self) -> set[int]: ...
        @property
        def settings(self) -> SettingsView: ...

    class ChildInfo(TypedDict):
        pid: int
        peer: str  # "" for a spare that has no connection yet
        age: float  # seconds since it started serving (a spare: since fork)
        state: str  # "busy" or "idle"

    class Snapshot(TypedDict):
        pid: int  # the parent's
        max_children: int
        spare_children: int
        accepted: int
        fork_failures: int
        refused: dict[str, int]  # reason -> count
        exited: dict[str, int]  # "ok", "error", "signal" -> count
        children: list[ChildInfo]

    # (rss, uss, cpu seconds); uss is None where smaps cannot be read.
    ProcStats = tuple[int, int | None, float]


__all__ = [
    "CHILDREN_PATH",
    "CONTENT_TYPE",
    "METRICS_PATH",
    "check_address",
    "parse_address",
    "process_stats",
    "render_children",
    "render_prometheus",
    "serve_metrics",
    "snapshot",
]

METRICS_PATH = "/metrics"
CHILDREN_PATH = "/children"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_TYPE = "application/json"
TIMEOUT = 5.0  # for the whole request head, and again for sending the answer
MAX_HEAD = 8192  # request line and headers; nothing else is read
LINGER = 1.0  # at most this long reading what a client sent beyond that
MAX_LINGER = 1 << 20


# -- the address setting ------------------------------------------------------


def check_address(value: str) -> str | None:
    """For the ``metrics`` setting's *check*: what is wrong with *value*, or None.
    Empty means no metrics listener."""
    return address_problem(value, 9100) if value else None


# -- what the scrape child reads ------------------------------------------------


def snapshot(server: ServerView, parent_pid: int | None = None) -> Snapshot:
    """The server's counters and child table as plain data.

    In the scrape child, pass ``parent_pid=os.getppid()`` (or the pid read
    before fork); it defaults to the calling process, for a caller that is
    the parent itself.
    """
    now = time.monotonic()
    idle = server._idle
    children: list[ChildInfo] = [
        {
            "pid": child.pid,
            "peer": "" if child.peer is None else child.peer_text,
            "age": max(0.0, now - child.started),
            "state": "idle" if child.pid in idle else "busy",
        }
        for child in server.children
    ]
    table = server.children
    return {
        "pid": os.getpid() if parent_pid is None else parent_pid,
        "max_children": server.settings.max_children,
        "spare_children": server.settings.spare_children,
        "accepted": server.accepted,
        "fork_failures": server.fork_failures,
        "refused": dict(server.refused),
        "exited": {
            "ok": table.exited_ok,
            "error": table.exited_error,
            "signal": table.exited_signal,
        },
        "children": children,
    }


def process_stats(pids: Iterable[int], parent_pid: int | None) -> dict[int, ProcStats | None]:
    """psutil's view of each live child: pid -> (rss, uss, cpu seconds).

    A child that is gone (exited, a zombie, or its pid now belongs to a
    process whose parent is not *parent_pid*) is left out; one that is alive
    but unreadable maps to None.  USS needs /proc/PID/smaps, which a child
    that dropped privileges may deny: its uss is then None.
    """
    import psutil

    stats: dict[int, ProcStats | None] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                if proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                if parent_pid is not None and proc.ppid() != parent_pid:
                    continue  # exited, and its pid was reused
                times = proc.cpu_times()
                try:
                    full = proc.memory_full_info()
                    rss, uss = full.rss, full.uss
                except psutil.AccessDenied:
                    rss, uss = proc.memory_info().rss, None
        except psutil.NoSuchProcess:  # ZombieProcess included
            continue
        except psutil.AccessDenied:
            stats[pid] = None
            continue
        stats[pid] = (rss, uss, times.user + times.system)
    return stats


def _parent_stats(pid: int) -> tuple[int, float] | None:
    """The parent's (rss, start time as a Unix timestamp), if it is readable."""
    import psutil

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return proc.memory_info().rss, proc.create_time()
    except psutil.Error:
        return None


# -- Prometheus text format 0.0.4 -------------------------------------------------


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    # Counts, sizes and timestamps: always finite, so repr() is the format.
    return str(value) if isinstance(value, int) else repr(value)


def _family(
    out: list[str],
    name: str,
    kind: str,
    help_text: str,
    samples: Iterable[tuple[dict[str, str] | None, float]],
) -> None:
    out.append(f"# HELP {name} {_escape_help(help_text)}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            out.append(f"{name} {_number(value)}")


def render_prometheus(snap: Snapshot, with_process_stats: bool = True) -> str:
    """*snap* in Prometheus text format 0.0.4.

    With *with_process_stats*, adds the children's total RSS and USS and the
    parent's RSS and start time, read through psutil (children that are gone
    are left out of the sums).
    """
    out: list[str] = []
    _family(
        out,
        "forkserver_connections_accepted_total",
        "counter",
        "Connections accepted from the listeners, including those then refused.",
        [(None, snap["accepted"])],
    )
    _family(
        out,
        "forkserver_connections_refused_total",
        "counter",
        "Accepted connections closed unserved, by reason.",
        [({"reason": reason}, n) for reason, n in sorted(snap["refused"].items())],
    )
    _family(
        out,
        "forkserver_fork_failures_total",
        "counter",
        "fork() calls that failed (for a connection or for a spare).",
        [(None, snap["fork_failures"])],
    )
    _family(
        out,
        "forkserver_children_exited_total",
        "counter",
        'Children reaped, by how they ended: "ok" (exit status 0), "error" '
        '(another exit status), "signal" (killed by a signal).',
        [({"how": how}, snap["exited"][how]) for how in ("ok", "error", "signal")],
    )
    idle = sum(1 for c in snap["children"] if c["state"] == "idle")
    busy = len(snap["children"]) - idle
    _family(
        out,
        "forkserver_children",
        "gauge",
        'Live children: "busy" serving a connection, "idle" spares waiting for one.',
        [({"state": "busy"}, busy), ({"state": "idle"}, idle)],
    )
    _family(
        out,
        "forkserver_max_children",
        "gauge",
        "The max_children setting.",
        [(None, snap["max_children"])],
    )
    _family(
        out,
        "forkserver_spare_children",
        "gauge",
        "The spare_children setting.",
        [(None, snap["spare_children"])],
    )
    if with_process_stats:
        stats = process_stats([c["pid"] for c in snap["children"]], snap["pid"])
        known = [s for s in stats.values() if s is not None]
        _family(
            out,
            "forkserver_children_rss_bytes",
            "gauge",
            "Resident set size summed over the live children (shared pages counted in each).",
            [(None, sum(s[0] for s in known))],
        )
        _family(
            out,
            "forkserver_children_uss_bytes",
            "gauge",
            "Unique set size summed over the live children: memory only they hold.",
            [(None, sum(s[1] for s in known if s[1] is not None))],
        )
        parent = _parent_stats(snap["pid"])
        _family(
            out,
            "forkserver_parent_rss_bytes",
            "gauge",
            "Resident set size of the parent.",
            [(None, parent[0])] if parent else [],
        )
        _family(
            out,
            "forkserver_parent_start_time_seconds",
            "gauge",
            "When the parent process started, as a Unix timestamp.",
            [(None, parent[1])] if parent else [],
        )
    out.append("")
    return "\n".join(out)


# -- JSON for `forkserver status` -------------------------------------------------


def render_children(snap: Snapshot, with_process_stats: bool = True) -> str:
    """*snap* as the JSON document ``forkserver status`` reads.

    ``{"pid", "uptime", "parent_rss", "max_children", "spare_children",
    "children": [{"pid", "peer", "age", "state", "rss", "uss", "cpu"}]}``;
    sizes in bytes, times in seconds, null where unknown.  Children that are
    gone by the time psutil looks are left out.
    """
    import json

    stats: dict[int, ProcStats | None] = {}
    parent = None
    if with_process_stats:
        stats = process_stats([c["pid"] for c in snap["children"]], snap["pid"])
        parent = _parent_stats(snap["pid"])
    children = []
    for child in snap["children"]:
        if with_process_stats and child["pid"] not in stats:
            continue
        got = stats.get(child["pid"])
        rss, uss, cpu = got if got is not None else (None, None, None)
        children.append({**child, "rss": rss, "uss": uss, "cpu": cpu})
    document = {
        "pid": snap["pid"],
        "uptime": max(0.0, time.time() - parent[1]) if parent else None,
        "parent_rss": parent[0] if parent else None,
        "max_children": snap["max_children"],
        "spare_children": snap["spare_children"],
        "children": children,
    }
    return json.dumps(document, indent=1) + "\n"


# -- the scrape child's HTTP/1.0 responder --------------------------------------


def _read_head(conn: socket.socket, deadline: float) -> bytes:
    """The request line and headers (up to MAX_HEAD bytes, or what came before
    EOF); raises TimeoutError at *deadline*."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < MAX_HEAD:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(MAX_HEAD - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _answer(conn: socket.socket, snap: Snapshot, timeout: float) -> int:
    try:
        head = _read_head(conn, time.monotonic() + timeout)
    except TimeoutError:
        return _respond(conn, 408, "Request Timeout", timeout)
    line, newline, _ = head.partition(b"\n")
    parts = line.rstrip(b"\r").split()
    if (
        not newline
        or len(parts) != 3
        or not parts[2].startswith(b"HTTP/")
        or not parts[1].isascii()
    ):
        return _respond(conn, 400, "Bad Request", timeout)
    method, target = parts[0], parts[1].decode("ascii")
    if method not in (b"GET", b"HEAD"):
        return _respond(conn, 405, "Method Not Allowed", timeout, allow=True)
    path = target.partition("?")[0]
    if path == METRICS_PATH:
        body, ctype = render_prometheus(snap), CONTENT_TYPE
    elif path == CHILDREN_PATH:
        body, ctype = render_children(snap), JSON_TYPE
    else:
        return _respond(conn, 404, "Not Found", timeout)
    return _respond(conn, 200, "OK", timeout, body, ctype, head_only=method == b"HEAD")


def _respond(
    conn: socket.socket,
    status: int,
    reason: str,
    timeout: float,
    body: str | None = None,
    ctype: str = "text/plain; charset=utf-8",
    head_only: bool = False,
    allow: bool = False,
) -> int:
    if body is None:
        body = f"{status} {reason}: try GET {METRICS_PATH} or GET {CHILDREN_PATH}\n"
    # Peers can be Unix socket paths, which may hold any bytes.
    data = body.encode("utf-8", "backslashreplace")
    head = (
        f"HTTP/1.0 {status} {reason}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(data)}\r\n"
        + ("Allow: GET, HEAD\r\n" if allow else "")
        + "Connection: close\r\n\r\n"
    )
    conn.settimeout(timeout)
    conn.sendall(head.encode("ascii") + (b"" if head_only else data))
    return status


def serve_metrics(conn: socket.socket, snap: Snapshot, timeout: float = TIMEOUT) -> int:
    """Answer one HTTP request on *conn* from *snap*, then close *conn*.

    ``GET /metrics`` (Prometheus text), ``GET /children`` (JSON), HEAD of
    either; 404 for another path, 405 for another method, 400 for a request
    that is not HTTP, 408 when the request head is not in within *timeout*.
    Returns the status sent, or 0 when the client went away first.
    """
    try:
        return _answer(conn, snap, timeout)
    except OSError:  # reset, or too slow to take the answer: nobody to tell
        return 0
    finally:
        _close(conn)


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_WR)
        # Closing with unread input sends a reset, which can destroy the
        # answer before the client has read it.  The usual client sent only
        # the request head: nothing is left, and this is one recv.  Otherwise
        # read until it stops sending, within LINGER and MAX_LINGER bytes.
        conn.setblocking(False)
        pending = conn.recv(MAX_LINGER)  # BlockingIOError: nothing was left unread
        drained, deadline = len(pending), time.monotonic() + LINGER
        while pending and drained < MAX_LINGER and (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            pending = conn.recv(MAX_LINGER)
            drained += len(pending)
    except OSError:
        pass  # reset by the peer, nothing pending, or LINGER is over
    conn.close()
