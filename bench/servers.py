"""The servers the benchmarks measure: how to start each, read its port, stop it.

Every server runs in a new session (its own process group) and is killed by
process group when its ``serve()`` block ends, whatever happened, so no
forked child outlives a benchmark.  Readiness is the server's own output (a
log line or the port it prints), never a sleep.

- ``forkserver``: ``python -m forkserver`` serving an echo handler; the port is
  read from its ``listening on 127.0.0.1:PORT`` log line, readiness from
  ``forkserver ready``.
- ``socketserver``: ``bench/peers/socketserver_echo.py`` (stdlib
  ``ForkingTCPServer``, the same echo loop), which prints its port.
- ``python-floor``: ``bench/peers/leanfloor.py`` under ``python -S -I``, the
  least a Python fork-per-connection server can do (raw-fd accept, fork,
  ``os.read``/``os.write`` echo, ``os._exit``; reaping in its own loop, the
  collector frozen and off), which prints its port: the ceiling for forkserver.
- ``python-sigchld``: ``bench/peers/forkecho.py``, the same loop written the
  ordinary way (socket objects, reaping in a SIGCHLD handler).
- ``c-floor``: ``bench/peers/forkecho.c``, compiled at run time
  (``bench/build.py``; skipped without a C compiler): the floor in C.
- ``tcpserver``: ucspi-tcp's ``tcpserver -1 -HRl0 -c M -b B 127.0.0.1 0 cat``
  (Debian package ucspi-tcp).  ``-1`` prints the bound port, so port 0 works
  without a pick-then-bind race; ``-H -R -l0`` turn off the DNS and ident
  lookups it would otherwise do for every connection.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .build import built

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / "peers"
ECHO_HANDLER = "forkserver.examples.echo:EchoHandler"
HOST = "127.0.0.1"


class ServerError(RuntimeError):
    """A server did not start, or did not report its port."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and recognise its port in its output."""

    name: str
    argv: list[str]
    port_pattern: str  # regex, group 1 is the port
    ready_pattern: str
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None  # default: the repository's root


# Spares for the "forkserver-pool" peer: enough that 8-32 clients rarely
# find the pool empty, few enough to be a setting people would use.
POOL_SPARES = 16


def forkserver_spec(
    max_children: int,
    backlog: int,
    handler: str = ECHO_HANDLER,
    env: dict[str, str] | None = None,
    spare_children: int = 0,
) -> ServerSpec:
    """forkserver forking on accept, or with *spare_children* pre-forked ("-pool")."""
    argv = [sys.executable, "-m", "forkserver", "--handler", handler, "--host", HOST]
    argv += ["--port", "0", "--max-children", str(max_children), "--backlog", str(backlog)]
    argv += ["--spare-children", str(spare_children)]
    return ServerSpec(
        "forkserver-pool" if spare_children else "forkserver",
        argv,
        r"listening on 127\.0\.0\.1:(\d+)",
        r"forkserver ready",
        env or {},
    )


BASELINE_NAME = "forkserver@base"


def baseline_spec(checkout: Path, max_children: int, backlog: int) -> ServerSpec:
    """forkserver forking on accept, run from another *checkout* (say, a
    ``git worktree`` of the last release): before and after, in one run."""
    spec = forkserver_spec(max_children, backlog)
    # python -m puts the working directory first on sys.path: run from there.
    return dataclasses.replace(
        spec, name=BASELINE_NAME, env={"PYTHONPATH": str(checkout)}, cwd=checkout
    )


def socketserver_spec(max_children: int, backlog: int) -> ServerSpec:
    script = str(PEERS / "socketserver_echo.py")
    argv = [sys.executable, script, "--host", HOST, "--port", "0"]
    argv += ["--max-children", str(max_children), "--backlog", str(backlog)]
    return ServerSpec("socketserver", argv, r"^(\d+)$", r"^\d+$")


def python_floor_spec(backlog: int) -> ServerSpec:
    """bench/peers/leanfloor.py: no max_children, no limits, no stop: a floor, not a peer."""
    script = str(PEERS / "leanfloor.py")
    argv = [sys.executable, "-S", "-I", script, "--host", HOST, "--port", "0"]
    return ServerSpec("python-floor", [*argv, "--backlog", str(backlog)], r"^(\d+)$", r"^\d+$")


def python_needs_spec(backlog: int) -> ServerSpec:
    """bench/peers/needsfloor.py: the lean floor plus what forkserver promises
    (epoll loop, signals to a wakeup fd, a pidfd per child, a socket object
    and a handler class in the child)."""
    script = str(PEERS / "needsfloor.py")
    argv = [sys.executable, "-S", "-I", script, "--host", HOST, "--port", "0"]
    return ServerSpec("python-needs", [*argv, "--backlog", str(backlog)], r"^(\d+)$", r"^\d+$")


def python_needs_pool_spec(backlog: int) -> ServerSpec:
    """bench/peers/needspool.py: the needs floor with POOL_SPARES spares, each
    serving one connection, as forkserver-pool."""
    script = str(PEERS / "needspool.py")
    argv = [sys.executable, "-S", "-E", "-s", script, "--host", HOST, "--port", "0"]
    argv += ["--backlog", str(backlog), "--spares", str(POOL_SPARES)]
    return ServerSpec("python-needs-pool", argv, r"^(\d+)$", r"^\d+$")


def python_sigchld_spec(backlog: int) -> ServerSpec:
    """bench/peers/forkecho.py: the floor's loop with socket objects and a SIGCHLD handler."""
    script = str(PEERS / "forkecho.py")
    argv = [sys.executable, script, "--host", HOST, "--port", "0", "--backlog", str(backlog)]
    return ServerSpec("python-sigchld", argv, r"^(\d+)$", r"^\d+$")


