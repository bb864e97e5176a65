"""forkserver/parent/children.py and its neighbours: reaping by pidfd, the pool's
refill, UDP handed to spares.

The default parent maps no library it does not use (with the access log,
resource from the start), and has its open-files limit raised for the
pidfds; an idle parent sleeps after a burst; a child killed while another
exits is reaped with it; past 256 children the pidfds move above 1024 and
connections keep numbers select() accepts; children adopted across a
reload are reaped; a threaded Server's children keep their
statuses, and so do the processes a program embedding a Server starts
itself; an empty datagram to a spare leaves the UDP listener alone.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from forkserver.testing.process import READY
from tests.helpers.clients import connect, echo_roundtrip, recv_to_eof, recv_until
from tests.helpers.processes import child_pids, children_gone, live_children, zombie_children
from tests.helpers.servers import ROOT, StartServer, config, wait_until
from tests.helpers.transports import listen, server_table, udp_at, udp_client

DATAGRAM_ECHO = "forkserver.examples.echo:DatagramEchoHandler"


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@pytest.mark.timeout(30)
def test_idle_parent_uses_no_cpu_after_a_burst_with_spares(start_server: StartServer) -> None:
    server = start_server(config(spare_children=4))
    address = server.tcp_address
    for i in range(300):
        payload = b"%d" % i
        assert echo_roundtrip(address, payload, timeout=10) == payload
    time.sleep(3)  # idle: any refill or walk timer has long fired by now
    before = _cpu_seconds(server.pid)
    time.sleep(2)
    after = _cpu_seconds(server.pid)
    assert after - before < 0.02, f"an idle parent used {after - before:.3f}s of CPU in 2s"
    assert not zombie_children(server)
    assert len(live_children(server)) == 4  # the spares, refilled


def _pidfds(pid: int) -> list[int]:
    fds = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "anon_inode:[pidfd]":
                fds.append(int(name))
        except OSError:
            continue  # closed meanwhile
    return fds


@pytest.mark.timeout(60)
def test_the_default_parent_maps_no_library_for_what_it_does_not_use(
    start_server: StartServer,
) -> None:
    """Every mapping of the parent is copied at each fork (five per shared
    library: ~10 us per connection, bench/mappings.py), so the default path
    loads no extension module it does not use: no heapq (loop.py keeps its
    own heap), no struct (the spares' wire format), no fcntl (until a pidfd
    must move), no resource (the limit is raised before the lean re-exec)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1024 + 1024 + 64  # pidfds.FLOOR, the default max_children, pidfds.RESERVE
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip("the hard RLIMIT_NOFILE leaves no room above 1024 for the pidfds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # a common default
    try:
        server = start_server(config())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert echo_roundtrip(server.tcp_address, b"mapped\n") == b"mapped\n"
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    for library in ("_heapq", "_struct", "fcntl", "resource"):
        assert f"/{library}.cpython" not in maps, f"the parent loaded {library}"
    limits = Path(f"/proc/{server.pid}/limits").read_text()
    files = re.search(r"^Max open files\s+(\d+)", limits, re.M)
    assert files is not None and int(files.group(1)) >= need, limits


@pytest.mark.timeout(60)
def test_with_the_access_log_the_parent_has_resource_before_the_first_reap(
    start_server: StartServer,
) -> None:
    """The reap is then os.wait4, which imports resource at its first call,
    after reaping: out of descriptors by then, the import would fail and
    the child's status be lost.  So the parent imports it as it starts."""
    server = start_server(config(access_log=True))
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    assert "/resource.cpython" in maps or "resource" in sys.builtin_module_names


@pytest.mark.timeout(60)
def test_past_256_children_pidfds_move_up_and_connections_keep_low_numbers(
    start_server: StartServer,
) -> None:
    """The first pidfds keep low numbers (no fcntl per connection); past 256,
    they go to 1024 and up, so no connection gets a number select() refuses."""
    held_open = 300
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < 1024 + 400 + 64 + held_open:
        pytest.skip("the hard RLIMIT_NOFILE leaves no room above 1024 for the pidfds")
    server = start_server(config("tests.helpers.services:fd_then_wait", max_children=400))
    clients = []
    try:
        numbers = []
        for _ in range(held_open):
            sock = socket.create_connection(server.tcp_address, timeout=20)
            clients.append(sock)
            numbers.append(int(recv_until(sock, b"\n")))
        assert max(numbers) < 1024, f"a connection got descriptor {max(numbers)}"
        pidfds = _pidfds(server.pid)
        assert len(pidfds) == held_open
        assert sum(fd < 256 for fd in pidfds) > 200  # left where pidfd_open() put them
        assert sum(fd >= 1024 for fd in pidfds) > 0  # moved up past 256
        assert not any(256 <= fd < 1024 for fd in pidfds)
    finally:
        for sock in clients:
            sock.close()
    children_gone(server)
    assert not _pidfds(server.pid)


@pytest.mark.timeout(30)
def test_a_killed_child_exiting_with_a_noted_one_is_reaped(start_server: StartServer) -> None:
    server = start_server(config())
    for _ in range(5):
        normal, killed = connect(server.tcp_address), connect(server.tcp_address)
        for sock in (normal, killed):  # each child is up and serving
            sock.sendall(b"hi")
            assert sock.recv(2) == b"hi"
        wait_until(lambda: len(child_pids(server.pid)) == 2, 10, "two children")
        victim, other = sorted(child_pids(server.pid))
        # One child dies by SIGKILL while the other leaves the moment it reads
        # EOF: both exits at once.  Which serves *normal* is not known (pids
        # are not in connection order), so the kill comes first, while both
        # surely live; either way *normal* then reads EOF.
        os.kill(victim, signal.SIGKILL)
        normal.shutdown(socket.SHUT_WR)
        assert recv_to_eof(normal, 10) == b""  # its child left normally
        normal.close()
        killed.close()
        wait_until(lambda: not child_pids(server.pid), 3, "both children reaped")
        assert not zombie_children(server)
        assert other not in child_pids(server.pid)


@pytest.mark.timeout(30)
def test_child_adopted_by_a_reload_is_reaped_when_its_connection_ends(
    start_server: StartServer,
) -> None:
    server = start_server(config())
    with connect(server.tcp_address) as sock:
        sock.sendall(b"before")
        assert sock.recv(6) == b"before"
        [child] = child_pids(server.pid)
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for_log(READY, 15, start=mark)  # the new image is serving
        sock.sendall(b"after")
        assert sock.recv(5) == b"after"
        # Its exit note goes to the old image's pipe, which nobody reads:
        # only a walk of all children can find it.
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock, 10) == b""
    wait_until(lambda: child not in child_pids(server.pid), 5, "the adopted child reaped")
    assert not zombie_children(server)
    assert echo_roundtrip(server.tcp_address, b"still serving") == b"still serving"


