"""End-to-end tests of the parent loop (forkserver/server.py) through the real CLI.

Every test starts ``python -m forkserver`` on loopback port 0 and talks to it
over real sockets: exact bytes, exit statuses, log lines, and what psutil sees
of the children.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from tests.helpers.clients import (
    accept_queue_length,
    connect,
    echo_roundtrip,
    recv_to_eof,
    recv_until,
    send_and_read,
)
from tests.helpers.processes import children_gone
from tests.helpers.servers import ABNORMAL_EXIT, ServerProcess, StartServer, config, wait_until


def _port(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def _assert_all_exited(pids: list[int]) -> None:
    survivors = [pid for pid in pids if psutil.pid_exists(pid)]
    assert not survivors, f"children still exist: {survivors}"


def _one_child(server: ServerProcess) -> int:
    wait_until(lambda: len(server.children()) == 1, 10, "one child")
    [child] = server.children()
    return child.pid


def _tcp_peers(pid: int) -> list[object]:
    """The peer of every TCP socket process *pid* holds ("LISTEN" for a listener)."""
    return [
        "LISTEN" if conn.status == psutil.CONN_LISTEN else tuple(conn.raddr)
        for conn in psutil.Process(pid).net_connections("tcp")
    ]


# -- 1. exact echo ----------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [0, 1, 1024, 64 * 1024 + 1, 1 << 20, 8 << 20])
def test_echo_is_exact(start_server: StartServer, size: int) -> None:
    server = start_server(config())
    payload = os.urandom(size)
    assert echo_roundtrip(server.tcp_address, payload) == payload
    assert server.stop() == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log


# -- 2. hundreds of concurrent clients ----------------------------------------


@pytest.mark.timeout(60)
def test_hundreds_of_concurrent_clients_are_all_served_and_reaped(
    start_server: StartServer,
) -> None:
    n = 300
    server = start_server(config(backlog=1024))
    address = server.tcp_address
    payloads = [i.to_bytes(4, "big") + os.urandom(4092) for i in range(n)]
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(connect(address))
        # All connected and held open before anyone sends: one child each.
        wait_until(lambda: len(server.children()) == n, 30, f"{n} live children")
        for sock, payload in zip(socks, payloads, strict=True):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        received = {sock: bytearray() for sock in socks}
        with selectors.DefaultSelector() as sel:
            for sock in socks:
                sel.register(sock, selectors.EVENT_READ)
            open_count = n
            deadline = time.monotonic() + 30
            while open_count and time.monotonic() < deadline:
                for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                    sock = key.fileobj  # type: ignore[assignment]
                    data = sock.recv(65536)
                    if data:
                        received[sock] += data
                    else:
                        sel.unregister(sock)
                        open_count -= 1
            assert open_count == 0, f"{open_count} clients got no EOF"
        wrong = [i for i, s in enumerate(socks) if bytes(received[s]) != payloads[i]]
        assert not wrong, f"clients {wrong[:10]} got wrong bytes"
    finally:
        for sock in socks:
            sock.close()
    children_gone(server)
    assert server.stop() == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log


# -- 3. a raising handler fails alone -----------------------------------------


@pytest.mark.timeout(30)
def test_raising_handler_fails_alone_and_serving_goes_on(start_server: StartServer) -> None:
    server = start_server(config("tests.helpers.services:Raising"))
    address = server.tcp_address
    for attempt in range(3):
        start = len(server.lines)
        with connect(address) as sock:
            port = _port(sock)
            assert recv_to_eof(sock) == b"about to fail\n"
        failed = server.wait_for_log(rf"handler failed for 127\.0\.0\.1:{port}$", start=start)
        server.wait_for_log(r"RuntimeError: deliberate failure", start=start)
        exit_line = server.wait_for_log(
            rf"child \d+ for 127\.0\.0\.1:{port} exit status 1 after", start=start
        )
        # The traceback was logged by the child, not by the parent.
        logged_by = re.search(r"\[(\d+)\]", failed)
        child_pid = re.search(r"child (\d+) for", exit_line)
        assert logged_by and child_pid, (failed, exit_line)
        assert int(logged_by.group(1)) == int(child_pid.group(1)) != server.pid, attempt
        assert server.poll() is None
    children_gone(server)
    assert server.stop() == 0


# -- 4. signals during accept -------------------------------------------------


@pytest.mark.timeout(60)
def test_sigchld_storm_of_short_connections_all_served(start_server: StartServer) -> None:
    n = 500
    server = start_server(config())
    address = server.tcp_address
    payloads = [i.to_bytes(4, "big") + os.urandom(60) for i in range(n)]

    def roundtrip(payload: bytes) -> bool:
        return echo_roundtrip(address, payload, timeout=10) == payload

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(roundtrip, payloads, timeout=50))
    assert results.count(True) == n, f"{results.count(False)} of {n} clients got wrong bytes"
    children_gone(server)
    assert server.poll() is None
    assert server.stop() == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log


@pytest.mark.timeout(60)
def test_harmless_signals_during_accept_never_break_serving(start_server: StartServer) -> None:
    clients, max_signals = 200, 20_000_000
    server = start_server(config())
    address = server.tcp_address
    # SIGUSR1 without a log_file is ignored; SIGHUP (reload) and SIGUSR2
    # (upgrade) mean something now: see test_signal_storm_during_reloads.
    harmless = (signal.SIGWINCH, signal.SIGUSR1, signal.SIGCONT, signal.SIGURG)
    done = threading.Event()

    def pester() -> int:
        sent = 0
        deadline = time.monotonic() + 50
        while sent < max_signals and not done.is_set() and time.monotonic() < deadline:
            os.kill(server.pid, harmless[sent % len(harmless)])
            sent += 1
        return sent

    def roundtrip(i: int) -> bool:
        payload = i.to_bytes(4, "big") + os.urandom(500)
        return echo_roundtrip(address, payload, timeout=10) == payload

    with ThreadPoolExecutor(max_workers=4) as pool:
        pestering = pool.submit(pester)
        try:
            results = list(pool.map(roundtrip, range(clients), timeout=50))
        finally:
            done.set()
        sent = pestering.result(timeout=10)
    assert results.count(True) == clients, f"{results.count(False)} clients got wrong bytes"
    # The storm lasted until the last client was served, not less.
    assert len(harmless) <= sent < max_signals, f"{sent} signals sent"
    assert server.poll() is None, "the parent died of a harmless signal"
    server.wait_for_log("SIGUSR1 ignored")
    # Still serving after the storm, and a clean stop.
    assert echo_roundtrip(address, b"after") == b"after"
    children_gone(server)
    assert server.stop() == 0
    assert "stopped: all children have exited" in server.log


@pytest.mark.timeout(30)
def test_a_signal_the_handler_module_handles_is_left_to_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A handler module may install its own Python signal handler in the
    parent: that signal reaches the wakeup fd too, and the parent leaves it
    to the module (it once took it for its own, failed to find an action,
    and died with KeyError)."""
    noted = tmp_path / "noted"
    server = start_server(
        config("tests.helpers.own_signal_handler:echo"), env={"OWN_SIGNAL_FILE": str(noted)}
    )

    def noted_lines() -> int:
        return noted.read_text().count("\n") if noted.exists() else 0

    for _ in range(3):  # one at a time: pending signals of one kind merge
        before = noted_lines()
        server.signal(signal.SIGWINCH)
        wait_until(lambda: noted_lines() > before, 10)  # noqa: B023 (called in this iteration)
    assert noted.read_text() == f"{int(signal.SIGWINCH)}\n" * 3
    assert echo_roundtrip(server.tcp_address, b"still here") == b"still here"
    assert server.stop() == 0


