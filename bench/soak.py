"""Soak: minutes of mixed, checksummed load on one forkserver echo server, with faults.

    python -m bench.soak                                  # 120 s, fork on accept
    python -m bench.soak --spare-children 8 --duration 600
    python -m bench.soak --duration 30 --seed 7 --json    # repeat a run's random choices

Client pools, each a few threads looping until the end of the run:

``churn``        connect, send 0 B - 256 KiB, half-close, read to EOF.
``keepalive``    2-20 request/response rounds on one connection, each reply checked.
``slow``         one byte every 50-200 ms for 1-4 s, then half-close and read to EOF.
``reset``        send part of a payload, then close with SO_LINGER {1, 0}: an RST
                 mid-transfer.  Unechoed bytes are lost *by design*, never counted
                 as lost.
``halfclosed``   send, half-close at once, and start reading only 50-300 ms later.

Faults, meanwhile: every 0.5-2 s one of the server's forked children (not a
helper it spawned, such as a reload's config check) is SIGKILLed, and
every 1-5 s the parent gets a burst of SIGHUP (a reload, in place), SIGUSR1,
SIGWINCH and SIGCHLD (``--storm-signals``; SIGUSR2, an upgrade to a new parent
process, only when asked for: the soak checks the parent it started).

Every connection's echo is compared (blake2b) with what was sent, and each
connection ends in exactly one class: ``served`` (echo complete and equal),
``reset_by_us``, ``killed_on_purpose`` (its child was one we killed),
``lost`` (short, and neither of the two), or ``corrupted`` (an echoed byte
differs from the byte sent, or more came back than was sent; never by design).

Which connection a killed child served is read from the child itself: it is
stopped (SIGSTOP) so its descriptors cannot change, its TCP connections are
listed (psutil), the client connections whose local port matches are marked,
and only then is it SIGKILLed.  A kill can therefore never be missed, and a
connection is never marked by a child that was no longer sending to it: only
server-side states before the child's FIN (ESTABLISHED, CLOSE_WAIT) count.

Exit status 0 only when no byte was lost or corrupted, no connection was lost,
no zombie was left (at the end, nor lingering during the run), every kill was
reaped and logged by the server, exactly ``spare_children`` children are left
once the load stops, the server still served at the end, and it exited 0 on
SIGTERM leaving no process behind.  1 otherwise; 2 for a usage
error.  Results: ``bench/results/soak-<timestamp>.json`` and ``soak-latest.json``.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import re
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .common import RESULTS_DIR, mb, metadata, write_results
from .servers import ECHO_HANDLER, RunningServer, forkserver_spec, serve

KIB = 1024
MAX_PAYLOAD = 256 * KIB
CHUNK = 64 * KIB
# Every pool, with its default number of client threads.  One process of
# threads: the GIL keeps the client near one core, so the server always has
# the other (the machine has 2).
POOLS = {"churn": 4, "keepalive": 2, "slow": 4, "reset": 2, "halfclosed": 2}
# The storm's signals.  SIGHUP reloads the server in place (same pid, same
# children); SIGUSR2 upgrades it to a new parent process, which is not the one
# the soak started, so it is left out unless asked for (--storm-signals).
SIGNALS = ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGCHLD")
STORM_SIGNALS = ("SIGHUP", "SIGUSR1", "SIGWINCH", "SIGCHLD")
# Server-side TCP states in which the child may still owe the client bytes:
# killing it there can cut the echo short.  From FIN_WAIT1/LAST_ACK on, the
# child has already shut its side down after sending everything.
OWING_STATES = frozenset({psutil.CONN_ESTABLISHED, psutil.CONN_CLOSE_WAIT})
ZOMBIE_LINGER = 3.0  # a zombie older than this means the parent is not reaping
FINAL_CHECK_CONNECTIONS = 20
LOST_SAMPLES = 20  # details kept of the first lost or corrupted connections
KILLED_LINE = re.compile(r"child (\d+) for (.*) killed by (SIG\w+) after")
EXIT_LINE = re.compile(r"child (\d+) for .* exit status (\d+) after")
LOG_TIME = re.compile(r"\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d,\d{3}) ")
PARENT_EVENT = re.compile(r"\] \w+ forkserver\.server: (?!handler failed)")
REFUSED_LINE = re.compile(
    r"refused \S+: (\w+)(?: \((\d+) more refused for this reason since the last report\))?"
)


@dataclass(frozen=True)
class SoakConfig:
    """The run's settings (the command-line flags)."""

    duration: float = 120.0
    spare_children: int = 0
    max_children: int = 64
    backlog: int = 128
    seed: int = 0
    pools: dict[str, int] = field(default_factory=lambda: dict(POOLS))
    kill_interval: tuple[float, float] = (0.5, 2.0)
    storm_interval: tuple[float, float] = (1.0, 5.0)
    storm_signals: tuple[str, ...] = STORM_SIGNALS
    conn_timeout: float = 30.0
    handler: str = ECHO_HANDLER

    @property
    def mode(self) -> str:
        return f"pool of {self.spare_children} spares" if self.spare_children else "fork on accept"


# --- which connection a killed child served -----------------------------------


class Conn:
    """One client connection, as the killer sees it."""

    __slots__ = ("killed", "pool", "port", "started")

    def __init__(self, pool: str, started: float) -> None:
        self.pool = pool
        self.started = started
        self.port = 0
        self.killed = False


