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
service; use ``--no-verify`` for anything else.  ``--rate`` opens connections at a
fixed rate (open loop) instead of as fast as ``--concurrency`` clients can (closed
loop): latency at a given load, not the service's peak.

The generator must not be the bottleneck of its own measurement: it forks ``--procs``
workers (default one per core, at most ``--concurrency``), each driving its share of
the clients with non-blocking sockets on one edge-triggered epoll, and it reports
its own CPU time.  When that is a large part of the machine, the generator, not the
service, may be the limit.  Every worker stops by itself at ``--duration`` or after
``--connections``; the parent kills and reaps any that do not (also on Ctrl-C, which
ends the run early and reports what was measured).

Only the standard library is used, so this file can be copied anywhere (Linux).
Exit status: 0 when every connection succeeded, 1 when some failed (the errors are
counted by kind in the report), 2 for a usage error.
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
import resource
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["LoadConfig", "main", "run"]

# Without --duration, a --connections run still ends after this long.
COUNT_MODE_TIME_LIMIT = 300.0
DEFAULT_DURATION = 10.0
SWEEP_INTERVAL = 0.1  # how often workers look for timed-out connections
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
        if self.payload < 0 or (self.mode == "keepalive" and self.payload < 1):
            raise ValueError("--payload must be >= 0 (>= 1 for keepalive)")
        if self.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("--rate must be positive")
        if self.timeout <= 0:
            raise ValueError("--timeout must be positive")
        if self.reply_bytes is not None:
            if self.reply_bytes < 1:
                raise ValueError("--reply-bytes must be at least 1")
            if self.verify and self.reply_bytes != self.payload:
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

    __slots__ = ("deadline", "fd", "got", "round", "sent", "shut", "sock", "t0")

    def __init__(self, sock: socket.socket, t0: float, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.t0 = t0
        self.deadline = deadline
        self.sent = 0
        self.got = 0
        self.round = 0
        self.shut = False


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
        self.payload = os.urandom(cfg.payload)
        self.pview = memoryview(self.payload)
        self.plen = cfg.payload
        self.expect = cfg.reply_bytes if cfg.reply_bytes is not None else cfg.payload
        self.verify = cfg.verify
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
                for conn in [c for c in retry if now > c.deadline]:
                    retry.remove(conn)
                    self._fail(conn, "timeout")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "latencies": self.latencies.tobytes(),
            "connections": self.done,
            "requests": self.requests,
            "errors": dict(self.errors),
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

    def _end_churn(self, conn: _Conn) -> None:
        now = time.monotonic()
        if self.verify and conn.got != self.plen:
            self._fail(conn, "short_reply")
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
        hard_deadline = start + cfg.time_limit + cfg.timeout + 5.0
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
    for r in results:
        samples.frombytes(r["latencies"])
        errors.update(r["errors"])
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
        "config": asdict(cfg),
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
        epilog="Exit status: 0 all connections succeeded, 1 some failed, 2 usage error.",
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
        help="replies must equal what was sent (echo); default on",
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    return 1 if report["errors_total"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