@pytest.mark.timeout(30)
def test_an_empty_datagram_to_a_spare_keeps_the_udp_listener(start_server: StartServer) -> None:
    server = start_server(
        server_table(spare_children=2) + listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO)
    )
    target = udp_at(server, 0)
    with udp_client() as client:
        client.settimeout(5)
        client.sendto(b"", target)
        assert client.recvfrom(100)[0] == b""  # a spare answered it
        client.sendto(b"next", target)
        assert client.recvfrom(100)[0] == b"next"


_TWO_SERVERS = """
    import socket, sys, threading, time
    from forkserver import Server

    def quits(conn, addr):
        conn.recv(1)
        sys.exit(3)

    main = Server(("127.0.0.1", 0), quits)  # main thread: signals handled
    other = Server(("127.0.0.1", 0), quits)  # a thread of its own: no signals
    N = 40

    def ask(server):
        with socket.create_connection(server.server_address[:2], timeout=10) as s:
            s.sendall(b"x")
            while s.recv(10):
                pass

    def drive():
        try:
            ask(main)  # main is serving
            for _ in range(N):
                ask(other)
            deadline = time.monotonic() + 10
            while len(other.children) and time.monotonic() < deadline:
                time.sleep(0.02)
            print("RESULT", other.children.exited_error, main.children.exited_error, flush=True)
        finally:
            other.shutdown()
            main.shutdown()

    thread = threading.Thread(target=other.serve_forever)
    thread.start()
    threading.Thread(target=drive).start()
    main.serve_forever()
    thread.join()
"""


@pytest.mark.timeout(30)
def test_a_threaded_server_keeps_its_childrens_exit_statuses(tmp_path: Path) -> None:
    script = tmp_path / "two_servers.py"
    script.write_text(textwrap.dedent(_TWO_SERVERS))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=25)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    [line] = [line for line in out.splitlines() if line.startswith("RESULT")]
    other_errors, main_errors = map(int, line.split()[1:])
    assert (other_errors, main_errors) == (40, 1)


_EMBEDDING_PROGRAM = """
    import os, socket, subprocess, sys, threading
    from forkserver import Server

    def echo(conn, addr):
        while data := conn.recv(4096):
            conn.sendall(data)

    server = Server(("127.0.0.1", 0), echo)  # serve_forever() in the main thread
    ROUNDS = 20
    statuses = []

    def load():
        for _ in range(200):  # children forked and reaped all the while
            with socket.create_connection(server.server_address[:2], timeout=10) as s:
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                assert s.recv(10) == b"ping"

    def own_children():
        try:
            loader = threading.Thread(target=load)
            loader.start()
            for i in range(ROUNDS):
                code = i % 7 + 1  # never 0: a status lost to someone else's waitpid reads 0
                done = subprocess.run([sys.executable, "-c", f"raise SystemExit({code})"])
                statuses.append(("run", code, done.returncode))
                pid = os.fork()
                if pid == 0:
                    os._exit(code + 10)
                _, status = os.waitpid(pid, 0)
                statuses.append(("fork", code + 10, os.waitstatus_to_exitcode(status)))
            loader.join()
            print("RESULT", repr(statuses), len(server.children), flush=True)
        finally:
            server.shutdown()

    threading.Thread(target=own_children).start()
    server.serve_forever()
"""


@pytest.mark.timeout(60)
def test_a_program_embedding_a_server_keeps_its_own_childrens_statuses(tmp_path: Path) -> None:
    """CPython fixed socketserver for this in 2007 (issue 1540386): a server
    must reap only its own children, or subprocess.run() and os.waitpid() in
    the program around it lose their statuses (or fail with ECHILD)."""
    script = tmp_path / "embedding.py"
    script.write_text(textwrap.dedent(_EMBEDDING_PROGRAM))
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=50)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 0, err
    [line] = [line for line in out.splitlines() if line.startswith("RESULT")]
    statuses = eval(line.split(" ", 1)[1].rsplit(" ", 1)[0])  # the repr printed above
    assert len(statuses) == 40
    assert all(expected == got for _, expected, got in statuses), statuses