def c_floor_spec(backlog: int) -> ServerSpec | None:
    """bench/peers/forkecho.c, built now; None when there is no C compiler."""
    binary = built(PEERS / "forkecho.c")
    if binary is None:
        return None
    pattern = r"listening on 127\.0\.0\.1:(\d+)"
    return ServerSpec("c-floor", [str(binary), str(backlog)], pattern, pattern)


def tcpserver_spec(max_children: int, backlog: int) -> ServerSpec | None:
    """ucspi-tcp's tcpserver running ``cat``, or None when it is not installed."""
    path = shutil.which("tcpserver")
    if path is None:
        return None
    argv = [path, "-1", "-H", "-R", "-l0", "-c", str(max_children), "-b", str(backlog)]
    return ServerSpec("tcpserver", [*argv, HOST, "0", "cat"], r"^(\d+)$", r"^\d+$")


# What each name in ``peer_specs`` starts; (max_children, backlog) -> spec, or
# None when the server is not available here (said in one line, then skipped).
_SPECS: dict[str, Callable[[int, int], ServerSpec | None]] = {
    "forkserver": forkserver_spec,
    "forkserver-pool": lambda m, b: forkserver_spec(m, b, spare_children=min(POOL_SPARES, m)),
    "socketserver": socketserver_spec,
    "tcpserver": tcpserver_spec,
    "python-floor": lambda m, b: python_floor_spec(b),
    "python-needs": lambda m, b: python_needs_spec(b),
    "python-needs-pool": lambda m, b: python_needs_pool_spec(b),
    "python-sigchld": lambda m, b: python_sigchld_spec(b),
    "c-floor": lambda m, b: c_floor_spec(b),
}
SERVER_NAMES = tuple(_SPECS)
_MISSING = {
    "tcpserver": "tcpserver not installed (apt-get install ucspi-tcp): skipped",
    "c-floor": "no C compiler (cc, gcc or clang): c-floor skipped",
}


def peer_specs(names: list[str], max_children: int, backlog: int) -> list[ServerSpec]:
    """Specs for *names*, skipping (with a note) those not available here."""
    specs: list[ServerSpec] = []
    for name in names:
        make = _SPECS.get(name)
        if make is None:
            raise ValueError(f"unknown server {name!r}: one of {', '.join(SERVER_NAMES)}")
        spec = make(max_children, backlog)
        if spec is None:
            print(_MISSING[name], file=sys.stderr)
        else:
            specs.append(spec)
    return specs


class RunningServer:
    """A started server: its pid (= process group), port and output so far."""

    def __init__(self, spec: ServerSpec, proc: subprocess.Popen[str]) -> None:
        self.spec = spec
        self.proc = proc
        self.pid = proc.pid
        self.port = 0
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._process = psutil.Process(self.pid)

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_ready(self, timeout: float) -> None:
        port_rx = re.compile(self.spec.port_pattern)
        ready_rx = re.compile(self.spec.ready_pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if not self.port and (m := port_rx.search(line)):
                        self.port = int(m.group(1))
                    if self.port and ready_rx.search(line):
                        return
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "exited" if self._eof else f"not ready after {timeout:g} s"
                    raise ServerError(
                        f"{self.spec.name} {why}; output:\n" + "\n".join(self.lines[-20:])
                    )
                self._cond.wait(left)

    def cpu_seconds(self) -> tuple[float, float]:
        """(parent, reaped children) CPU seconds, user + system, so far."""
        t = self._process.cpu_times()
        return t.user + t.system, t.children_user + t.children_system

    def faults(self) -> int:
        """Minor page faults so far: the parent's own plus its reaped children's.

        Fields 10 and 11 of /proc/PID/stat (minflt, cminflt); after the
        command name, which may itself hold spaces or parentheses.
        """
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[7]) + int(fields[8])

    def rss(self) -> int:
        """The parent's resident set size in bytes."""
        return int(self._process.memory_info().rss)

    def children(self) -> list[psutil.Process]:
        try:
            return self._process.children()
        except psutil.NoSuchProcess:
            return []

    def settle(self, timeout: float = 2.0) -> bool:
        """Wait (bounded, polling) until every child is reaped; False on timeout.

        There is no event to wait on from outside the server; socketserver, for
        one, reaps only once per 0.5 s poll.
        """
        deadline = time.monotonic() + timeout
        while self.children():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the parent, wait up to *grace*, then SIGKILL the whole group."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            kill_group(self.pid)
            self.proc.wait()
            self._reader.join(5)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def kill_group(pgid: int) -> None:
    """SIGKILL process group *pgid*; quiet if it is already gone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for processes the benchmarks start: repo importable, unbuffered.

    PYTHONDONTWRITEBYTECODE is dropped: a server that cannot cache its
    bytecode compiles every module at each start, and the compiler's
    leftovers stay in the parent's heap, which each fork then copies; that
    would measure the environment, not the server."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **(extra or {})}


@contextmanager
def serve(spec: ServerSpec, ready_timeout: float = 60.0) -> Iterator[RunningServer]:
    """Start *spec* in a new session; yield it once ready; always kill its group."""
    proc = subprocess.Popen(
        spec.argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=spec.cwd or ROOT,
        env=bench_env(spec.env),
        start_new_session=True,
    )
    try:
        server = RunningServer(spec, proc)
    except BaseException:
        kill_group(proc.pid)
        proc.wait()
        raise
    try:
        server.wait_ready(ready_timeout)
        yield server
    finally:
        server.stop()
