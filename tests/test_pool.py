"""The pool of pre-forked one-shot children (spare_children), end to end."""

from __future__ import annotations

import os
import signal
import socket
import threading

import psutil
import pytest

from forkserver import Server
from tests.conftest import (
    StartServer,
    accept_queue_length,
    config,
    connect,
    echo_roundtrip,
    group_members,
    recv_to_eof,
    recv_until,
    wait_until,
    zombie_children,
)
from tests.services import PidEcho


def _live_children(server) -> list[psutil.Process]:
    live = []
    for p in server.children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                live.append(p)
        except psutil.NoSuchProcess:
            pass  # exited between the listing and the look
    return live


def test_spares_wait_then_each_serves_exactly_one_connection(start_server: StartServer) -> None:
    server = start_server(config("tests.services:PidEcho", spare_children=3))
    wait_until(lambda: len(_live_children(server)) == 3, what="3 idle spares")
    spares = {p.pid for p in _live_children(server)}
    pids = []
    for i in range(20):
        with connect(server.tcp_address) as sock:
            pid = int(recv_until(sock, b"\n").decode())
            sock.sendall(f"line {i}\n".encode())
            assert recv_until(sock, b"\n") == f"line {i}\n".encode()
            pids.append(pid)
    assert len(set(pids)) == 20, "a spare served more than one connection"
    # Any idle spare may take a handed-off connection, even the replacement
    # forked for it, if it reaches recvmsg() first; but spares forked before
    # any connection arrived do serve.
    assert spares & set(pids), "no pre-forked spare served a connection"

    # The pool refills: three idle spares again, none of them a used one.
    def refilled() -> bool:
        live = {p.pid for p in _live_children(server)}
        return len(live) == 3 and not live & set(pids)

    wait_until(refilled, what="three fresh spares, none of them a used one")
    assert server.stop() == 0
    assert "exit status" not in server.log  # every child exited 0


def test_concurrent_clients_with_a_pool_are_all_served(start_server: StartServer) -> None:
    server = start_server(config(spare_children=4))
    payloads = [os.urandom(1000 + i) for i in range(64)]
    results: list[bytes | None] = [None] * len(payloads)

    def client(i: int) -> None:
        results[i] = echo_roundtrip(server.tcp_address, payloads[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == payloads
    assert server.stop() == 0
    assert not zombie_children(server)


def test_pool_respects_max_children_and_waiting_clients_are_served(
    start_server: StartServer,
) -> None:
    server = start_server(config("tests.services:PidEcho", spare_children=2, max_children=3))
    wait_until(lambda: len(_live_children(server)) == 2, what="2 spares")
    held = []
    for _ in range(3):  # three busy children: the limit
        sock = connect(server.tcp_address)
        recv_until(sock, b"\n")
        held.append(sock)
    waiting = [connect(server.tcp_address) for _ in range(2)]
    port = server.tcp_address[1]
    wait_until(lambda: accept_queue_length(port) == 2, what="two clients in the backlog")
    assert len(_live_children(server)) == 3  # no spare beyond max_children
    for sock in held:
        sock.close()
    for sock in waiting:
        recv_until(sock, b"\n")
        sock.sendall(b"late\n")
        assert recv_until(sock, b"\n").endswith(b"late\n")
        sock.close()
    assert server.stop() == 0


def test_sigterm_retires_spares_finishes_in_flight_and_serves_the_backlog(
    start_server: StartServer,
) -> None:
    server = start_server(config("tests.services:PidEcho", spare_children=1, max_children=1))
    busy = connect(server.tcp_address)
    recv_until(busy, b"\n")
    queued = connect(server.tcp_address)  # waits in the backlog: the limit is reached
    wait_until(lambda: accept_queue_length(server.tcp_address[1]) == 1, what="queued client")
    server.signal(signal.SIGTERM)
    server.wait_for_log("stopping")
    busy.sendall(b"in flight\n")
    assert recv_until(busy, b"\n") == b"in flight\n"
    busy.shutdown(socket.SHUT_WR)
    assert recv_to_eof(busy) == b""
    busy.close()
    recv_until(queued, b"\n")  # served after all, by a child forked from the drain
    queued.sendall(b"queued\n")
    assert recv_until(queued, b"\n").endswith(b"queued\n")
    queued.close()
    assert server.wait() == 0
    with pytest.raises(OSError):
        connect(server.tcp_address, timeout=2).close()


def test_killed_idle_spare_is_replaced_and_logged_as_a_spare(start_server: StartServer) -> None:
    server = start_server(config(spare_children=2))
    wait_until(lambda: len(_live_children(server)) == 2, what="2 spares")
    victim = _live_children(server)[0]
    victim.kill()
    server.wait_for_log(rf"child {victim.pid} for \(a spare, no connection reported\) killed by")
    wait_until(
        lambda: len(_live_children(server)) == 2 and victim.pid not in server.children(),
        what="replacement spare",
    )
    assert echo_roundtrip(server.tcp_address, b"still serving") == b"still serving"
    assert server.stop() == 0


def test_abnormal_exit_in_pool_mode_is_logged_with_the_peer(start_server: StartServer) -> None:
    server = start_server(config("tests.services:exit_with_status", spare_children=2))
    with connect(server.tcp_address) as sock:
        local_port = sock.getsockname()[1]
        sock.sendall(b"3\n")
        assert recv_to_eof(sock) == b""
    server.wait_for_log(rf"child \d+ for 127\.0\.0\.1:{local_port} exit status 3")
    assert server.stop() == 0


def test_spares_exit_when_the_parent_is_killed_and_the_port_is_free(
    start_server: StartServer,
) -> None:
    server = start_server(config("tests.services:PidEcho", spare_children=3))
    wait_until(lambda: len(_live_children(server)) == 3, what="3 spares")
    busy = connect(server.tcp_address)
    recv_until(busy, b"\n")
    address = server.tcp_address
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    # Idle spares see EOF on the retire pipe and exit; the busy child lives on.
    wait_until(lambda: len(group_members(server.pid)) == 1, what="idle spares exiting")
    # No one but the busy child holds the listener, and it closed its copy
    # after accept: the port can be bound again at once.
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(address)
        again.listen()
    busy.sendall(b"orphaned but served\n")
    assert recv_until(busy, b"\n").endswith(b"orphaned but served\n")
    busy.close()
    wait_until(lambda: not group_members(server.pid), what="the busy child to finish")


def test_in_process_pool_from_a_thread_shuts_down_and_serves_again() -> None:
    with Server(("127.0.0.1", 0), PidEcho, spare_children=2, graceful_timeout=5) as srv:
        for _round in range(2):
            thread = threading.Thread(target=srv.serve_forever)
            thread.start()
            try:
                with connect(srv.server_address) as sock:
                    recv_until(sock, b"\n")
                    sock.sendall(b"round\n")
                    assert recv_until(sock, b"\n").endswith(b"round\n")
            finally:
                srv.shutdown()
                thread.join(10)
            assert not thread.is_alive()
            assert not psutil.Process().children(), "spares outlived shutdown()"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spares", [0, 2])
def test_the_connection_is_not_inherited_by_a_handlers_subprocesses(
    start_server: StartServer, spares: int
) -> None:
    server = start_server(config("tests.services:report_inheritable", spare_children=spares))
    with connect(server.tcp_address) as sock:
        assert recv_to_eof(sock) == b"inheritable=False\n"
    assert server.stop() == 0
