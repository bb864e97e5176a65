"""A server subprocess: started in its own session, its output read into a log.

``ServerProcess(argv, env=..., cwd=...)`` starts any command that serves
(``python -m forkserver``, a benchmark peer, a wrapper that execs the
server) as the leader of a new session, so its pid is also its process group
id and ``kill_group()`` ends everything it started that stayed in the group.
A thread reads its output line by line; ``wait_ready()`` waits for the line
that says it is ready (forkserver's ``forkserver ready``), never a sleep,
and reads the ``listening on ADDRESS`` lines before it.

No pytest here: the benchmarks use it too.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "LISTENING",
    "READY",
    "Address",
    "NotReady",
    "ServerProcess",
    "connect",
    "log_messages",
    "parse_address",
]

READY = r"forkserver ready"
LISTENING = re.compile(r"listening on ([^\s\"]+)")

Address = tuple[str, int] | str


class NotReady(Exception):
    """The server exited, or did not say it was ready in time."""


class ServerProcess:
    """A command started in a new session, its output, and the addresses it reported.

    ``listening`` holds the addresses as logged (``127.0.0.1:8000``,
    ``[::1]:8000``, ``udp:127.0.0.1:53``, ``unix:/run/x.sock``); ``addresses``
    the same parsed: ``(host, port)``, or the path of a Unix socket.  The
    output is stdout and stderr together, unless *stdout* is False (then
    stderr only).  *popen* goes to :class:`subprocess.Popen` (``user=``, say).
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str = "",
        stdout: bool = True,
        **popen: Any,
    ) -> None:
        self.argv = list(argv)
        self.name = name or Path(self.argv[0]).name
        self.lines: list[str] = []  # the output so far; read it under no lock, append-only
        self.listening: list[str] = []
        self.addresses: list[Address] = []
        self.status_taken = False  # the exit status was returned to the caller
        self._status: int | None = None
        self._cond = threading.Condition()
        self._eof = False
        self._proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if stdout else subprocess.PIPE,
            env=None if env is None else dict(env),
            cwd=cwd,
            text=True,
            encoding="utf-8",
            errors="backslashreplace",
            start_new_session=True,
            **popen,
        )
        self.pid = self.pgid = self._proc.pid  # a session leader leads its group
        self._output = self._proc.stdout if stdout else self._proc.stderr
        self._reader = threading.Thread(target=self._read, name=f"{self.name}-{self.pid}-log")
        self._reader.daemon = True
        self._reader.start()

    def __repr__(self) -> str:
        return f"<{self.name} pid {self.pid} at {self.listening}>"

    # -- the log ------------------------------------------------------------------

    @property
    def log(self) -> str:
        """Everything the process (and its children) wrote so far."""
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first log line from index *start* matching regex *pattern*,
        waiting up to *timeout* seconds; AssertionError if none came."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = start
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = max(seen, len(self.lines))
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "its output ended" if self._eof else f"{timeout:g} s passed"
                    raise AssertionError(
                        f"no log line matching {pattern!r} ({why}); log:\n" + "\n".join(self.lines)
                    )
                self._cond.wait(left)

    def wait_ready(self, timeout: float = 30.0, ready: str = READY) -> list[Address]:
        """Wait for the line matching *ready*; the addresses listed before it.

        NotReady if the output ends first (the process is exiting) or
        *timeout* passes; the process is then left as it is."""
        rx = re.compile(ready)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                messages = [m for line in self.lines for m in log_messages(line)]
                if any(rx.search(m) for m in messages):
                    found = (LISTENING.search(m) for m in messages)
                    self.listening = [m.group(1) for m in found if m]
                    self.addresses = [parse_address(a) for a in self.listening]
                    return self.addresses
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "its output ended" if self._eof else f"not ready within {timeout:g} s"
                    raise NotReady(f"{self.name} pid {self.pid}: {why}")
                self._cond.wait(left)

    def _read(self) -> None:
        stream = self._output
        assert stream is not None
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # -- addresses and clients ------------------------------------------------------

    @property
    def address(self) -> Address:
        """The first listener reported: ``(host, port)``, or a Unix socket's path."""
        if not self.addresses:
            raise AssertionError(f"{self.name} pid {self.pid} reported no listener")
        return self.addresses[0]

    @property
    def tcp_address(self) -> tuple[str, int]:
        """The first TCP listener reported, as ``(host, port)``."""
        for shown in self.listening:
            if not shown.startswith(("unix:", "udp:")):
                address = parse_address(shown)
                assert isinstance(address, tuple)
                return address
        raise AssertionError(f"{self.name} pid {self.pid} has no TCP listener: {self.listening}")

    @property
    def host(self) -> str:
        return self.tcp_address[0]

    @property
    def port(self) -> int:
        return self.tcp_address[1]

    def connect(self, timeout: float = 10.0) -> socket.socket:
        """A client socket connected to :attr:`address`, with *timeout* on every call."""
        return connect(self.address, timeout)

    def children(self) -> list[psutil.Process]:
        """The process's children now (for a forkserver: one per connection, plus spares)."""
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    # -- signals and exit -------------------------------------------------------------

    def signal(self, signum: int) -> None:
        """Send *signum* to the process (not its group)."""
        os.kill(self.pid, signum)

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (-N: killed by signal N), else None."""
        return self._status

    def poll(self) -> int | None:
        """The exit status if it has exited (reaping it), else None."""
        status = self._proc.poll()
        if status is not None:
            self._reaped(status)
            self.status_taken = True
        return status

    def wait(self, timeout: float | None = 30.0) -> int:
        """Wait for the exit and return the status; TimeoutExpired after *timeout*.

        Its children may still be running, and writing to the log."""
        status = self._proc.wait(timeout)
        self._reaped(status)
        self.status_taken = True
        return status

    def wait_exit(self, timeout: float) -> bool:
        """Whether it exited within *timeout*, without reaping it: while it is
        unreaped its pid, and so its process group's id, cannot be reused."""
        if self._proc.returncode is not None:
            return True
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # no pidfd (Linux < 5.3): poll
            deadline = time.monotonic() + timeout
            while not self._exited():
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)
            return True
        try:
            return bool(select.select([pidfd], [], [], max(timeout, 0.0))[0])
        finally:
            os.close(pidfd)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to *timeout* for the exit, and return the exit status.

        One that does not exit in time is killed with its group (status -9)."""
        if not self.wait_exit(0):
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # exited just now; its status says how
            if not self.wait_exit(timeout):
                self.kill_group()
        status = self.wait(None)
        self._reaped(status, read_all=True)  # its children are gone too: the log is complete
        return status

    def kill_group(self) -> None:
        """SIGKILL its process group (the process too), reap it, and close the log.

        The exit status (-9, unless it had exited) is then the caller's."""
        self.status_taken = True
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # nothing left in the group (a zombie leader does not count)
        self._reaped(self._proc.wait(), read_all=True)

    def _reaped(self, status: int, *, read_all: bool = False) -> None:
        """Note the exit *status*; with *read_all*, wait (up to 5 s) for the end
        of the output, which comes once whatever else holds it open (children
        that outlive the process) has exited too."""
        if self._status is None:
            self._status = status
        if read_all:
            self._reader.join(5.0)
            if self._output is not None and not self._reader.is_alive():
                self._output.close()

    def _exited(self) -> bool:
        try:
            flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
            return os.waitid(os.P_PID, self.pid, flags) is not None
        except ChildProcessError:  # reaped by someone else's waitpid(-1)
            return True


def connect(address: Address, timeout: float = 10.0) -> socket.socket:
    """A stream socket connected to *address* (TCP v4/v6 tuple or Unix path),
    with *timeout* on every call."""
    if isinstance(address, str):
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def parse_address(text: str) -> Address:
    """An address as the server logs it: HOST:PORT, [V6]:PORT, udp:HOST:PORT,
    unix:PATH or unixgram:PATH."""
    for prefix in ("unix:", "unixgram:"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    host, _, port = text.removeprefix("udp:").rpartition(":")
    return host.strip("[]"), int(port)


def log_messages(line: str) -> list[str]:
    """The texts of a log line to match: the line, or if it is a JSON record
    (``log_format = "json"``), its string values."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return [line]
        if isinstance(record, dict):
            return [v for v in record.values() if isinstance(v, str)]
    return [line]