@pytest.mark.timeout(90)
def test_signal_storm_during_reloads_never_kills_the_parent(start_server: StartServer) -> None:
    """A reload re-executes the parent; signals arriving meanwhile must wait
    for the new image's handlers, not kill it with their default action."""
    server = start_server(config())
    address = server.tcp_address
    storm = (signal.SIGUSR1, signal.SIGWINCH, signal.SIGHUP)
    sent = 0
    for _ in range(3):  # three reloads, each under a storm
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            "forkserver ready" in line for line in server.lines[mark:]
        ):
            os.kill(server.pid, storm[sent % len(storm)])
            sent += 1
        assert server.poll() is None, f"the parent died during a reload: {server.log}"
        server.wait_for_log("forkserver ready", 30, start=mark)
        assert echo_roundtrip(address, b"still here") == b"still here"
    assert sent > 0
    assert server.stop() == 0


# -- 5. max_children -------------------------------------------------------------


@pytest.mark.timeout(40)
def test_max_children_is_never_exceeded_and_waiting_clients_are_served(
    start_server: StartServer,
) -> None:
    limit, n = 3, 10
    server = start_server(config("tests.helpers.services:PidEcho", max_children=limit, backlog=64))
    address = server.tcp_address
    peak = 0
    samples = 0
    stop_sampling = threading.Event()

    def sample() -> None:
        nonlocal peak, samples
        while samples < 100_000 and not stop_sampling.is_set():
            peak = max(peak, len(server.children()))
            samples += 1
            stop_sampling.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    socks = [connect(address) for _ in range(n)]
    busy: dict[int, int] = {}  # greeted by a child, not yet released: client -> child pid
    served: dict[int, int] = {}

    def collect_greetings(sel: selectors.BaseSelector, want: int) -> None:
        deadline = time.monotonic() + 10
        while len(busy) < want and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                sel.unregister(key.fileobj)
                busy[key.data] = int(recv_until(socks[key.data], b"\n"))
        assert len(busy) == want, f"{len(busy)} clients being served, expected {want}"

    try:
        with selectors.DefaultSelector() as sel:
            for i, sock in enumerate(socks):
                sel.register(sock, selectors.EVENT_READ, i)
            collect_greetings(sel, limit)
            assert {p.pid for p in server.children()} == set(busy.values())
            taken = samples
            wait_until(lambda: samples > taken + 3, 10, "the sampler to look")
            while busy:  # release one client at a time; a waiting one takes its slot
                i, pid = busy.popitem()
                line = f"client {i}\n".encode()
                socks[i].sendall(line)
                socks[i].shutdown(socket.SHUT_WR)
                assert recv_to_eof(socks[i]) == line
                served[i] = pid
                collect_greetings(sel, min(limit, n - len(served)))
        assert sorted(served) == list(range(n))
        assert len(set(served.values())) == n, "one child per connection"
    finally:
        stop_sampling.set()
        sampler.join(10)
        for sock in socks:
            sock.close()
    assert samples > 3, "the sampler did not run"
    assert peak == limit, f"peak of {peak} children with max_children={limit}"
    children_gone(server)
    assert server.stop() == 0


