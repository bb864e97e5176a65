#!/usr/bin/env python3
"""Load-test any TCP or Unix-socket service: connection churn or keep-alive rounds.

    python -m bench.load --port 8007                       # 10 s of echo churn, 8 clients
    python bench/load.py --port 8007 --mode keepalive --rounds 100 -c 32
    python bench/load.py --unix /tmp/echo.sock --connections 50000 --json

Modes:

``churn``      connect, send ``--payload`` bytes, half-close (``shutdown(SHUT_WR)``),
               read the reply to EOF, close.  Latency is per connection, from
               ``connect()`` to EOF.
``keepalive``  ``--rounds`` rounds per connection of: send ``--payload`` bytes, read
               ``--reply-bytes`` (default: as many as were sent); then close.  Latency is
               per round.

With ``--verify`` (the default) each reply must equal what was sent, as from an echo
service; use ``--no-verify`` for anything else, or ``--expect`` (a prefix, or
``re:REGEX``) to check each reply against what the service should answer.  What is
sent is ``--payload`` random bytes, or ``--send TEXT`` (with ``\r\n``-style escapes)
or ``--send-file FILE``.  ``--framing line`` makes a keep-alive round's reply one line
(up to ``\n``), for line-based services.  ``--rate`` opens connections at a
fixed rate (open loop) instead of as fast as ``--concurrency`` clients can (closed
loop): latency at a given load, not the service's peak.

The generator must not be the bottleneck of its own measurement: it forks ``--procs``
workers (default one per core, at most ``--concurrency``), each driving its share of
the clients with non-blocking sockets on one edge-triggered epoll, and it reports
its own CPU time.  When that is a large part of the machine, the generator, not the
service, may be the limit.  Every worker stops by itself at ``--duration`` or after
``--connections``; the parent kills and reaps any that do not (also on Ctrl-C, which
ends the run early and reports what was measured).  At ``--duration`` no new
connection starts; those in flight get ``END_GRACE`` (1 s, at most ``--timeout``) to
finish, then are closed and counted as ``unfinished``, not as errors.

Only the standard library is used, so this file can be copied anywhere (Linux).
Exit status: 0 when every connection succeeded, 1 when some failed (the errors are
counted by kind in the report) or none completed, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import array
import errno
import json
import math
import mmap
import os
import pickle
import re
import resource
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LoadConfig", "main", "run"]

# Without --duration, a --connections run still ends after this long.
COUNT_MODE_TIME_LIMIT = 300.0
DEFAULT_DURATION = 10.0
SWEEP_INTERVAL = 0.1  # how often workers look for timed-out connections
# At the end of --duration, connections in flight get this long (at most --timeout).
END_GRACE = 1.0
REPLY_MAX = 1 << 20  # bytes of a reply kept for --expect or --framing line
SHOWN_MAX = 200  # bytes of a bad reply shown in the report
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
CDF_POINTS = (*range(100), 99.5, 99.9, 99.99, 100)

# Shared-memory layout (int64 slots): the stop flag, the start time, then
# (connections, requests, errors) per worker for the progress line.
_STOP, _START_NS, _FIRST_WORKER_SLOT, _SLOTS_PER_WORKER = 0, 1, 2, 3

_ERROR_KINDS = {
    errno.ECONNREFUSED: "refused",
    errno.ECONNRESET: "reset",
    errno.EPIPE: "broken_pipe",
    errno.ETIMEDOUT: "timeout",
    errno.EADDRNOTAVAIL: "no_local_port",
    errno.EMFILE: "fd_limit",
    errno.ENFILE: "fd_limit",
    errno.ENOENT: "no_such_socket",
    errno.EAGAIN: "backlog_full",
}


@dataclass(frozen=True)
class LoadConfig:
    """What to send where, how hard and for how long (the command-line flags)."""

    host: str = "127.0.0.1"
    port: int | None = None
    unix: str | None = None
    mode: str = "churn"
    concurrency: int = 8
    duration: float | None = None
    connections: int | None = None
    payload: int = 64
    rounds: int = 10
    reply_bytes: int | None = None
    verify: bool = True
    rate: float | None = None
    procs: int | None = None
    timeout: float = 10.0
    send: bytes | None = None  # what to send instead of --payload random bytes
    expect: str | None = None  # a reply prefix (escapes allowed), or "re:REGEX"
    framing: str = "bytes"  # keepalive: a reply is --reply-bytes bytes, or one line

    @property
    def echo_check(self) -> bool:
        """Replies compared with what was sent: --verify, unless --expect says otherwise."""
        return self.verify and self.expect is None

    def check(self) -> None:
        """Raise ValueError naming the first inconsistent flag."""
        if (self.port is None) == (self.unix is None):
            raise ValueError("give exactly one of --port or --unix")
        if self.mode not in ("churn", "keepalive"):
            raise ValueError(f"--mode must be churn or keepalive, got {self.mode!r}")
        if self.concurrency < 1:
            raise ValueError("--concurrency must be at least 1")
        if self.procs is not None and self.procs < 1:
            raise ValueError("--procs must be at least 1")
        if self.duration is not None and self.duration <= 0:
            raise ValueError("--duration must be positive")
        if self.connections is not None and self.connections < 1:
            raise ValueError("--connections must be at least 1")
        size = self.payload if self.send is None else len(self.send)
        if size < 0 or (self.mode == "keepalive" and size < 1):
            raise ValueError("--payload (or --send) must be >= 0 bytes (>= 1 for keepalive)")
        if self.framing not in ("bytes", "line"):
            raise ValueError(f"--framing must be bytes or line, got {self.framing!r}")
        if self.framing == "line" and self.mode != "keepalive":
            raise ValueError("--framing line is for --mode keepalive (churn reads to EOF)")
        if self.framing == "line" and self.reply_bytes is not None:
            raise ValueError("--reply-bytes and --framing line exclude each other")
        if self.expect is not None:
            reply_matcher(self.expect)  # raises ValueError when malformed
        if self.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("--rate must be positive")
        if self.timeout <= 0:
            raise ValueError("--timeout must be positive")
        if self.reply_bytes is not None:
            if self.reply_bytes < 1:
                raise ValueError("--reply-bytes must be at least 1")
            if self.echo_check and self.reply_bytes != size:
                raise ValueError("--verify needs --reply-bytes equal to --payload (echo)")

    @property
    def time_limit(self) -> float:
        if self.duration is not None:
            return self.duration
        return COUNT_MODE_TIME_LIMIT if self.connections is not None else DEFAULT_DURATION

    @property
    def target(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def unescape(text: str) -> bytes:
    """``GET / HTTP/1.0\\r\\n\\r\\n`` -> the bytes it spells (Python string escapes)."""
    try:
        return text.encode().decode("unicode_escape").encode("latin-1")
    except (UnicodeDecodeError, UnicodeEncodeError) as exc:
        raise ValueError(f"bad escape in {text!r}: {exc.reason}") from None


def reply_matcher(expect: str) -> Callable[[bytes], bool]:
    """A test for a whole reply: ``re:REGEX`` searched in it, else a prefix it starts with."""
    if expect.startswith("re:"):
        try:
            rx = re.compile(expect[3:].encode())
        except re.error as exc:
            raise ValueError(f"--expect: bad regular expression {expect[3:]!r}: {exc}") from None
        return lambda reply: rx.search(reply) is not None
    prefix = unescape(expect)
    return lambda reply: reply.startswith(prefix)


def shown(data: bytes, limit: int = SHOWN_MAX) -> str:
    """*data* escaped for a one-line report, truncated to *limit* bytes."""
    text = repr(data[:limit])[2:-1]
    return text + (f"... ({len(data):,} bytes)" if len(data) > limit else "")


def _resolve(cfg: LoadConfig) -> tuple[int, Any]:
    if cfg.unix is not None:
        return socket.AF_UNIX, cfg.unix
    infos = socket.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
    if not infos:
        raise ValueError(f"cannot resolve {cfg.host!r}")
    return infos[0][0], infos[0][4]


def _errno_kind(code: int) -> str:
    return _ERROR_KINDS.get(code) or errno.errorcode.get(code, "oserror").lower()


def _error_kind(exc: OSError) -> str:
    return (
        "timeout"
        if exc.errno is None and isinstance(exc, TimeoutError)
        else _errno_kind(exc.errno or 0)
    )


class _Conn:
    """One client connection in flight."""

    __slots__ = ("deadline", "fd", "got", "reply", "round", "sent", "shut", "sock", "t0")

    def __init__(self, sock: socket.socket, t0: float, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.t0 = t0
        self.deadline = deadline
        self.sent = 0
        self.got = 0
        self.round = 0
        self.shut = False
        self.reply = bytearray()  # kept only for --expect and --framing line


class _Worker:
    """Drives ``slots`` concurrent clients in one process until its share is done."""

    def __init__(
        self,
        cfg: LoadConfig,
        family: int,
        address: Any,
        slots: int,
        quota: int | None,
        interval: float | None,
        start: float,
        end: float,
        shared: memoryview,
        index: int,
    ) -> None:
        self.cfg = cfg
        self.family = family
        self.address = address
        self.slots = slots
        self.quota = quota
        self.interval = interval
        self.next_start = start
        self.end = end
        self.shared = shared
        self.slot = _FIRST_WORKER_SLOT + index * _SLOTS_PER_WORKER
        self.churn = cfg.mode == "churn"
        self.line = cfg.framing == "line"
        if cfg.send is not None:
            self.payload = cfg.send
        elif self.line:  # printable, one line
            self.payload = os.urandom(cfg.payload).hex().encode()[: cfg.payload - 1] + b"\n"
        else:
            self.payload = os.urandom(cfg.payload)
        self.pview = memoryview(self.payload)
        self.plen = len(self.payload)
        self.expect = cfg.reply_bytes if cfg.reply_bytes is not None else self.plen
        self.matcher = None if cfg.expect is None else reply_matcher(cfg.expect)
        self.verify = cfg.echo_check
        self.keep = self.line or self.matcher is not None  # keep each reply whole
        self.first_unexpected: bytes | None = None
        self.unfinished = 0
        self.grace = min(END_GRACE, cfg.timeout)
        self.rounds = cfg.rounds
        self.timeout = cfg.timeout
        self.scratch = bytearray(65536)
        self.sview = memoryview(self.scratch)
        self.latencies = array.array("d")
        self.errors: Counter[str] = Counter()
        self.conns: dict[int, _Conn] = {}
        self.retry: list[_Conn] = []  # Unix connects refused with EAGAIN (backlog full)
        self.epoll = select.epoll()
        self.started = 0
        self.done = 0
        self.requests = 0
        self.start_lag = 0.0
        self.stopping = False  # past the end: finish the current round and close

    def run(self) -> dict[str, Any]:
        conns, retry, epoll, step = self.conns, self.retry, self.epoll, self._step
        ppid = os.getppid()
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while True:
            now = time.monotonic()
            # Past the end (or Ctrl-C): keep-alive clients close after their round.
            self.stopping = now >= self.end or bool(self.shared[_STOP])
            opening = not self.stopping and (self.quota is None or self.started < self.quota)
            if opening:
                self._open_more(now)
            elif not conns and not retry:
                break
            wait = SWEEP_INTERVAL
            if opening:
                wait = min(wait, self.end - now)
                if self.interval is not None:
                    wait = min(wait, self.next_start - now)
            if retry:
                wait = min(wait, 0.001)
            for fd, _ in epoll.poll(max(wait, 0.0)):
                conn = conns.get(fd)
                if conn is not None:
                    step(conn)
            if retry:
                self._retry_connects()
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                if os.getppid() != ppid:  # the parent died: nobody to report to
                    os._exit(1)
                for conn in [c for c in conns.values() if now > c.deadline]:
                    self._fail(conn, "timeout")
                if now > self.end + self.grace:  # --duration is over: stop waiting
                    for conn in [*conns.values(), *retry]:
                        self._close(conn)
                        self.unfinished += 1
                    retry.clear()
                for conn in [c for c in retry if now > c.deadline]:
                    retry.remove(conn)
                    self._fail(conn, "timeout")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "latencies": self.latencies.tobytes(),
            "connections": self.done,
            "requests": self.requests,
            "errors": dict(self.errors),
            "unfinished": self.unfinished,
            "first_unexpected": self.first_unexpected,
            "cpu_user": usage.ru_utime,
            "cpu_system": usage.ru_stime,
            "end": time.monotonic(),
            "start_lag": self.start_lag,
        }

    def _open_more(self, now: float) -> None:
        while len(self.conns) + len(self.retry) < self.slots and (
            self.quota is None or self.started < self.quota
        ):
            if self.interval is not None:
                if now < self.next_start:
                    return
                self.start_lag = max(self.start_lag, now - self.next_start)
                self.next_start += self.interval
            self.started += 1
            self._open()
            if self.interval is not None:
                now = time.monotonic()

    def _open(self) -> None:
        t0 = time.monotonic()
        try:
            sock = socket.socket(self.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self._count_error(_error_kind(exc))
            return
        conn = _Conn(sock, t0, t0 + self.timeout)
        err = sock.connect_ex(self.address)
        if err == errno.EAGAIN and self.family == socket.AF_UNIX:
            self.retry.append(conn)  # a blocking client would wait here
        elif err in (0, errno.EINPROGRESS):
            self._watch(conn, err == 0)
        else:
            self._fail(conn, _errno_kind(err))

    def _watch(self, conn: _Conn, connected: bool) -> None:
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, select.EPOLLIN | select.EPOLLOUT | select.EPOLLET)
        if connected:
            self._step(conn)
        # else: EPOLLOUT (or an error) arrives when connect() completes

    def _retry_connects(self) -> None:
        pending, self.retry[:] = list(self.retry), []
        for conn in pending:
            err = conn.sock.connect_ex(self.address)
            if err == errno.EAGAIN:
                self.retry.append(conn)
            elif err == 0:
                self._watch(conn, True)
            else:
                self._fail(conn, _errno_kind(err))

    def _step(self, conn: _Conn) -> None:
        """Send and receive until both would block (edge-triggered), or the end."""
        sock = conn.sock
        plen = self.plen
        try:
            while True:
                progressed = False
                if conn.sent < plen:
                    try:
                        n = sock.send(self.pview[conn.sent :])
                    except BlockingIOError:
                        n = 0
                    conn.sent += n
                    progressed = n > 0
                if self.churn and not conn.shut and conn.sent == plen:
                    sock.shutdown(socket.SHUT_WR)
                    conn.shut = True
                try:
                    n = sock.recv_into(self.scratch)
                except BlockingIOError:
                    if progressed and conn.sent < plen:
                        continue
                    return
                if n == 0:
                    if self.churn:
                        self._end_churn(conn)
                    else:
                        self._fail(conn, "eof_early")
                    return
                if self.keep:
                    if not self._keep(conn, n):
                        return
                    continue
                got = conn.got
                if self.churn:
                    if self.verify:
                        if got + n > plen:
                            self._fail(conn, "long_reply")
                            return
                        if self.sview[:n] != self.pview[got : got + n]:
                            self._fail(conn, "mismatch")
                            return
                    conn.got = got + n
                    continue
                if got + n > self.expect:
                    self._fail(conn, "long_reply")
                    return
                if self.verify and self.sview[:n] != self.pview[got : got + n]:
                    self._fail(conn, "mismatch")
                    return
                conn.got = got + n
                if conn.got == self.expect and self._end_round(conn):
                    return
        except OSError as exc:
            self._fail(conn, _error_kind(exc))

    def _keep(self, conn: _Conn, n: int) -> bool:
        """Add *n* received bytes to the reply kept whole; False once the connection is
        closed (failed, or done after its last keep-alive round)."""
        room = max(REPLY_MAX - len(conn.reply), 0)
        if n > room and self.line:
            self._fail(conn, "long_reply")  # no end of line in sight
            return False
        conn.reply += self.sview[: min(n, room)]  # churn: --expect sees the first REPLY_MAX
        conn.got += n
        if self.churn:
            return True  # the reply ends at EOF
        if self.line:
            end = self.scratch.find(b"\n", 0, n)
            if end < 0:
                return True
            if end != n - 1:
                self._fail(conn, "long_reply")  # more than one line for one request
                return False
        elif conn.got < self.expect:
            return True
        elif conn.got > self.expect:
            self._fail(conn, "long_reply")
            return False
        return self._reply_ok(conn) and not self._end_round(conn)

    def _reply_ok(self, conn: _Conn) -> bool:
        """Check a whole kept reply (--expect, or a line's echo); False if it failed."""
        reply = bytes(conn.reply)
        if self.matcher is not None:
            if self.matcher(reply):
                return True
            if self.first_unexpected is None:
                self.first_unexpected = reply
            self._fail(conn, "unexpected_reply")
            return False
        if self.verify and reply != self.payload:
            self._fail(conn, "mismatch")
            return False
        return True

    def _end_churn(self, conn: _Conn) -> None:
        now = time.monotonic()
        if self.verify and conn.got != self.plen:
            self._fail(conn, "short_reply")
            return
        if self.keep and not self._reply_ok(conn):
            return
        self.latencies.append(now - conn.t0)
        self._close(conn)
        self.done += 1
        self.requests += 1
        self.shared[self.slot] = self.done
        self.shared[self.slot + 1] = self.requests

    def _end_round(self, conn: _Conn) -> bool:
        """Record a finished keep-alive round; True when the connection is closed."""
        now = time.monotonic()
        self.latencies.append(now - conn.t0)
        self.requests += 1
        self.shared[self.slot + 1] = self.requests
        conn.round += 1
        if conn.round >= self.rounds or self.stopping or now >= self.end:
            self._close(conn)
            self.done += 1
            self.shared[self.slot] = self.done
            return True
        conn.sent = conn.got = 0
        conn.reply.clear()
        conn.t0 = now
        conn.deadline = now + self.timeout
        return False

    def _close(self, conn: _Conn) -> None:
        self.conns.pop(conn.fd, None)
        conn.sock.close()  # also removes it from the epoll set

    def _fail(self, conn: _Conn, kind: str) -> None:
        self._close(conn)
        self._count_error(kind)

    def _count_error(self, kind: str) -> None:
        self.errors[kind] += 1
        self.shared[self.slot + 2] += 1


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (q in 0-100)."""
    if q <= 0:
        return ordered[0]
    rank = math.ceil(q / 100.0 * len(ordered))
    return ordered[min(max(rank, 1), len(ordered)) - 1]


def _latency_summary(samples: array.array[float]) -> tuple[dict[str, float | None], list[Any]]:
    if not samples:
        empty: dict[str, float | None] = {"min": None, "mean": None, "max": None}
        empty.update({f"p{q:g}": None for q in PERCENTILES})
        return empty, []
    ordered = sorted(samples)
    ms = 1000.0
    summary: dict[str, float | None] = {"min": ordered[0] * ms}
    for q in PERCENTILES:
        summary[f"p{q:g}"] = _percentile(ordered, q) * ms
    summary["max"] = ordered[-1] * ms
    summary["mean"] = sum(ordered) / len(ordered) * ms
    cdf = [[q, round(_percentile(ordered, q) * ms, 6)] for q in CDF_POINTS]
    return summary, cdf


def _split(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def _fork_worker(
    cfg: LoadConfig,
    family: int,
    address: Any,
    shared: memoryview,
    index: int,
    procs: int,
    go_r: int,
    go_w: int,
    inherited: list[int],
) -> tuple[int, int]:
    """Fork worker *index*; returns (pid, read end of its result pipe)."""
    result_r, result_w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(result_w)
        return pid, result_r
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent decides
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for fd in (go_w, result_r, *inherited):
            os.close(fd)
        os.read(go_r, 1)  # EOF once every copy of go_w is closed: all start together
        os.close(go_r)
        start = shared[_START_NS] / 1e9
        slots = _split(cfg.concurrency, procs, index)
        quota = None if cfg.connections is None else _split(cfg.connections, procs, index)
        interval = offset = None
        if cfg.rate is not None:
            interval = procs / cfg.rate
            offset = index / cfg.rate
        worker = _Worker(
            cfg,
            family,
            address,
            slots,
            quota,
            interval,
            start + (offset or 0.0),
            start + cfg.time_limit,
            shared,
            index,
        )
        data = pickle.dumps(worker.run())
        view = memoryview(data)
        while view:
            view = view[os.write(result_w, view) :]
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


class _Progress:
    """The live progress line on stderr (only when it is a terminal)."""

    def __init__(self, enabled: bool, cfg: LoadConfig) -> None:
        self.enabled = enabled
        self.unit = "req" if cfg.mode == "keepalive" else "conn"
        self.last = 0.0
        self.last_count = 0

    def show(self, shared: memoryview, procs: int, start: float) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.5:
            return
        cols = [
            shared[_FIRST_WORKER_SLOT + i * _SLOTS_PER_WORKER + k]
            for i in range(procs)
            for k in (0, 1, 2)
        ]
        conns, reqs, errs = sum(cols[0::3]), sum(cols[1::3]), sum(cols[2::3])
        count = reqs if self.unit == "req" else conns
        rate = (count - self.last_count) / (now - self.last) if self.last else 0.0
        self.last, self.last_count = now, count
        sys.stderr.write(
            f"\r{now - start:6.1f}s  {conns:>10,} conn  {reqs:>10,} req  "
            f"{rate:>10,.0f} {self.unit}/s  errors {errs:,}   "
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self.last:
            sys.stderr.write("\n")
            sys.stderr.flush()


def run(cfg: LoadConfig, progress: bool = False) -> dict[str, Any]:
    """Run one load test; returns the report (what ``--json`` prints).

    Raises ValueError for an inconsistent *cfg*.  Forks worker processes, so
    call it from a single-threaded program.
    """
    cfg.check()
    family, address = _resolve(cfg)
    cores = os.cpu_count() or 1
    procs = min(cfg.procs or min(cfg.concurrency, cores), cfg.concurrency)
    shared_map = mmap.mmap(-1, 8 * (_FIRST_WORKER_SLOT + procs * _SLOTS_PER_WORKER))
    shared = memoryview(shared_map).cast("q")
    self_cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    workers: dict[int, int] = {}  # result pipe read end -> pid
    reaped: set[int] = set()
    results: list[dict[str, Any]] = []
    interrupted = False
    meter = _Progress(progress, cfg)
    go_r, go_w = os.pipe()
    try:
        for index in range(procs):
            pid, result_r = _fork_worker(
                cfg, family, address, shared, index, procs, go_r, go_w, list(workers)
            )
            workers[result_r] = pid
        os.close(go_r)
        start_ns = time.monotonic_ns()
        shared[_START_NS] = start_ns
        os.close(go_w)  # go
        go_w = -1
        start = start_ns / 1e9
        # Workers stop by themselves by then (END_GRACE); this is for stuck ones.
        hard_deadline = start + cfg.time_limit + min(cfg.timeout, END_GRACE) + 5.0
        buffers = {fd: bytearray() for fd in workers}
        with selectors.DefaultSelector() as sel:
            for fd in workers:
                sel.register(fd, selectors.EVENT_READ)
            while buffers:
                try:
                    left = hard_deadline - time.monotonic()
                    if left <= 0:
                        break  # stuck workers are killed below; what they had is lost
                    for key, _ in sel.select(min(0.25, left)):
                        fd = int(key.fd)
                        chunk = os.read(fd, 1 << 20)
                        if chunk:
                            buffers[fd] += chunk
                            continue
                        sel.unregister(fd)
                        pid = workers[fd]
                        _, status = os.waitpid(pid, 0)
                        reaped.add(pid)
                        data = bytes(buffers.pop(fd))
                        if status == 0 and data:
                            results.append(pickle.loads(data))
                    meter.show(shared, procs, start)
                except KeyboardInterrupt:
                    if interrupted:
                        break  # second Ctrl-C: stop waiting
                    interrupted = True
                    shared[_STOP] = 1
                    hard_deadline = min(hard_deadline, time.monotonic() + cfg.timeout + 1.0)
    finally:
        meter.done()
        if go_w >= 0:
            os.close(go_w)
        for fd, pid in workers.items():
            if pid not in reaped:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
            try:
                os.close(fd)
            except OSError:
                pass
        del shared
        shared_map.close()
    self_cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    lost = procs - len(results)  # workers that crashed or were killed report nothing
    return _report(cfg, procs, start, results, lost, interrupted, self_cpu0, self_cpu1)


def _report(
    cfg: LoadConfig,
    procs: int,
    start: float,
    results: list[dict[str, Any]],
    lost: int,
    interrupted: bool,
    cpu0: resource.struct_rusage,
    cpu1: resource.struct_rusage,
) -> dict[str, Any]:
    samples: array.array[float] = array.array("d")
    errors: Counter[str] = Counter()
    first_unexpected: bytes | None = None
    for r in results:
        samples.frombytes(r["latencies"])
        errors.update(r["errors"])
        if first_unexpected is None:
            first_unexpected = r["first_unexpected"]
    if lost:
        errors["worker_lost"] += lost
    end = max((r["end"] for r in results), default=time.monotonic())
    elapsed = max(end - start, 1e-9)
    connections = sum(r["connections"] for r in results)
    requests = sum(r["requests"] for r in results)
    user = sum(r["cpu_user"] for r in results) + cpu1.ru_utime - cpu0.ru_utime
    system = sum(r["cpu_system"] for r in results) + cpu1.ru_stime - cpu0.ru_stime
    cores = os.cpu_count() or 1
    latency, cdf = _latency_summary(samples)
    report: dict[str, Any] = {
        "tool": "bench.load",
        "target": cfg.target,
        "config": {**asdict(cfg), "send": None if cfg.send is None else shown(cfg.send)},
        "procs": procs,
        "elapsed_s": round(elapsed, 6),
        "connections": connections,
        "requests": requests,
        "conn_per_s": connections / elapsed,
        "req_per_s": requests / elapsed,
        "latency_of": "connection" if cfg.mode == "churn" else "round",
        "latency_ms": latency,
        "cdf_ms": cdf,
        "errors": dict(sorted(errors.items())),
        "errors_total": sum(errors.values()),
        # An unexpected reply (--expect), escaped and truncated; None when all matched.
        "first_unexpected_reply": None if first_unexpected is None else shown(first_unexpected),
        # Connections still in flight END_GRACE after --duration: closed, not errors.
        "unfinished": sum(r["unfinished"] for r in results),
        "generator_cpu": {
            "user_s": round(user, 4),
            "system_s": round(system, 4),
            "total_s": round(user + system, 4),
            "cores_used": (user + system) / elapsed,
            "fraction_of_machine": (user + system) / (elapsed * cores),
            "cores": cores,
        },
        "interrupted": interrupted,
    }
    if cfg.rate is not None:
        report["start_lag_ms_max"] = max((r["start_lag"] for r in results), default=0.0) * 1000
    return report


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary of a report from :func:`run`."""
    cfg = report["config"]
    lat = report["latency_ms"]
    gen = report["generator_cpu"]
    head = f"{cfg['mode']} {report['target']}  payload {cfg['payload']} B"
    if cfg["send"] is not None:
        head = f"{cfg['mode']} {report['target']}  sending {cfg['send']}"
    if cfg["expect"] is not None:
        head += f"  expecting {cfg['expect']}"
    if cfg["framing"] == "line":
        head += "  replies: lines"
    if cfg["mode"] == "keepalive":
        head += f"  rounds {cfg['rounds']}"
    head += f"  concurrency {cfg['concurrency']}  procs {report['procs']}"
    if cfg["rate"]:
        head += f"  rate {cfg['rate']:g}/s"
    lines = [
        head
        + f"  elapsed {report['elapsed_s']:.2f} s"
        + ("  (interrupted)" if report["interrupted"] else ""),
        f"connections  {report['connections']:>12,}  {report['conn_per_s']:>12,.1f} conn/s",
    ]
    if cfg["mode"] == "keepalive":
        lines.append(f"requests     {report['requests']:>12,}  {report['req_per_s']:>12,.1f} req/s")
    if lat["p50"] is not None:
        cols = "  ".join(f"{k} {lat[k]:.3f}" for k in ("p50", "p90", "p99", "p99.9", "max"))
        lines.append(f"latency ms per {report['latency_of']}:  {cols}")
    errors = ", ".join(f"{k} {v:,}" for k, v in report["errors"].items()) or "none"
    lines.append(f"errors       {report['errors_total']:>12,}  ({errors})")
    if report["first_unexpected_reply"] is not None:
        lines.append(f"first unexpected reply: {report['first_unexpected_reply']}")
    if report["unfinished"]:
        lines.append(
            f"unfinished   {report['unfinished']:>12,}  (still in flight {END_GRACE:g} s after "
            "the end: closed, not counted)"
        )
    lines.append(
        f"generator CPU {gen['total_s']:.2f} s = {gen['cores_used']:.2f} of {gen['cores']} cores "
        f"({gen['fraction_of_machine']:.0%} of the machine)"
    )
    if "start_lag_ms_max" in report:
        lines.append(f"latest start behind schedule: {report['start_lag_ms_max']:.3f} ms")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench.load",
        description="Load-test a TCP or Unix-socket service (churn or keep-alive).",
        epilog="Exit status: 0 all connections succeeded, 1 some failed or none completed, "
        "2 usage error.",
    )
    p.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="server TCP port")
    p.add_argument("--unix", metavar="PATH", help="Unix socket path instead of --host/--port")
    p.add_argument("--mode", choices=("churn", "keepalive"), default="churn")
    p.add_argument("-c", "--concurrency", type=int, default=8, help="clients at once (8)")
    p.add_argument(
        "-d",
        "--duration",
        type=float,
        help=f"seconds to run (default {DEFAULT_DURATION:g}; with --connections alone: "
        f"until done, at most {COUNT_MODE_TIME_LIMIT:g})",
    )
    p.add_argument("-n", "--connections", type=int, help="stop after this many connections")
    p.add_argument("--payload", type=int, default=64, metavar="BYTES", help="bytes sent (64)")
    p.add_argument("--rounds", type=int, default=10, help="keepalive: rounds per connection (10)")
    p.add_argument(
        "--reply-bytes", type=int, metavar="BYTES", help="keepalive: bytes to read per round"
    )
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="replies must equal what was sent (echo); default on, unless --expect",
    )
    send = p.add_mutually_exclusive_group()
    send.add_argument(
        "--send",
        metavar="TEXT",
        help="send TEXT instead of --payload random bytes; \\r \\n \\t \\xNN \\\\ escapes",
    )
    send.add_argument("--send-file", metavar="FILE", help="send the bytes of FILE")
    p.add_argument(
        "--expect",
        metavar="PREFIX",
        help="each reply must start with PREFIX (escapes as --send), or match re:REGEX "
        "anywhere; else the connection fails as unexpected_reply (replaces --verify)",
    )
    p.add_argument(
        "--framing",
        choices=("bytes", "line"),
        default="bytes",
        help="keepalive: a reply is --reply-bytes bytes, or one line up to \\n (bytes)",
    )
    p.add_argument("--rate", type=float, help="open connections at this rate per second")
    p.add_argument("--procs", type=int, help="worker processes (default: cores, <= concurrency)")
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds a connection (keepalive: a round) may take (10)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    return p


