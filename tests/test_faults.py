"""Faults the parent must ride out (forkserver/server.py: _accept_failed,
_fork_failed, reaping), end to end, in both serving modes.

* Out of descriptors: the parent's RLIMIT_NOFILE is lowered (prlimit, through
  psutil) to exactly the descriptors it holds, so every accept() fails with
  EMFILE while clients pile up in the backlog; raising it again is the
  descriptors freeing up.
* fork() failing: the server runs as an unprivileged uid under a low
  RLIMIT_NPROC (root ignores that limit), so its children use up the
  processes it may have.
* Children and the parent killed with SIGKILL.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from forkserver.listeners import BACKOFF_SECONDS
from forkserver.server import LOG_INTERVAL
from forkserver.testing.pytest_plugin import ServerFactory
from tests.helpers.clients import (
    accept_queue_length,
    connect,
    echo_roundtrip,
    read_pid_greeting,
    recv_to_eof,
    recv_until,
)
from tests.helpers.processes import (
    child_pids,
    group_members,
    idle_children,
    live_children,
    reaped,
    zombie_children,
)
from tests.helpers.servers import (
    FORK_ON_ACCEPT,
    MODES,
    POOL,
    ROOT,
    ServerProcess,
    StartServer,
    config,
    wait_until,
)

BUSY = "busy, try later\r\n"
BUSY_TOML = 'busy_message = "busy, try later\\r\\n"\n'  # config() does not escape \r\n


# -- EMFILE: out of descriptors ------------------------------------------------------


def _starve_of_descriptors(pid: int) -> tuple[int, int]:
    """Lower *pid*'s RLIMIT_NOFILE to its lowest unused descriptor number: what
    it holds stays open, and the next descriptor it asks for fails with EMFILE.
    Returns the limits to restore."""
    proc = psutil.Process(pid)
    original: tuple[int, int] = proc.rlimit(psutil.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    lowest_free = min(set(range(len(used) + 1)) - used)
    proc.rlimit(psutil.RLIMIT_NOFILE, (lowest_free, original[1]))
    return original


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _flood(address: tuple[str, int], n: int) -> tuple[list[socket.socket], list[bytes]]:
    """*n* clients that each send a distinct payload and half-close at once."""
    socks: list[socket.socket] = []
    payloads = [i.to_bytes(4, "big") + os.urandom(2000) for i in range(n)]
    try:
        for payload in payloads:
            sock = connect(address, timeout=20)
            socks.append(sock)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks, payloads


ACCEPT_FAILED = r"accept\(\) on 127\.0\.0\.1:{port} failed: Too many open files; pausing"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "whole_interval"),
    # Forked on accept, the flood lasts one LOG_INTERVAL, for the second report
    # and its count of the failures held back; with the pool, a short look.
    # The pool's spares accept by themselves unless an admission rule (here
    # allow) needs the parent to look first: then the parent accepts.
    [
        pytest.param(FORK_ON_ACCEPT, True, id="fork"),
        pytest.param({**POOL, "allow": ["127.0.0.0/8"]}, False, id="pool"),
    ],
)
def test_out_of_descriptors_the_parent_idles_logs_once_and_serves_everyone_after(
    start_server: StartServer, mode: dict[str, Any], whole_interval: bool
) -> None:
    n = 60
    server = start_server(config(**mode))
    idle_children(server, mode)
    address = server.tcp_address
    port = address[1]
    original = _starve_of_descriptors(server.pid)
    socks, payloads = _flood(address, n)
    try:
        first = server.wait_for_log(ACCEPT_FAILED.format(port=port))
        assert f"[{server.pid}]" in first
        wait_until(lambda: accept_queue_length(port) == n, 10, f"{n} clients in the backlog")
        before, started = _cpu_seconds(server.pid), time.monotonic()
        if not whole_interval:
            time.sleep(2)  # not readiness: a window to measure CPU in
        else:
            second = server.wait_for_log(
                ACCEPT_FAILED.format(port=port) + r".*\((\d+) more failures since",
                timeout=LOG_INTERVAL + 20,
            )
            held = int(re.findall(r"\((\d+) more failures since", second)[0])
            # One retry per BACKOFF_SECONDS, not a busy loop (which would make
            # millions of attempts); and it did keep retrying.
            assert 1 <= held <= 2 * LOG_INTERVAL / BACKOFF_SECONDS, second
        window = time.monotonic() - started
        used = _cpu_seconds(server.pid) - before
        # Near idle: a retry loop without a pause would take a whole core.
        assert used < 0.1 * window, f"the parent used {used:.2f}s of CPU in {window:.1f}s"
        failures = re.findall(ACCEPT_FAILED.format(port=port), server.log)
        assert len(failures) == (2 if whole_interval else 1), "once per LOG_INTERVAL"
        assert accept_queue_length(port) == n, "still waiting in the backlog, none dropped"
        assert child_pids(server.pid) == live_children(server)  # and no zombie
        # Descriptors free up: everyone waiting is served, exactly.
        psutil.Process(server.pid).rlimit(psutil.RLIMIT_NOFILE, original)
        for sock, payload in zip(socks, payloads, strict=True):
            assert recv_to_eof(sock) == payload
    finally:
        for sock in socks:
            sock.close()
    assert echo_roundtrip(address, b"after the flood") == b"after the flood"
    idle_children(server, mode)
    assert server.stop() == 0


# -- fork() failing: EAGAIN under RLIMIT_NPROC ---------------------------------------------


def _unused_uid() -> int:
    """A uid with no account and no process: RLIMIT_NPROC counts per uid."""
    taken = {p.info["uids"].real for p in psutil.process_iter(["uids"]) if p.info["uids"]}
    for uid in range(59000, 60000):
        if uid in taken:
            continue
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    pytest.skip("no free uid in 59000-59999")


def _python_for(uid: int, cwd: str) -> str:
    """An interpreter *uid* can run forkserver with (this venv's may sit under
    a directory only root can enter)."""
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys, forkserver; assert sys.version_info >= (3, 11)"],
                env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
                cwd=cwd,
                user=uid,
                group=uid,
                extra_groups=[],
                capture_output=True,
                timeout=30,
                check=False,
            )
        except OSError:  # this uid may not even execute it
            continue
        if probe.returncode == 0:
            return candidate
    pytest.skip(f"no Python 3.11+ that uid {uid} may run forkserver with")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory other users may read (tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="forkserver-faults-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _start_unprivileged(
    forkserver: ServerFactory, config_text: str, directory: Path, nproc: int
) -> ServerProcess:
    """The real server as an unused uid, allowed *nproc* processes in all, not
    yet ready; the caller must kill_group() it."""
    uid = _unused_uid()
    python = _python_for(uid, str(directory))
    path = directory / "server.toml"
    path.write_text(config_text)
    path.chmod(0o644)

    # Set the limit as that uid, then become the server (no preexec_fn: this
    # process has threads).
    exec_server = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NPROC, ({nproc}, {nproc})); "
        "os.execv(sys.executable, [sys.executable, '-m', 'forkserver', *sys.argv[1:]])"
    )
    return forkserver.command(
        [python, "-c", exec_server, "--config", str(path)],
        ready=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        cwd=directory,
        stdout=False,
        user=uid,
        group=uid,
        extra_groups=[],
    )


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="starting a server as another uid needs root")
@pytest.mark.parametrize(
    "mode",
    [
        MODES[0],
        pytest.param(POOL, id="pool"),
    ],
)
def test_fork_failure_refuses_the_connection_and_serving_resumes(
    forkserver: ServerFactory, public_dir: Path, mode: dict[str, Any]
) -> None:
    # Three processes for this uid: the parent and two children.
    text = (
        config("tests.helpers.services:PidEcho", max_children=10, when_full="refuse", **mode)
        + BUSY_TOML
    )
    server = _start_unprivileged(forkserver, text, public_dir, nproc=3)
    held: list[socket.socket] = []
    try:
        server.wait_ready()
        idle_children(server, mode)
        address = server.tcp_address
        pids = []
        for _ in range(2):
            held.append(connect(address, timeout=4))
            pids.append(read_pid_greeting(held[-1]))
        with connect(address, timeout=5) as sock:  # no process left for its child
            port = sock.getsockname()[1]
            assert recv_to_eof(sock, timeout=5) == BUSY.encode()
        failed = server.wait_for_log(r"fork\(\) failed: Resource temporarily unavailable; ")
        assert f"[{server.pid}]" in failed
        server.wait_for_log(rf"refused 127\.0\.0\.1:{port}: fork_failed$")
        assert server.poll() is None
        # A child exits: its process slot is free, and the next client is served.
        held.pop(0).close()
        wait_until(lambda: reaped(pids[0]), 10, "the child to be reaped")
        with connect(address) as sock:
            read_pid_greeting(sock)
            sock.sendall(b"served again\n")
            assert recv_until(sock, b"again\n") == b"served again\n"
        for sock in held:
            sock.close()
        held.clear()
        assert server.stop() == 0
    finally:
        for sock in held:
            sock.close()
        server.kill_group()
        print(server.log)  # shown if the test failed


def _hold_every_process(server: ServerProcess, n: int) -> list[socket.socket]:
    """*n* clients, each served by a child: the uid's processes are used up."""
    held: list[socket.socket] = []
    for _ in range(n):
        held.append(connect(server.tcp_address, timeout=4))
        read_pid_greeting(held[-1])
    return held


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="starting a server as another uid needs root")
def test_fork_failure_refuses_a_whole_flood_at_once(
    forkserver: ServerFactory, public_dir: Path
) -> None:
    # when_full = "refuse": every connection that cannot get a child gets the
    # busy message at once, not one per backoff (it was 33 in 3.2 s).
    n = 40
    text = config("tests.helpers.services:PidEcho", max_children=10, when_full="refuse") + BUSY_TOML
    server = _start_unprivileged(forkserver, text, public_dir, nproc=3)
    held: list[socket.socket] = []
    try:
        server.wait_ready()
        held = _hold_every_process(server, 2)
        started = time.monotonic()
        flood = []
        for _ in range(n):
            flood.append(connect(server.tcp_address, timeout=5))
        for sock in flood:
            assert recv_to_eof(sock, timeout=5) == BUSY.encode()
            sock.close()
        took = time.monotonic() - started
        assert took < 0.5, f"{n} refusals took {took:.2f}s"
        server.wait_for_log(r"fork\(\) failed: Resource temporarily unavailable; refusing")
        assert server.poll() is None
        assert server.stop() == 0
    finally:
        for sock in held:
            sock.close()
        server.kill_group()
        print(server.log)  # shown if the test failed


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="starting a server as another uid needs root")
def test_fork_failure_with_when_full_wait_holds_connections_until_a_process_is_free(
    forkserver: ServerFactory, public_dir: Path
) -> None:
    n = 10
    text = config("tests.helpers.services:PidEcho", max_children=10) + BUSY_TOML
    server = _start_unprivileged(forkserver, text, public_dir, nproc=3)
    held: list[socket.socket] = []
    waiting: list[socket.socket] = []
    try:
        server.wait_ready()
        held = _hold_every_process(server, 2)
        for i in range(n):
            waiting.append(connect(server.tcp_address, timeout=20))
            waiting[-1].sendall(f"client {i}\n".encode())
        server.wait_for_log(r"fork\(\) failed: Resource temporarily unavailable; holding")
        for sock in held:
            sock.close()
        # Served one after another as processes free up; none refused.
        for i, sock in enumerate(waiting):
            line = f"client {i}\n".encode()
            greeting, _, echoed = recv_until(sock, line).partition(b"\n")
            assert greeting.isdigit() and echoed == line
            sock.close()
        assert "fork_failed" not in server.log
        assert server.stop() == 0
    finally:
        for sock in held + waiting:
            sock.close()
        server.kill_group()
        print(server.log)  # shown if the test failed