class Registry:
    """Open client connections by local port, shared by the clients and the killer.

    A client learns its port only once connect() returns, and the server may
    have a child serving it before that: a kill that finds a port nobody has
    registered yet is kept as *pending*, and the connection that registers
    that port, having started connecting before the kill, takes it.  The same
    (port, server port) pair cannot belong to two live connections, so the
    match is exact.
    """

    PENDING_TTL = 10.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open: dict[int, Conn] = {}
        self.pending: dict[int, float] = {}

    def register(self, conn: Conn, port: int) -> None:
        with self.lock:
            conn.port = port
            self.open[port] = conn
            killed_at = self.pending.pop(port, None)
            if killed_at is not None and killed_at >= conn.started:
                conn.killed = True

    def unregister(self, conn: Conn) -> bool:
        """Forget *conn*; whether its child was killed (final)."""
        with self.lock:
            if self.open.get(conn.port) is conn:
                del self.open[conn.port]
            return conn.killed

    def mark_killed(self, ports: list[int], now: float) -> int:
        """Mark the connections on *ports* as killed on purpose; how many were open."""
        with self.lock:
            found = 0
            for port in ports:
                conn = self.open.get(port)
                if conn is not None:
                    conn.killed = True
                    found += 1
                else:
                    self.pending[port] = now
            for port, t in list(self.pending.items()):
                if now - t > self.PENDING_TTL:
                    del self.pending[port]
            return found


# --- one connection's bytes -------------------------------------------------------


class ClientError(Exception):
    """A connection failed; *kind* says how (reset, eof_early, timeout...)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


def _kind(exc: OSError) -> str:
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, BrokenPipeError):
        return "broken_pipe"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return errno.errorcode.get(exc.errno or 0, "oserror").lower()


class Stream:
    """A non-blocking client socket that keeps every byte sent and received."""

    def __init__(self, address: tuple[str, int], deadline: float) -> None:
        self.deadline = deadline
        self.sent = bytearray()
        self.got = bytearray()
        self.eof = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self._poll = select.poll()
        self._events = 0
        self._address = address

    def connect(self) -> int:
        """Connect; returns the local port."""
        err = self.sock.connect_ex(self._address)
        if err == errno.EINPROGRESS:
            self._wait(select.POLLOUT)
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        return int(self.sock.getsockname()[1])

    def _wait(self, events: int, until: float | None = None) -> None:
        """Poll for *events* until *until* (no error) or the deadline (TimeoutError)."""
        end = self.deadline if until is None else min(until, self.deadline)
        left = end - time.monotonic()
        if left <= 0:
            if until is None or until >= self.deadline:
                raise TimeoutError
            return
        if not events:
            time.sleep(left)
            return
        if events != self._events:
            if self._events:
                self._poll.modify(self.sock, events)
            else:
                self._poll.register(self.sock, events)
            self._events = events
        self._poll.poll(left * 1000 + 1)

    def _recv(self) -> bool:
        """Read what is there; True if anything (or EOF) came."""
        try:
            data = self.sock.recv(CHUNK)
        except BlockingIOError:
            return False
        if not data:
            self.eof = True
        self.got += data
        return True

    def exchange(
        self, data: bytes, *, shut: bool, want: int | None, read_from: float = 0.0
    ) -> None:
        """Send *data* while reading (from *read_from* on), then half-close if
        *shut*; return once *want* bytes in all were received (None: at EOF).

        Raises ClientError("eof_early") for an EOF before *want*.
        """
        view = memoryview(data)
        off = 0
        shut_pending = shut
        while True:
            progressed = False
            if off < len(view):
                try:
                    n = self.sock.send(view[off : off + CHUNK])
                except BlockingIOError:
                    n = 0
                self.sent += view[off : off + n]
                off += n
                progressed = n > 0
            if shut_pending and off == len(view):
                self.sock.shutdown(socket.SHUT_WR)
                shut_pending = False
            reading = time.monotonic() >= read_from
            if reading and not self.eof and self._recv():
                progressed = True
            if off == len(view):
                if want is None and self.eof:
                    return
                if want is not None and len(self.got) >= want:
                    return
            if self.eof:
                raise ClientError("eof_early")
            if progressed:
                continue
            events = (select.POLLOUT if off < len(view) else 0) | (select.POLLIN if reading else 0)
            self._wait(events, None if reading else read_from)

    def idle(self, seconds: float) -> None:
        """Read whatever arrives during *seconds*."""
        until = min(time.monotonic() + seconds, self.deadline)
        while not self.eof and time.monotonic() < until:
            if not self._recv():
                self._wait(select.POLLIN, until)
        if self.eof:
            raise ClientError("eof_early")

    def reset(self) -> None:
        """Close with an RST (SO_LINGER on, zero timeout)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


# --- the tally -------------------------------------------------------------------


def _corrupted(sent: bytes | bytearray, got: bytes | bytearray) -> int:
    """Bytes of *got* that are not the bytes sent at that offset."""
    n = min(len(sent), len(got))
    extra = max(0, len(got) - len(sent))
    if sent[:n] == got[:n]:
        return extra
    return extra + sum(1 for a, b in zip(sent[:n], got[:n], strict=True) if a != b)


def _digest(data: bytes | bytearray) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


@dataclass
class PoolTally:
    """Outcomes of one client pool."""

    attempted: int = 0
    served: int = 0
    reset_by_us: int = 0
    killed_on_purpose: int = 0
    lost: int = 0
    corrupted: int = 0
    rounds: int = 0
    bytes_sent: int = 0
    bytes_echoed: int = 0
    bytes_lost: int = 0
    bytes_corrupted: int = 0
    bytes_unechoed_by_design: int = 0
    errors: Counter[str] = field(default_factory=Counter)