def _what_to_send(text: str | None, path: str | None) -> bytes | None:
    if text is not None:
        return unescape(text)
    if path is not None:
        with open(path, "rb") as f:
            return f.read()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        send = _what_to_send(args.send, args.send_file)
    except (ValueError, OSError) as exc:
        print(f"bench.load: {exc}", file=sys.stderr)
        return 2
    cfg = LoadConfig(
        host=args.host,
        port=args.port,
        unix=args.unix,
        mode=args.mode,
        concurrency=args.concurrency,
        duration=args.duration,
        connections=args.connections,
        payload=args.payload,
        rounds=args.rounds,
        reply_bytes=args.reply_bytes,
        verify=args.verify,
        rate=args.rate,
        procs=args.procs,
        timeout=args.timeout,
        send=send,
        expect=args.expect,
        framing=args.framing,
    )
    try:
        cfg.check()
        _resolve(cfg)
    except (ValueError, OSError) as exc:
        print(f"bench.load: {exc}", file=sys.stderr)
        return 2
    # SIGTERM ends the run like Ctrl-C does, so the workers are still reaped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = run(cfg, progress=not args.quiet and sys.stderr.isatty())
    except KeyboardInterrupt:  # before the workers started, or a second Ctrl-C
        return 130
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))
    # Nothing completed (all cut off at the end) is no success either.
    return 1 if report["errors_total"] or not report["connections"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