# -- 6. graceful stop ---------------------------------------------------------


@pytest.mark.timeout(30)
def test_connection_in_flight_at_sigterm_completes_and_new_ones_are_refused(
    start_server: StartServer,
) -> None:
    server = start_server(config())
    address = server.tcp_address
    with connect(address) as sock:
        sock.sendall(b"first")
        assert recv_until(sock, b"first") == b"first"
        pid = _one_child(server)
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"stopping: no longer accepting; waiting up to 30\.0s for 1 children")
        with pytest.raises(ConnectionRefusedError):
            connect(address, timeout=5).close()
        # The parent is waiting for this client's child, not gone already.
        assert server.poll() is None
        rest = os.urandom(256 * 1024 + 7)
        assert send_and_read(sock, rest) == rest
    assert server.wait(10) == 0
    assert "stopped: all children have exited" in server.log
    assert not ABNORMAL_EXIT.search(server.log), server.log
    _assert_all_exited([pid])


# -- 7. graceful_timeout and kill_timeout -----------------------------------------


@pytest.mark.timeout(30)
def test_graceful_timeout_expiry_sends_sigterm_to_idle_children(
    start_server: StartServer,
) -> None:
    server = start_server(config(graceful_timeout=0.5))
    with connect(server.tcp_address) as sock:
        port = _port(sock)
        sock.sendall(b"x")
        assert recv_until(sock, b"x") == b"x"
        pid = _one_child(server)
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"graceful_timeout \(0\.5s\) expired: sending SIGTERM to 1 children")
        server.wait_for_log(rf"child {pid} for 127\.0\.0\.1:{port} killed by SIGTERM")
        assert server.wait(10) == 0
        assert recv_to_eof(sock) == b""
    assert "sending SIGKILL" not in server.log
    _assert_all_exited([pid])