class Tally:
    """Every connection's outcome, by pool; thread-safe."""

    def __init__(self, pools: Sequence[str]) -> None:
        self.lock = threading.Lock()
        self.pools = {name: PoolTally() for name in pools}
        self.killed_but_served = 0
        self.samples: list[dict[str, Any]] = []
        self.client_bugs: list[str] = []

    def record(
        self,
        conn: Conn,
        stream: Stream,
        *,
        complete: bool,
        error: str | None,
        reset_by_us: bool,
        killed: bool,
        rounds: int = 0,
    ) -> str:
        """Classify one finished connection; returns its class."""
        sent, got = stream.sent, stream.got
        bad = _corrupted(sent, got)
        served = complete and error is None and len(got) == len(sent)
        served = served and _digest(got) == _digest(sent)
        if bad:
            outcome = "corrupted"
        elif served:
            outcome = "served"
        elif reset_by_us:
            outcome = "reset_by_us"
        elif killed:
            outcome = "killed_on_purpose"
        else:
            outcome = "lost"
        with self.lock:
            t = self.pools[conn.pool]
            t.attempted += 1
            t.rounds += rounds
            t.bytes_sent += len(sent)
            t.bytes_echoed += min(len(got), len(sent))
            setattr(t, outcome, getattr(t, outcome) + 1)
            short = max(0, len(sent) - len(got))
            if outcome == "lost":
                t.bytes_lost += short
            elif outcome in ("reset_by_us", "killed_on_purpose"):
                t.bytes_unechoed_by_design += short
            t.bytes_corrupted += bad
            if outcome == "served" and killed:
                self.killed_but_served += 1
            if outcome != "served":
                why = error or ("rst_sent" if reset_by_us else "incomplete")
                t.errors[f"{outcome}:{why}"] += 1
            if outcome in ("lost", "corrupted") and len(self.samples) < LOST_SAMPLES:
                self.samples.append(
                    {
                        "pool": conn.pool,
                        "class": outcome,
                        "error": error,
                        "local_port": conn.port,
                        "started_s_ago": round(time.monotonic() - conn.started, 3),
                        "bytes_sent": len(sent),
                        "bytes_received": len(got),
                        "bytes_corrupted": bad,
                        "first_difference": next(
                            (i for i, (a, b) in enumerate(zip(sent, got, strict=False)) if a != b),
                            None,
                        ),
                        "eof": stream.eof,
                        "at": time.strftime("%H:%M:%S"),
                    }
                )
        return outcome

    def total(self, name: str) -> int:
        return sum(int(getattr(t, name)) for t in self.pools.values())


# --- client pools --------------------------------------------------------------------


def _payload_size(rng: random.Random) -> int:
    """0 B - 256 KiB: a third tiny (<= 1 KiB, some empty), a third up to 64 KiB,
    a third up to 256 KiB."""
    bucket = rng.randrange(3)
    if bucket == 0:
        return 0 if rng.random() < 0.1 else rng.randint(1, KIB)
    if bucket == 1:
        return rng.randint(KIB + 1, 64 * KIB)
    return rng.randint(64 * KIB + 1, MAX_PAYLOAD)


