"""UDP listeners end to end: every datagram gets its own child and its reply
goes back to the sender, exactly; at max_children datagrams wait in the
socket's queue, or are dropped with ``when_full = "refuse"``.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.clients import udp_queued_bytes
from tests.helpers.processes import children_gone
from tests.helpers.servers import StartServer, wait_until
from tests.helpers.transports import (
    DATAGRAM_ECHO,
    ECHO,
    SERVICES,
    hold_one_datagram,
    listen,
    pid_reply,
    server_table,
    stop_clean,
    stop_cleanly,
    udp_at,
    udp_client,
)


def udp_config(handler: str, **settings: Any) -> str:
    return listen(udp="127.0.0.1:0", handler=handler, **settings)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [1, 1000, 8192])
def test_udp_echo_is_exact_and_goes_back_to_the_sender(
    start_server: StartServer, size: int
) -> None:
    # No [server] table at all: every listener names its handler.
    server = start_server(udp_config(DATAGRAM_ECHO))
    [address] = server.listening
    assert re.fullmatch(r"udp:127\.0\.0\.1:\d+", address), address
    target = udp_at(server, 0)
    payload = os.urandom(size)
    with udp_client() as client:
        client.sendto(payload, target)
        reply, source = client.recvfrom(65536)
    assert reply == payload
    assert source == target  # from the listening socket, to the sender's address
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_udp_largest_datagram_is_echoed_whole(start_server: StartServer) -> None:
    # 65507 bytes: the most an IPv4 UDP datagram carries.  A server that reads
    # with socketserver's 8192-byte max_packet_size would cut it short.
    server = start_server(udp_config(DATAGRAM_ECHO))
    payload = os.urandom(65507)
    with udp_client() as client:
        client.sendto(payload, udp_at(server, 0))
        reply, _ = client.recvfrom(65536)
    assert len(reply) == len(payload)
    assert reply == payload
    stop_cleanly(server)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "handler", [f"{SERVICES}:datagram_pid_echo", f"{SERVICES}:DatagramPidEcho"]
)
def test_every_datagram_gets_its_own_child_and_its_own_reply(
    start_server: StartServer, handler: str
) -> None:
    server = start_server(udp_config(handler))
    target = udp_at(server, 0)
    per_client = 6
    with udp_client() as first, udp_client() as second:
        clients = [first, second]
        sent: dict[int, set[bytes]] = {0: set(), 1: set()}
        for i in range(per_client):
            for n, client in enumerate(clients):
                payload = f"client {n} datagram {i} ".encode() + os.urandom(32)
                sent[n].add(payload)
                client.sendto(payload, target)
        pids: list[int] = []
        for n, client in enumerate(clients):
            got: set[bytes] = set()
            for _ in range(per_client):
                reply, source = client.recvfrom(65536)
                assert source == target
                pid, _, data = reply.partition(b" ")
                pids.append(int(pid))
                got.add(data)
            assert got == sent[n], f"client {n} got replies meant for someone else"
    assert len(set(pids)) == len(pids) == 2 * per_client, f"children reused: {pids}"
    assert server.pid not in pids
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_udp_at_max_children_waits_in_the_socket_queue(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, target, client, writer = hold_one_datagram(start_server, tmp_path, "wait")
    with client:
        client.sendto(b"second", target)
        # Not read: the parent stopped reading at the limit, so the datagram
        # waits in the kernel's queue of the socket (not lost, not dropped).
        wait_until(lambda: udp_queued_bytes(target[1]) > 0, 10, "the datagram to be queued")
        assert len(server.children()) == 1
        assert "dropped a datagram" not in server.log
        os.close(writer)
        first_pid, first = pid_reply(client)
        second_pid, second = pid_reply(client)
    assert first.startswith(b"hold ") and second == b"second"
    assert first_pid != second_pid
    assert udp_queued_bytes(target[1]) == 0
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_udp_at_max_children_with_refuse_drops_the_datagram(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, target, client, writer = hold_one_datagram(start_server, tmp_path, "refuse")
    with client:
        port = client.getsockname()[1]
        client.sendto(b"second", target)
        server.wait_for_log(rf"dropped a datagram from 127\.0\.0\.1:{port}: full$")
        os.close(writer)
        _, first = pid_reply(client)
        assert first.startswith(b"hold ")
        children_gone(server)
        client.sendto(b"third", target)  # a slot is free again: served
        assert pid_reply(client)[1] == b"third"
        client.setblocking(False)
        with pytest.raises(BlockingIOError):  # and nothing was ever sent for "second"
            client.recvfrom(65536)
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_udp_is_served_when_idle_spares_fill_max_children(start_server: StartServer) -> None:
    server = start_server(
        server_table(max_children=2, spare_children=2, when_full="wait")
        + listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO)
        + listen(tcp="127.0.0.1:0", handler=ECHO)
    )
    wait_until(lambda: len(server.children()) == 2, 10, "the spares")
    target = udp_at(server, 0)
    with udp_client() as client:
        port = client.getsockname()[1]
        client.sendto(b"anyone?", target)
        client.settimeout(0.05)
        deadline = time.monotonic() + 10
        reply = b""
        while not reply and time.monotonic() < deadline:
            try:
                reply = client.recv(65536)
            except TimeoutError:
                dropped = f"dropped a datagram from 127.0.0.1:{port}: full"
                assert dropped not in server.log, server.log
    assert reply == b"anyone?"
    stop_clean(server, {"spare_children": 2})