# -- children and parents killed --------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_child_killed_mid_connection_is_reaped_and_logged(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(config("tests.helpers.services:PidEcho", **mode))
    idle_children(server, mode)
    address = server.tcp_address
    with connect(address) as sock:
        port = sock.getsockname()[1]
        pid = read_pid_greeting(sock)
        sock.sendall(b"x\n")
        assert recv_until(sock, b"x\n") == b"x\n"
        os.kill(pid, signal.SIGKILL)
        line = server.wait_for_log(rf"child {pid} for 127\.0\.0\.1:{port} killed by SIGKILL")
        assert f"[{server.pid}]" in line
        assert recv_to_eof(sock) == b""
    wait_until(lambda: reaped(pid), 10, "the killed child to be reaped")
    for i in range(3):
        payload = f"still serving {i}\n".encode()
        greeting, _, echoed = echo_roundtrip(address, payload).partition(b"\n")
        assert greeting.isdigit() and int(greeting) != pid and echoed == payload
    idle_children(server, mode)
    # Every exited child is reaped: promptly, not necessarily at this instant
    # (one may exit between two reads of /proc).
    wait_until(lambda: not zombie_children(server), 10, "no zombie")
    assert server.stop() == 0


def _listening_on(port: int, pids: list[int]) -> list[int]:
    """Which of *pids* hold a listening TCP socket on *port*."""
    holders = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections("tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr[1] == port for c in conns):
            holders.append(pid)
    return holders


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_sigkilled_parent_leaves_children_serving_and_the_port_free(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(config("tests.helpers.services:PidEcho", **mode))
    idle_children(server, mode)
    address = server.tcp_address
    busy = [connect(address) for _ in range(2)]
    try:
        pids = [read_pid_greeting(sock) for sock in busy]
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        # Idle spares (pool) see the handoff socket close and exit; the busy
        # children live on, and none of them holds the listener.
        wait_until(
            lambda: {p.pid for p in group_members(server.pid)} == set(pids),
            10,
            "only the busy children left",
        )
        assert _listening_on(address[1], pids) == []
        with socket.socket() as again:  # a new server could bind at once
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(address)
            again.listen()
        for i, sock in enumerate(busy):
            line = f"orphan {i} still served\n".encode()
            sock.sendall(line)
            assert recv_until(sock, line) == line
            sock.shutdown(socket.SHUT_WR)
            assert recv_to_eof(sock) == b""
    finally:
        for sock in busy:
            sock.close()
    wait_until(lambda: not group_members(server.pid), 10, "the orphans to finish and exit")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_new_server_binds_the_port_of_a_sigkilled_one_at_once(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(config("tests.helpers.services:PidEcho", **mode))
    idle_children(server, mode)
    port = server.tcp_address[1]
    busy = connect(server.tcp_address)
    try:
        read_pid_greeting(busy)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        # The real thing: a second forkserver on the same port while the first
        # one's orphan is still serving.
        second = start_server(config("tests.helpers.services:PidEcho", port=port, **mode))
        assert second.tcp_address == ("127.0.0.1", port)
        with connect(second.tcp_address) as sock:
            assert read_pid_greeting(sock) in child_pids(second.pid)
        busy.sendall(b"first server's client\n")
        assert recv_until(busy, b"client\n") == b"first server's client\n"
    finally:
        busy.close()
    wait_until(lambda: not group_members(server.pid), 10, "the orphan to exit")
    assert second.stop() == 0