class Soak:
    """One run: the server's address, the shared state, and the threads."""

    def __init__(self, cfg: SoakConfig, server: RunningServer) -> None:
        self.cfg = cfg
        self.server = server
        self.address = server.address
        self.stop = threading.Event()
        self.registry = Registry()
        self.tally = Tally(list(cfg.pools))
        self.kills: list[dict[str, Any]] = []
        self.kill_misses = 0
        self.signals_sent: Counter[str] = Counter()
        self.storms = 0
        # pid -> [wall clock when first seen a zombie, seconds seen so far]
        self.zombies_lingering: dict[int, list[Any]] = {}
        self.max_children_seen = 0
        self.timeline: list[dict[str, Any]] = []
        self.server_gone = False
        self._proc = psutil.Process(server.pid)
        self._stopped: set[int] = set()  # children we SIGSTOPped and not yet killed/continued
        self.end = 0.0

    # -- one connection of each kind ------------------------------------------

    def _connection(self, pool: str, body: Callable[[Stream], tuple[bool, int]]) -> None:
        """Open a connection, run *body* (-> complete, rounds), classify it."""
        conn = Conn(pool, time.monotonic())
        stream = Stream(self.address, conn.started + self.cfg.conn_timeout)
        error: str | None = None
        complete = reset_by_us = False
        rounds = 0
        try:
            self.registry.register(conn, stream.connect())
            complete, rounds = body(stream)
            reset_by_us = pool == "reset"
        except ClientError as exc:
            error = exc.kind
        except OSError as exc:
            error = _kind(exc)
        finally:
            if not reset_by_us:
                stream.close()
        killed = self.registry.unregister(conn) if conn.port else False
        self.tally.record(
            conn,
            stream,
            complete=complete,
            error=error,
            reset_by_us=reset_by_us,
            killed=killed,
            rounds=rounds,
        )

    @staticmethod
    def _churn(rng: random.Random) -> Callable[[Stream], tuple[bool, int]]:
        payload = rng.randbytes(_payload_size(rng))

        def body(s: Stream) -> tuple[bool, int]:
            s.exchange(payload, shut=True, want=None)
            return True, 1

        return body

    @staticmethod
    def _halfclosed(rng: random.Random) -> Callable[[Stream], tuple[bool, int]]:
        payload = rng.randbytes(_payload_size(rng))
        delay = rng.uniform(0.05, 0.3)

        def body(s: Stream) -> tuple[bool, int]:
            s.exchange(payload, shut=True, want=None, read_from=time.monotonic() + delay)
            return True, 1

        return body

    @staticmethod
    def _keepalive(rng: random.Random) -> Callable[[Stream], tuple[bool, int]]:
        rounds = [rng.randbytes(rng.randint(1, 32 * KIB)) for _ in range(rng.randint(2, 20))]

        def body(s: Stream) -> tuple[bool, int]:
            for i, data in enumerate(rounds):
                start = len(s.got)
                s.exchange(data, shut=False, want=len(s.sent) + len(data))
                reply = s.got[start:]
                if len(reply) != len(data) or _digest(reply) != _digest(data):
                    raise ClientError("long_reply" if len(reply) > len(data) else "mismatch")
                del reply
                if i == len(rounds) - 1:
                    s.exchange(b"", shut=True, want=None)  # EOF, and nothing more
            return True, len(rounds)

        return body

    @staticmethod
    def _slow(rng: random.Random) -> Callable[[Stream], tuple[bool, int]]:
        length = rng.uniform(1.0, 4.0)
        data = rng.randbytes(int(length / 0.05) + 1)
        gaps = [rng.uniform(0.05, 0.2) for _ in data]

        def body(s: Stream) -> tuple[bool, int]:
            until = time.monotonic() + length
            for byte, gap in zip(data, gaps, strict=True):
                s.exchange(bytes([byte]), shut=False, want=0)
                s.idle(gap)
                if time.monotonic() >= until:
                    break
            s.exchange(b"", shut=True, want=None)
            return True, 1

        return body

    @staticmethod
    def _reset(rng: random.Random) -> Callable[[Stream], tuple[bool, int]]:
        payload = rng.randbytes(rng.randint(1, MAX_PAYLOAD))
        part = payload[: rng.randint(1, len(payload))]
        linger = rng.uniform(0.0, 0.05)

        def body(s: Stream) -> tuple[bool, int]:
            s.exchange(part, shut=False, want=0)
            s.idle(linger)  # some of the echo arrives: checked like any other
            s.reset()
            return False, 0

        return body

    def _client(self, pool: str, index: int) -> None:
        rng = random.Random(f"{self.cfg.seed}:{pool}:{index}")
        make = {
            "churn": self._churn,
            "keepalive": self._keepalive,
            "slow": self._slow,
            "reset": self._reset,
            "halfclosed": self._halfclosed,
        }[pool]
        limit = int(self.cfg.duration * 5000) + 1  # a bound, far above any real rate
        for _ in range(limit):
            if self.stop.is_set() or time.monotonic() >= self.end:
                return
            try:
                self._connection(pool, make(rng))
            except Exception:
                with self.tally.lock:
                    self.tally.client_bugs.append(traceback.format_exc())
                return
            if pool == "reset":
                # An RST costs the client nothing and the server a child (and
                # its traceback): paced, resets stay part of the mix.
                self.stop.wait(rng.uniform(0.02, 0.1))

    # -- faults -----------------------------------------------------------------

    def _killer(self) -> None:
        rng = random.Random(f"{self.cfg.seed}:killer")
        lo, hi = self.cfg.kill_interval
        for _ in range(int(self.cfg.duration / lo) + 1):
            if self.stop.wait(rng.uniform(lo, hi)) or time.monotonic() >= self.end:
                return
            children = self._forked_children()
            rng.shuffle(children)
            want_serving = rng.random() < 0.75  # mostly children mid-connection
            for child in children[:8]:
                if want_serving and not self._ports(child):
                    continue  # idle now (a cheap look, without freezing it)
                if self._try_kill(child, allow_idle=not want_serving):
                    break
            else:
                self.kill_misses += 1

    def _forked_children(self) -> list[psutil.Process]:
        """The parent's forked children (its command line), not the helpers it
        spawns (a reload's config check, an upgrade's new parent)."""
        try:
            command = self._proc.cmdline()
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in self.server.children():
            try:
                # A child titled by setproctitle (forkserver/title.py) no
                # longer shows the parent's command line.
                mine = child.cmdline()
                titled = " ".join(mine).startswith(("forkserver: conn", "forkserver: spare"))
                if mine == command or titled:
                    found.append(child)
            except psutil.NoSuchProcess:
                continue
        return found

    def _ports(self, child: psutil.Process) -> list[tuple[int, str]]:
        """(client port, TCP state) of each connection to the server that *child* holds."""
        try:
            conns = child.net_connections("tcp4")
        except psutil.NoSuchProcess:
            return []
        port = self.address[1]
        return [(c.raddr.port, c.status) for c in conns if c.raddr and c.laddr.port == port]

    def _try_kill(self, child: psutil.Process, allow_idle: bool) -> bool:
        """Freeze *child*, note whom it serves, SIGKILL it; False if skipped."""
        try:
            child.send_signal(signal.SIGSTOP)
        except psutil.NoSuchProcess:
            return False
        frozen_at = time.monotonic()
        self._stopped.add(child.pid)
        try:
            deadline = time.monotonic() + 1.0
            while (status := child.status()) != psutil.STATUS_STOPPED:
                if status == psutil.STATUS_ZOMBIE:
                    return False  # exited already: nothing to stop
                if time.monotonic() >= deadline:
                    child.send_signal(signal.SIGCONT)
                    return False
                time.sleep(0.001)
            # Frozen: it can neither take a connection nor let one go now.
            conns = self._ports(child)
            ports = [port for port, _ in conns]
            owing = [port for port, state in conns if state in OWING_STATES]
            if not ports and not allow_idle:
                child.send_signal(signal.SIGCONT)
                return False
            now = time.monotonic()
            found = self.registry.mark_killed(owing, now)
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            return False
        finally:
            self._stopped.discard(child.pid)
        self.kills.append(
            {
                "pid": child.pid,
                "ports": ports,
                "owing": owing,
                "open_connections_marked": found,
                "frozen_ms": round((now - frozen_at) * 1000, 1),
                "at_s": round(now - (self.end - self.cfg.duration), 3),
            }
        )
        return True

    def _storms(self) -> None:
        rng = random.Random(f"{self.cfg.seed}:storms")
        lo, hi = self.cfg.storm_interval
        for _ in range(int(self.cfg.duration / lo) + 1):
            if self.stop.wait(rng.uniform(lo, hi)) or time.monotonic() >= self.end:
                return
            if self._server_exited():
                return
            self.storms += 1
            for _ in range(rng.randint(5, 50)):
                name = rng.choice(self.cfg.storm_signals)
                try:
                    os.kill(self.server.pid, getattr(signal, name))
                except ProcessLookupError:
                    return
                self.signals_sent[name] += 1

    def _server_exited(self) -> bool:
        """Whether the parent has exited (it stays a zombie, our child, until the end)."""
        if self.server.proc.poll() is None:
            return False
        self.server_gone = True
        self.stop.set()
        return True

    def _monitor(self) -> None:
        """Zombies that linger (not counting a reload's re-exec, when nothing can
        reap), the children count, and the parent's RSS and fds."""
        zombie_since: dict[int, float] = {}
        seen, reloading = 0, False  # server log lines read; inside a reload's re-exec
        next_sample = 0.0
        for _ in range(int(self.cfg.duration / 0.5) + 2):
            now = time.monotonic()
            if now >= self.end or self.stop.is_set() or self._server_exited():
                return
            children = self.server.children()
            self.max_children_seen = max(self.max_children_seen, len(children))
            zombies = set()
            for child in children:
                try:
                    if child.status() == psutil.STATUS_ZOMBIE:
                        zombies.add(child.pid)
                except psutil.NoSuchProcess:
                    continue
            new_lines = self.server.lines[seen:]
            seen += len(new_lines)
            for line in new_lines:
                if "re-executing" in line:
                    reloading = True
                elif "forkserver ready" in line:
                    reloading = False
            if reloading:
                # Nothing reaps while the parent re-executes: the clock starts
                # once it is back (it reaps what exited meanwhile at once).
                zombies = set()
                zombie_since.clear()
            for pid in zombies:
                since = zombie_since.setdefault(pid, now)
                if now - since > ZOMBIE_LINGER:
                    first = time.strftime("%H:%M:%S", time.localtime(time.time() - (now - since)))
                    self.zombies_lingering.setdefault(pid, [first, 0.0])[1] = round(now - since, 1)
            for pid in set(zombie_since) - zombies:
                del zombie_since[pid]
            if now >= next_sample:
                next_sample = now + 5.0
                try:
                    self.timeline.append(self._parent_sample(len(children)))
                except psutil.NoSuchProcess:
                    self._server_exited()
                    return
            self.stop.wait(0.5)

    def _parent_sample(self, children: int) -> dict[str, Any]:
        return {
            "t_s": round(time.monotonic() - (self.end - self.cfg.duration), 1),
            "rss_kib": self._proc.memory_info().rss // KIB,
            "fds": self._proc.num_fds(),
            "children": children,
        }

    # -- the run ----------------------------------------------------------------

    def run(self) -> None:
        """Start every thread, wait for the end (or stop), join them all."""
        self.end = time.monotonic() + self.cfg.duration
        threads = [
            threading.Thread(target=self._client, args=(pool, i), name=f"{pool}-{i}", daemon=True)
            for pool, n in self.cfg.pools.items()
            for i in range(n)
        ]
        threads += [
            threading.Thread(target=f, name=f.__name__, daemon=True)
            for f in (self._killer, self._storms, self._monitor)
        ]
        for t in threads:
            t.start()
        try:
            while not self.stop.wait(min(0.5, max(0.0, self.end - time.monotonic()))):
                if time.monotonic() >= self.end:
                    break
        finally:
            self.stop.set()
            # Clients finish their connection: at most conn_timeout.
            join_by = time.monotonic() + self.cfg.conn_timeout + 5
            for t in threads:
                t.join(max(0.0, join_by - time.monotonic()))
            for pid in list(self._stopped):  # a killer interrupted mid-kill
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            self.tally.client_bugs.append(f"threads still running after the end: {stuck}")