@pytest.mark.timeout(30)
def test_kill_timeout_expiry_sends_sigkill_to_children_ignoring_sigterm(
    start_server: StartServer,
) -> None:
    server = start_server(
        config("tests.helpers.services:IgnoreTerm", graceful_timeout=0.5, kill_timeout=0.5)
    )
    with connect(server.tcp_address) as sock:
        port = _port(sock)
        assert recv_until(sock, b"\n") == b"ready\n"  # SIGTERM is ignored from here on
        pid = _one_child(server)
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"graceful_timeout \(0\.5s\) expired: sending SIGTERM to 1 children")
        server.wait_for_log(r"sending SIGKILL to 1 children")
        server.wait_for_log(rf"child {pid} for 127\.0\.0\.1:{port} killed by SIGKILL")
        assert server.wait(10) == 0
        assert recv_to_eof(sock) == b""
    _assert_all_exited([pid])


# -- 8. immediate stops ---------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "signals", [(signal.SIGINT, signal.SIGINT), (signal.SIGQUIT,)], ids=["second-sigint", "sigquit"]
)
def test_stops_at_once(start_server: StartServer, signals: tuple[int, ...]) -> None:
    """A second SIGINT, or SIGQUIT, does not wait for graceful_timeout."""
    server = start_server(config(graceful_timeout=60))
    with connect(server.tcp_address) as sock:
        port = _port(sock)
        sock.sendall(b"x")
        assert recv_until(sock, b"x") == b"x"
        pid = _one_child(server)
        if len(signals) == 2:  # the first is a graceful stop
            server.signal(signals[0])
            server.wait_for_log(
                r"stopping: no longer accepting; waiting up to 60\.0s for 1 children"
            )
            assert server.poll() is None
        server.signal(signals[-1])
        server.wait_for_log(r"stopping now: killing 1 children")
        assert server.wait(10) == 0  # well before graceful_timeout's 60 s
        assert recv_to_eof(sock) == b""
    assert re.search(rf"child {pid} for 127\.0\.0\.1:{port} killed by SIGKILL", server.log)
    _assert_all_exited([pid])


# -- 9. exit statuses ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_child_exit_status_is_logged_with_the_peer(start_server: StartServer) -> None:
    server = start_server(config("tests.helpers.services:exit_with_status"))
    with connect(server.tcp_address) as sock:
        port = _port(sock)
        sock.sendall(b"3\n")
        assert recv_to_eof(sock) == b""
    server.wait_for_log(rf"child \d+ for 127\.0\.0\.1:{port} exit status 3 after")
    children_gone(server)
    assert server.stop() == 0


@pytest.mark.timeout(30)
def test_child_killed_by_sigkill_is_logged_and_serving_goes_on(
    start_server: StartServer,
) -> None:
    server = start_server(config())
    address = server.tcp_address
    with connect(address) as sock:
        port = _port(sock)
        sock.sendall(b"x")
        assert recv_until(sock, b"x") == b"x"
        pid = _one_child(server)
        os.kill(pid, signal.SIGKILL)
        server.wait_for_log(rf"child {pid} for 127\.0\.0\.1:{port} killed by SIGKILL after")
        assert recv_to_eof(sock) == b""
    assert echo_roundtrip(address, b"still serving") == b"still serving"
    children_gone(server)
    assert server.stop() == 0


# -- 10. the backlog at SIGTERM -------------------------------------------------------