# --- before and after ----------------------------------------------------------------


def _settle(server: RunningServer, idle: int, timeout: float) -> list[psutil.Process]:
    """Wait (bounded) until only *idle* children are left; the children then."""
    deadline = time.monotonic() + timeout
    while True:
        children = server.children()
        if len(children) <= idle or time.monotonic() >= deadline:
            return children
        time.sleep(0.05)


def _zombies(children: list[psutil.Process]) -> list[int]:
    found = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def _final_check(address: tuple[str, int], seed: int, timeout: float) -> int:
    """Connections served (echo complete and equal) out of FINAL_CHECK_CONNECTIONS."""
    rng = random.Random(f"{seed}:final")
    served = 0
    for _ in range(FINAL_CHECK_CONNECTIONS):
        payload = rng.randbytes(rng.randint(0, 64 * KIB))
        stream = Stream(address, time.monotonic() + timeout)
        try:
            stream.connect()
            stream.exchange(payload, shut=True, want=None)
            served += _digest(stream.got) == _digest(payload)
        except (OSError, ClientError):
            pass
        finally:
            stream.close()
    return served


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group *pgid*."""
    found = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def _stop_server(server: RunningServer, timeout: float) -> tuple[int | None, list[int]]:
    """SIGTERM the parent; (its exit status or None, processes left in its group)."""
    try:
        server.proc.send_signal(signal.SIGTERM)
        code: int | None = server.proc.wait(timeout)
    except Exception:
        code = None
    deadline = time.monotonic() + 2.0
    while (left := _group_members(server.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return code, left


def _server_log(lines: list[str]) -> dict[str, Any]:
    killed: Counter[str] = Counter()
    # pid -> whom the server thought each child killed under that pid served,
    # in order (pids are reused over a long run)
    killed_pids: dict[int, list[str]] = {}
    exits: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    for line in lines:
        if m := KILLED_LINE.search(line):
            killed[m.group(3)] += 1
            killed_pids.setdefault(int(m.group(1)), []).append(m.group(2))
        elif m := EXIT_LINE.search(line):
            exits[m.group(2)] += 1
        elif m := REFUSED_LINE.search(line):
            refused[m.group(1)] += 1 + int(m.group(2) or 0)
    tracebacks = sum(1 for line in lines if line.startswith("Traceback"))
    reloads = sum(1 for line in lines if "reloading: the new config is valid" in line)
    reload_s = []  # from "re-executing" to the next "forkserver ready"
    began = None
    for line in lines:
        if m := LOG_TIME.match(line):
            if "re-executing" in line:
                began = m.group(1)
            elif began is not None and "forkserver ready" in line:
                reload_s.append(round(_log_seconds(m.group(1)) - _log_seconds(began), 3))
                began = None
    upgrades = sum(1 for line in lines if "started a new parent" in line)
    return {
        "children_killed_by_signal": dict(killed),
        "killed_pids": killed_pids,
        "children_exit_status": dict(exits),
        "refused": dict(refused),
        "tracebacks": tracebacks,
        "reloads": reloads,
        "reload_seconds_max": max(reload_s, default=None),
        "upgrades": upgrades,
        "lines": len(lines),
        # The parent's own events (not the children's tracebacks), the last ones.
        "parent_events": [line for line in lines if PARENT_EVENT.search(line)][-100:],
        # The end of the output, tracebacks' frames left out: what a parent that
        # exited said last, whoever said it.
        "tail": [line for line in lines if not line.startswith(("  ", "Traceback"))][-60:],
    }


def _log_seconds(hms: str) -> float:
    h, m, rest = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(rest.replace(",", "."))


def _parent_figures(server: RunningServer) -> dict[str, Any]:
    """The parent's RSS, open fds and CPU (its own, its reaped children's); None
    for each once it has exited."""
    try:
        if server.proc.poll() is not None:
            raise psutil.NoSuchProcess(server.pid)
        proc = psutil.Process(server.pid)
        parent_cpu, children_cpu = server.cpu_seconds()
        return {
            "rss_kib": proc.memory_info().rss // KIB,
            "fds": proc.num_fds(),
            "cpu_s": round(parent_cpu, 2),
            "children_cpu_s": round(children_cpu, 2),
        }
    except psutil.NoSuchProcess:
        return dict.fromkeys(("rss_kib", "fds", "cpu_s", "children_cpu_s"))


def _growth(start: int | None, end: int | None) -> int | None:
    return None if start is None or end is None else end - start


def run(cfg: SoakConfig, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Start the server, soak it, stop it; the report."""
    report = metadata("bench.soak", argv)
    report["config"] = {**asdict(cfg), "mode": cfg.mode}
    spec = forkserver_spec(
        cfg.max_children, cfg.backlog, cfg.handler, spare_children=cfg.spare_children
    )
    report["server_command"] = " ".join(spec.argv[1:])
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    psutil.cpu_percent(None)
    with serve(spec) as server:
        start = _parent_figures(server)
        soak = Soak(cfg, server)
        t0 = time.monotonic()
        interrupted = False
        previous = {
            s: signal.signal(s, lambda *_: soak.stop.set()) for s in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            soak.run()
            interrupted = time.monotonic() < soak.end - 0.5
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        elapsed = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        busy = psutil.cpu_percent(None)
        children = _settle(server, cfg.spare_children, 15.0)
        zombies = _zombies(children)
        end = _parent_figures(server)
        final_served = _final_check(server.address, cfg.seed, 10.0)
        exit_code, left = _stop_server(server, 40.0)
        log = _server_log(list(server.lines))

    t = soak.tally
    logged: dict[int, list[str]] = log["killed_pids"]
    not_logged = []
    for kill in soak.kills:  # the n-th kill of a pid matches the n-th log line for it
        said = logged.get(kill["pid"])
        kill["server_said"] = said.pop(0) if said else None
        if kill["server_said"] is None:
            not_logged.append(kill["pid"])
    # Killed holding a client connection, yet logged as a spare that had none:
    # the parent never learnt that this spare took a connection.
    unknown_to_parent = [
        k for k in soak.kills if k["ports"] and "no connection reported" in (k["server_said"] or "")
    ]
    client_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    cores = os.cpu_count() or 1
    report.update(
        {
            "elapsed_s": round(elapsed, 2),
            "interrupted": interrupted,
            "connections": {
                name: t.total(name)
                for name in (
                    "attempted",
                    "served",
                    "reset_by_us",
                    "killed_on_purpose",
                    "lost",
                    "corrupted",
                )
            },
            "refused_by_server": sum(log["refused"].values()),
            "served_per_s": round(t.total("served") / elapsed, 1),
            "keepalive_rounds": t.pools["keepalive"].rounds if "keepalive" in t.pools else 0,
            "bytes": {
                "sent": t.total("bytes_sent"),
                "echoed": t.total("bytes_echoed"),
                "lost": t.total("bytes_lost"),
                "corrupted": t.total("bytes_corrupted"),
                "unechoed_by_design": t.total("bytes_unechoed_by_design"),
            },
            "pools": {
                name: {**asdict(p), "errors": dict(sorted(p.errors.items()))}
                for name, p in t.pools.items()
            },
            "errors": dict(
                sorted(sum((p.errors for p in t.pools.values()), Counter[str]()).items())
            ),
            "faults": {
                "kills": len(soak.kills),
                "kills_serving": sum(1 for k in soak.kills if k["ports"]),
                "kills_without_connection": sum(1 for k in soak.kills if not k["ports"]),
                "kills_logged_by_server": len(soak.kills) - len(not_logged),
                "kills_not_logged": not_logged,
                "killed_but_served": t.killed_but_served,
                "kills_of_spares_holding_a_connection_unknown_to_parent": len(unknown_to_parent),
                "kill_ticks_without_candidate": soak.kill_misses,
                "child_frozen_ms_max": max((k["frozen_ms"] for k in soak.kills), default=None),
                "signal_storms": soak.storms,
                "signals_sent": dict(sorted(soak.signals_sent.items())),
                "signals_total": sum(soak.signals_sent.values()),
                "reloads": log["reloads"],
                "reload_seconds_max": log["reload_seconds_max"],
                "upgrades": log["upgrades"],
            },
            "zombies": {"at_end": len(zombies), "lingering": len(soak.zombies_lingering)},
            "zombies_lingering": [
                {"pid": pid, "first_seen": first, "seen_for_s": seen}
                for pid, (first, seen) in soak.zombies_lingering.items()
            ],
            "parent": {
                "rss_kib_start": start["rss_kib"],
                "rss_kib_end": end["rss_kib"],
                "rss_kib_growth": _growth(start["rss_kib"], end["rss_kib"]),
                "fds_start": start["fds"],
                "fds_end": end["fds"],
                "fds_growth": _growth(start["fds"], end["fds"]),
                "cpu_s": end["cpu_s"],
                "children_cpu_s": end["children_cpu_s"],
                "children_at_end": len(children),
                "max_children_seen": soak.max_children_seen,
                "timeline": soak.timeline,
            },
            "server": {
                "served_at_end": final_served,
                "serving_at_end": final_served == FINAL_CHECK_CONNECTIONS,
                "exit_status": exit_code,
                "left_behind": left,
                "gone_during_run": soak.server_gone,
                "log": {k: v for k, v in log.items() if k != "killed_pids"},
            },
            "client_cpu": {
                "seconds": round(client_cpu, 2),
                "cores_used": round(client_cpu / elapsed, 2),
                "machine_busy_percent": busy,
                "cores": cores,
            },
            "kills": soak.kills,
            "lost_samples": t.samples,
            "client_bugs": t.client_bugs[:5],
        }
    )
    report["failures"] = _failures(report)
    report["ok"] = not report["failures"]
    return report


def _failures(r: dict[str, Any]) -> list[str]:
    c, b, z, s, f = r["connections"], r["bytes"], r["zombies"], r["server"], r["faults"]
    checks = [
        (b["lost"] == 0, f"{b['lost']} bytes lost"),
        (b["corrupted"] == 0, f"{b['corrupted']} bytes corrupted"),
        (c["lost"] == 0, f"{c['lost']} connections lost"),
        (c["corrupted"] == 0, f"{c['corrupted']} connections corrupted"),
        (z["at_end"] == 0, f"{z['at_end']} zombies at the end"),
        (z["lingering"] == 0, f"{z['lingering']} zombies lingered > {ZOMBIE_LINGER:g} s"),
        (not f["kills_not_logged"], f"kills the server did not log: {f['kills_not_logged']}"),
        (
            r["parent"]["children_at_end"] == r["config"]["spare_children"],
            f"{r['parent']['children_at_end']} children alive once idle at the end, "
            f"expected {r['config']['spare_children']} (spare_children)",
        ),
        (s["serving_at_end"], f"served {s['served_at_end']}/{FINAL_CHECK_CONNECTIONS} at the end"),
        (s["exit_status"] == 0, f"server exit status {s['exit_status']} on SIGTERM"),
        (not s["left_behind"], f"processes left behind: {s['left_behind']}"),
        (not s["gone_during_run"], "the parent exited during the run"),
        (not r["client_bugs"], "the soak client itself failed (client_bugs)"),
        (not r["interrupted"], "interrupted before the end"),
    ]
    return [why for ok, why in checks if not ok]


# --- output ------------------------------------------------------------------------


def format_report(r: dict[str, Any]) -> str:
    cfg, c, b, f, p, s = (
        r["config"],
        r["connections"],
        r["bytes"],
        r["faults"],
        r["parent"],
        r["server"],
    )
    cpu = r["client_cpu"]
    pools = ", ".join(f"{name} {n}" for name, n in cfg["pools"].items())
    signals = ", ".join(f"{k} {v:,}" for k, v in f["signals_sent"].items()) or "none"
    errors = ", ".join(f"{k} {v:,}" for k, v in r["errors"].items()) or "none"
    lines = [
        f"soak: forkserver, {cfg['mode']}, max_children {cfg['max_children']}, "
        f"{r['elapsed_s']:.0f} s, seed {cfg['seed']}",
        f"  clients       {pools} threads; client CPU {cpu['cores_used']:.2f} of "
        f"{cpu['cores']} cores, machine {cpu['machine_busy_percent']:.0f}% busy",
        f"  connections   attempted {c['attempted']:,}  served {c['served']:,} "
        f"({r['served_per_s']:,.0f}/s)  keepalive rounds {r['keepalive_rounds']:,}",
        f"    by design   reset by us {c['reset_by_us']:,}  killed on purpose "
        f"{c['killed_on_purpose']:,}  refused by the server {r['refused_by_server']:,}",
        f"    LOST        {c['lost']:,}  CORRUPTED {c['corrupted']:,}",
        "  per pool      "
        + "  ".join(f"{k} {v['served']:,}/{v['attempted']:,}" for k, v in r["pools"].items())
        + "  (served/attempted)",
        f"  bytes         sent {b['sent']:,}  echoed {b['echoed']:,}  "
        f"unechoed by design {b['unechoed_by_design']:,}",
        f"    LOST        {b['lost']:,}  CORRUPTED {b['corrupted']:,}",
        f"  faults        children killed {f['kills']:,} (serving {f['kills_serving']:,}, "
        f"holding none {f['kills_without_connection']:,}; "
        f"logged by the server {f['kills_logged_by_server']:,}; "
        f"echo complete anyway {f['killed_but_served']:,})",
        f"                signals sent {f['signals_total']:,} in {f['signal_storms']} storms "
        f"({signals}); reloads {f['reloads']}"
        + (f" (longest {f['reload_seconds_max']} s)" if f["reload_seconds_max"] else "")
        + ", "
        f"upgrades {f['upgrades']}",
        f"                spares killed holding a connection the parent thought idle: "
        f"{f['kills_of_spares_holding_a_connection_unknown_to_parent']:,}",
        f"  ZOMBIES       {r['zombies']['at_end']} at the end, {r['zombies']['lingering']} "
        f"lingering > {ZOMBIE_LINGER:g} s during the run",
        _parent_line(p),
        f"  server        served {s['served_at_end']}/{FINAL_CHECK_CONNECTIONS} at the end; "
        f"SIGTERM: exit status {s['exit_status']}, {len(s['left_behind'])} processes left",
        f"  errors        {errors}",
    ]
    for sample in r["lost_samples"][:5]:
        lines.append(f"    sample      {json.dumps(sample)}")
    lines.append("  result        " + ("PASS" if r["ok"] else "FAIL: " + "; ".join(r["failures"])))
    return "\n".join(lines)


def _parent_line(p: dict[str, Any]) -> str:
    if p["rss_kib_end"] is None:
        return (
            f"  parent        RSS {mb(p['rss_kib_start'] * KIB)} MB, fds {p['fds_start']} "
            "at the start; EXITED before the end"
        )
    return (
        f"  parent        RSS {mb(p['rss_kib_start'] * KIB)} -> {mb(p['rss_kib_end'] * KIB)} MB "
        f"({p['rss_kib_growth']:+,} KiB)  fds {p['fds_start']} -> {p['fds_end']} "
        f"({p['fds_growth']:+})  CPU {p['cpu_s']:.1f} s, children {p['children_cpu_s']:.1f} s"
    )


def _interval(text: str) -> tuple[float, float]:
    lo, _, hi = text.partition(",")
    a, b = float(lo), float(hi or lo)
    if not 0 < a <= b:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX seconds with 0 < MIN <= MAX: {text!r}")
    return a, b


def _signals(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().upper() for n in text.split(",") if n.strip())
    if not names or not set(names) <= set(SIGNALS):
        raise argparse.ArgumentTypeError(f"expected names from {','.join(SIGNALS)}: {text!r}")
    return names


def _pools(text: str) -> dict[str, int]:
    pools = dict(POOLS)
    for item in text.split(","):
        name, _, n = item.partition("=")
        if name.strip() not in POOLS or not n.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected NAME=THREADS with NAME in {list(POOLS)}")
        pools[name.strip()] = int(n)
    return {k: v for k, v in pools.items() if v > 0}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.soak", description=__doc__.split("\n", 1)[0])
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load (120)")
    p.add_argument("--spare-children", type=int, default=0, help="0: fork on accept (0)")
    p.add_argument("--max-children", type=int, default=64, help="(64)")
    p.add_argument("--backlog", type=int, default=128, help="(128)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: from time)")
    p.add_argument(
        "--pools",
        type=_pools,
        default=dict(POOLS),
        help="threads per client pool, e.g. churn=8,slow=0 (default: "
        + ",".join(f"{k}={v}" for k, v in POOLS.items())
        + ")",
    )
    p.add_argument("--kill-interval", type=_interval, default=(0.5, 2.0), help="MIN,MAX s (0.5,2)")
    p.add_argument("--storm-interval", type=_interval, default=(1.0, 5.0), help="MIN,MAX s (1,5)")
    p.add_argument(
        "--storm-signals",
        type=_signals,
        default=STORM_SIGNALS,
        help=f"signals of a storm, from {','.join(SIGNALS)} (default: {','.join(STORM_SIGNALS)})",
    )
    p.add_argument(
        "--handler", default=ECHO_HANDLER, help=f"an echo handler, module:attr ({ECHO_HANDLER})"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.duration <= 0 or args.spare_children < 0 or args.max_children < 1:
        print(
            "bench.soak: --duration > 0, --spare-children >= 0, --max-children >= 1",
            file=sys.stderr,
        )
        return 2
    seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    cfg = SoakConfig(
        duration=args.duration,
        spare_children=args.spare_children,
        max_children=args.max_children,
        backlog=args.backlog,
        seed=seed,
        pools=args.pools,
        kill_interval=args.kill_interval,
        storm_interval=args.storm_interval,
        storm_signals=args.storm_signals,
        handler=args.handler,
    )
    report = run(cfg, argv)
    path = write_results("soak", report, args.out)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_report(report))
        print(f"results: {path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