@pytest.mark.timeout(30)
def test_connections_waiting_in_the_backlog_at_sigterm_are_served(
    start_server: StartServer,
) -> None:
    server = start_server(config("tests.helpers.services:PidEcho", max_children=1))
    host, port = server.tcp_address
    with connect((host, port)) as busy:
        assert int(recv_until(busy, b"\n")) > 0  # the only child is taken
        waiting = [connect((host, port)) for _ in range(2)]
        try:
            wait_until(lambda: accept_queue_length(port) == 2, 10, "2 connections in the backlog")
            server.signal(signal.SIGTERM)
            server.wait_for_log(
                r"stopping: no longer accepting; waiting up to 30\.0s for 3 children"
            )
            busy.sendall(b"busy\n")
            busy.shutdown(socket.SHUT_WR)
            assert recv_to_eof(busy) == b"busy\n"
            for i, sock in enumerate(waiting):
                assert int(recv_until(sock, b"\n")) > 0  # a child's pid: being served
                line = f"waiting {i}\n".encode()
                sock.sendall(line)
                sock.shutdown(socket.SHUT_WR)
                assert recv_to_eof(sock) == line
        finally:
            for sock in waiting:
                sock.close()
    assert server.wait(10) == 0
    assert "unserved" not in server.log
    assert not ABNORMAL_EXIT.search(server.log), server.log


# -- 11. EOF as soon as the handler is done -------------------------------------------


@pytest.mark.timeout(30)
def test_client_sees_eof_right_after_the_handler_returns(start_server: StartServer) -> None:
    server = start_server(config("tests.helpers.services:bye_and_return"))
    with connect(server.tcp_address, timeout=5) as sock:
        assert recv_to_eof(sock, timeout=5) == b"bye"
    children_gone(server)
    assert server.stop() == 0


@pytest.mark.timeout(30)
def test_parent_keeps_no_copy_of_the_connection(start_server: StartServer) -> None:
    # The handler closes its descriptor without shutdown() and stays alive: the
    # FIN is sent only if no other process (the parent) still holds a copy.
    server = start_server(config("tests.helpers.services:pid_then_linger", graceful_timeout=0.5))
    with connect(server.tcp_address, timeout=5) as sock:
        port = _port(sock)
        pid = int(recv_until(sock, b"\n"))
        sock.sendall(b"linger\n")
        assert recv_to_eof(sock, timeout=5) == b"bye"
        assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # still in its handler
        assert [p.pid for p in server.children()] == [pid]
    assert server.stop() == 0  # graceful_timeout ends the lingering child
    assert re.search(rf"child {pid} for 127\.0\.0\.1:{port} killed by SIGTERM", server.log)
    _assert_all_exited([pid])


@pytest.mark.timeout(30)
def test_each_child_holds_only_its_own_connection(start_server: StartServer) -> None:
    server = start_server(config("tests.helpers.services:PidEcho"))
    socks = [connect(server.tcp_address) for _ in range(3)]
    try:
        for sock in socks:
            pid = int(recv_until(sock, b"\n"))
            # No listener, no sibling's connection: only this client.
            assert _tcp_peers(pid) == [sock.getsockname()]
    finally:
        for sock in socks:
            sock.close()
    children_gone(server)
    assert server.stop() == 0


def test_children_started_from_the_stop_queue_hold_only_their_own_connection(
    start_server: StartServer,
) -> None:
    server = start_server(config("tests.helpers.services:pid_then_linger", max_children=2))
    host, port = server.tcp_address
    busy = [connect((host, port)) for _ in range(2)]
    queued: list[socket.socket] = []
    try:
        for sock in busy:
            assert int(recv_until(sock, b"\n")) > 0  # both children taken
        queued = [connect((host, port)) for _ in range(2)]
        wait_until(lambda: accept_queue_length(port) == 2, 10, "2 connections in the backlog")
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"stopping: no longer accepting; waiting up to 30\.0s for 4 children")
        # One slot frees: the first queued connection gets a child, the second waits.
        busy[0].sendall(b"exit\n")
        assert recv_to_eof(busy[0]) == b""
        first_pid = int(recv_until(queued[0], b"\n"))
        assert _tcp_peers(first_pid) == [queued[0].getsockname()]
        # The second gets a child too; it closes without shutdown() and lingers.
        busy[1].sendall(b"exit\n")
        assert recv_to_eof(busy[1]) == b""
        int(recv_until(queued[1], b"\n"))
        queued[1].sendall(b"linger\n")
        assert recv_to_eof(queued[1], timeout=5) == b"bye"
        queued[0].sendall(b"exit\n")
        assert recv_to_eof(queued[0]) == b""
    finally:
        for sock in busy + queued:
            sock.close()
    server.signal(signal.SIGTERM)  # the second: stop now, killing the lingering child
    assert server.wait(10) == 0
