"""Spares that accept their connection themselves (pool.py, "direct" listeners).

With spare_children and no admission rule, idle spares wait on the listener
and the kernel gives each connection to one of them: the parent is off the
connection's path.  Freezing the parent with SIGSTOP shows it: idle spares
still serve.  Where the parent must look at a connection first (admission
rules, the PROXY protocol), it still accepts and hands over.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers.clients import connect, needs_ipv6, recv_to_eof, recv_until
from tests.helpers.metrics import metrics_url, scrape
from tests.helpers.processes import frozen, reaped, zombie_children
from tests.helpers.proxy import v1
from tests.helpers.servers import ABNORMAL_EXIT, ServerProcess, StartServer, config, wait_until
from tests.helpers.spares import (
    PID_ADDR_ECHO,
    POOL_SERVICES,
    alive,
    echo_line,
    fresh_spares,
    idle_spares,
    read_greeting,
)
from tests.helpers.tls import Pki, tls_connect, tls_line
from tests.helpers.transports import (
    DATAGRAM_ECHO,
    PROXY_REPORT,
    TLS_LINE,
    listen,
    server_table,
    tcp_at,
    udp_at,
    unix_at,
)

REPORT_FDS = "tests.helpers.services:report_fds"


def _report(address: tuple[str, int] | str) -> dict[str, Any]:
    with connect(address) as sock:
        reply: dict[str, Any] = json.loads(recv_until(sock, b"\n"))
        return reply


def _nothing_of_the_parents(fds: dict[str, str]) -> bool:
    """Whether a child holds nothing of the parent's: no listener, no handoff
    socket, no busy pipe; at most its siblings' pidfds, which are close-on-exec
    and grant nothing a pid does not (parent/children.py)."""
    return all(target == "anon_inode:[pidfd]" for target in fds.values())


@pytest.mark.timeout(60)
def test_idle_spares_serve_while_the_parent_is_stopped(start_server: StartServer) -> None:
    server = start_server(config(REPORT_FDS, spare_children=3))
    spares = idle_spares(server, 3)
    with frozen(server):
        replies = [_report(server.tcp_address) for _ in range(3)]
    # Each connection went to its own pre-forked spare, which let go of the
    # listener (and everything else of the parent's) before the handler ran.
    assert {r["pid"] for r in replies} == spares
    for reply in replies:
        assert _nothing_of_the_parents(reply["fds"]), reply
        assert reply["addr"][0] == "127.0.0.1"
    # Thawed, the parent reads the spares' busy records, reaps them, refills.
    wait_until(lambda: all(reaped(pid) for pid in spares), what="the used spares reaped")
    assert not idle_spares(server, 3) & spares
    assert _nothing_of_the_parents(_report(server.tcp_address)["fds"])
    assert server.stop() == 0
    assert "exit status" not in server.log  # every child exited 0
    assert not zombie_children(server)


@pytest.mark.timeout(60)
def test_a_spare_accepts_from_a_unix_listener_too(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = str(tmp_path / "direct.sock")
    body = server_table(handler=REPORT_FDS, spare_children=2) + listen(unix=path)
    server = start_server(body)
    spares = idle_spares(server, 2)
    with frozen(server):
        reply = _report(unix_at(server, 0))
    assert reply["pid"] in spares
    assert _nothing_of_the_parents(reply["fds"]), reply
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_direct_accepts_are_counted_and_their_child_listed_with_its_client(
    start_server: StartServer,
) -> None:
    server = start_server(
        config("tests.helpers.services:PidEcho", spare_children=2, metrics="127.0.0.1:0")
    )
    base = metrics_url(server)
    idle_spares(server, 2)
    for _ in range(3):
        with connect(server.tcp_address) as sock:
            recv_until(sock, b"\n")
    held = connect(server.tcp_address)
    pid = int(recv_until(held, b"\n"))
    wait_until(lambda: scrape(base)[("forkserver_children", (("state", "busy"),))] == 1)
    m = scrape(base)
    assert m[("forkserver_connections_accepted_total", ())] == 4
    with urllib_get(f"{base}/children") as listed:
        children = {c["pid"]: c for c in listed["children"]}
    assert children[pid]["peer"] == f"127.0.0.1:{held.getsockname()[1]}"
    held.close()
    assert server.stop() == 0


@contextmanager
def urllib_get(url: str) -> Iterator[dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as reply:
        yield json.loads(reply.read())


@pytest.mark.timeout(60)
def test_with_an_admission_rule_the_parent_still_accepts(start_server: StartServer) -> None:
    server = start_server(
        config("tests.helpers.services:PidEcho", spare_children=2, allow=["127.0.0.0/8"])
    )
    idle_spares(server, 2)
    with frozen(server):
        sock = connect(server.tcp_address)
        sock.settimeout(0.5)
        # Nobody but the (stopped) parent may accept: the client waits.
        with pytest.raises(TimeoutError):
            sock.recv(100)
    sock.settimeout(10)
    recv_until(sock, b"\n")
    sock.sendall(b"admitted\n")
    assert recv_until(sock, b"\n") == b"admitted\n"
    sock.close()
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_proxy_listener_is_handed_over_beside_a_direct_one(start_server: StartServer) -> None:
    body = (
        server_table(handler=REPORT_FDS, spare_children=2)
        + listen(tcp="127.0.0.1:0")
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True)
    )
    server = start_server(body)
    spares = idle_spares(server, 2)
    with frozen(server):
        assert _report(tcp_at(server, 0))["pid"] in spares
        proxied = connect(tcp_at(server, 1))
        proxied.sendall(v1("203.0.113.9", 4711) + b"after the header")
        proxied.shutdown(socket.SHUT_WR)
        proxied.settimeout(0.5)
        with pytest.raises(TimeoutError):  # its header is the parent's to read
            proxied.recv(100)
    proxied.settimeout(10)
    assert recv_to_eof(proxied) == b"203.0.113.9 4711\nafter the header"
    proxied.close()
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_at_max_children_the_parent_refuses_when_no_spare_is_idle(
    start_server: StartServer,
) -> None:
    server = start_server(
        config(
            "tests.helpers.services:PidEcho",
            spare_children=1,
            max_children=1,
            when_full="refuse",
            busy_message="busy\n",
        )
    )
    idle_spares(server, 1)
    held = connect(server.tcp_address)
    recv_until(held, b"\n")  # the only child there may be
    with connect(server.tcp_address) as refused:
        assert recv_to_eof(refused) == b"busy\n"
    held.close()
    # The slot is free again: a new spare takes the next client.
    idle_spares(server, 1)
    with connect(server.tcp_address) as sock:
        recv_until(sock, b"\n")
    assert server.stop() == 0
    assert "refused 127.0.0.1" in server.log


@pytest.mark.timeout(60)
def test_stop_with_idle_spares_on_a_listener_loses_nothing(start_server: StartServer) -> None:
    server = start_server(config(spare_children=4))
    idle_spares(server, 4)
    payloads = [os.urandom(100 + i) for i in range(8)]
    socks = []
    for payload in payloads:
        sock = connect(server.tcp_address)
        sock.sendall(payload)
        socks.append(sock)
    server.signal(signal.SIGTERM)
    for sock, payload in zip(socks, payloads, strict=True):
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == payload
        sock.close()
    assert server.wait() == 0
    assert not zombie_children(server)


TAGGED_PID_ECHO = f"{POOL_SERVICES}:tagged_pid_echo"


def _accepted(base: str) -> float:
    return scrape(base).get(("forkserver_connections_accepted_total", ()), -1.0)


def _children_listing(base: str) -> dict[int, dict[str, Any]]:
    with urllib.request.urlopen(f"{base}/children", timeout=10) as reply:
        listed = json.loads(reply.read())
    return {c["pid"]: c for c in listed["children"]}


def _proxy_beside_direct(start_server: StartServer) -> tuple[ServerProcess, str, int]:
    body = (
        server_table(handler=PID_ADDR_ECHO, spare_children=1, max_children=1, metrics="127.0.0.1:0")
        + listen(tcp="127.0.0.1:0")
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True)
    )
    server = start_server(body)
    (spare,) = idle_spares(server, 1)
    return server, metrics_url(server), spare


@pytest.mark.timeout(40)
@pytest.mark.parametrize(
    "signum",
    [signal.SIGTERM, signal.SIGHUP, signal.SIGUSR2],
    ids=["stop", "reload", "upgrade"],
)
def test_handed_over_connection_is_served_when_its_spare_took_a_direct_one(
    start_server: StartServer, signum: int
) -> None:
    server, base, spare = _proxy_beside_direct(start_server)
    with frozen(server):
        # A PROXY client first (the parent's to accept once thawed, so epoll
        # reports it before the busy record), then a client of the direct
        # listener, which the idle spare takes at once.
        proxied = connect(tcp_at(server, 1))
        proxied.sendall(v1("203.0.113.9", 4711) + b"payload")
        proxied.shutdown(socket.SHUT_WR)
        direct = connect(tcp_at(server, 0))
        assert read_greeting(direct)[0] == spare
    wait_until(lambda: _accepted(base) == 2, what="the parent to see both connections")
    mark = len(server.lines)
    server.signal(signum)
    new_parent = 0
    if signum == signal.SIGHUP:
        server.wait_for_log("forkserver ready", 30, start=mark)
    elif signum == signal.SIGUSR2:
        line = server.wait_for_log(r"new parent \d+ is ready: handing over", 30, start=mark)
        new_parent = int(line.split("new parent ")[1].split()[0])
    else:
        server.wait_for_log("stopping", start=mark)
    try:
        assert echo_line(direct, b"in flight\n") == b"in flight\n"
        direct.close()
        proxied.settimeout(20)
        if signum == signal.SIGHUP:
            # A reload closes what waits at max_children (it cannot cross
            # exec), with a warning: the documented limit, not a silent loss.
            with pytest.raises(ConnectionResetError):
                assert recv_to_eof(proxied) == b""
            server.wait_for_log(r"reload: closed a connection from 203\.0\.113\.9:4711 queued")
        else:
            # Served once the only child there may be is done: as at
            # max_children without the pool, or with the direct client first.
            assert recv_to_eof(proxied) == b"203.0.113.9 4711\npayload"
    finally:
        direct.close()
        proxied.close()
        if new_parent:
            os.kill(new_parent, signal.SIGTERM)
            wait_until(lambda: not psutil.pid_exists(new_parent), 30, "the new parent to stop")
    # After the upgrade the old parent exits by itself, its children done;
    # after SIGTERM it is already stopping (a second SIGTERM would race its exit).
    exits_by_itself = new_parent or signum == signal.SIGTERM
    assert (server.wait(30) if exits_by_itself else server.stop()) == 0


@pytest.mark.timeout(40)
def test_handed_over_connection_after_a_known_direct_one_is_served_at_stop(
    start_server: StartServer,
) -> None:
    # The same two clients in the other order: the parent reads the busy record
    # first, queues the PROXY client at max_children, and serves it at the stop.
    server, base, spare = _proxy_beside_direct(start_server)
    with frozen(server):
        direct = connect(tcp_at(server, 0))
        assert read_greeting(direct)[0] == spare
        proxied = connect(tcp_at(server, 1))
        proxied.sendall(v1("203.0.113.9", 4711) + b"payload")
        proxied.shutdown(socket.SHUT_WR)
    wait_until(lambda: _accepted(base) == 2, what="the parent to see both connections")
    server.signal(signal.SIGTERM)
    server.wait_for_log("stopping")
    assert echo_line(direct, b"in flight\n") == b"in flight\n"
    direct.close()
    proxied.settimeout(20)
    assert recv_to_eof(proxied) == b"203.0.113.9 4711\npayload"
    proxied.close()
    assert server.wait(30) == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log


@pytest.mark.timeout(40)
def test_handed_over_datagram_is_answered_when_its_spare_took_a_direct_one(
    start_server: StartServer,
) -> None:
    body = (
        server_table(handler=PID_ADDR_ECHO, spare_children=1, max_children=1, metrics="127.0.0.1:0")
        + listen(tcp="127.0.0.1:0")
        + listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO)
    )
    server = start_server(body)
    base = metrics_url(server)
    (spare,) = idle_spares(server, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", 0))
        with frozen(server):
            client.sendto(b"datagram", udp_at(server, 1))
            direct = connect(tcp_at(server, 0))
            assert read_greeting(direct)[0] == spare
        wait_until(lambda: _accepted(base) == 2, what="the parent to see both")
        server.signal(signal.SIGTERM)
        server.wait_for_log("stopping")
        assert echo_line(direct, b"in flight\n") == b"in flight\n"
        direct.close()
        client.settimeout(3)  # answered once the only child there may be is done
        try:
            assert client.recvfrom(100) == (b"datagram", udp_at(server, 1))
        finally:
            assert server.wait(30) == 0


@pytest.mark.timeout(40)
def test_clients_beyond_the_idle_spares_wait_for_the_parent_and_are_served(
    start_server: StartServer,
) -> None:
    server = start_server(config(PID_ADDR_ECHO, spare_children=3))
    spares = idle_spares(server, 3)
    with frozen(server):
        socks = [connect(server.tcp_address) for _ in range(6)]
        first = [read_greeting(sock)[0] for sock in socks[:3]]
        assert set(first) == spares
    # Thawed: the parent forks replacements, which find the rest queued.
    later = [read_greeting(sock)[0] for sock in socks[3:]]
    assert len(set(later)) == 3 and not set(later) & spares
    for i, sock in enumerate(socks):
        assert echo_line(sock, b"%d\n" % i) == b"%d\n" % i
        sock.close()
    assert server.stop() == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log


@pytest.mark.timeout(40)
def test_a_direct_child_that_exits_before_the_loop_is_logged_with_its_peer(
    start_server: StartServer, tmp_path: Path
) -> None:
    # A full NOTIFY_SOCKET queue holds the parent in sd_notify("READY=1"),
    # after the spares are forked and "forkserver ready" is logged, before
    # its first reap and its loop.
    note = str(tmp_path / "notify")
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler,
    ):
        notify.bind(note)
        filler.setblocking(False)
        queued = 0
        for _ in range(100_000):
            try:
                filler.sendto(b"filler", note)
            except BlockingIOError:
                break
            queued += 1
        server = start_server(
            config("tests.helpers.services:exit_with_status", spare_children=1),
            env={"NOTIFY_SOCKET": note},
        )
        (spare,) = idle_spares(server, 1)
        with connect(server.tcp_address) as sock:
            port = sock.getsockname()[1]
            sock.sendall(b"3\n")
            assert recv_to_eof(sock) == b""
        wait_until(lambda: not alive(spare), what="the spare to exit")
        notify.settimeout(10)
        for _ in range(queued):
            assert notify.recv(100) == b"filler"
        assert notify.recv(100) == f"READY=1\nMAINPID={server.pid}".encode()
        line = server.wait_for_log(rf"child {spare} for .* exit status 3")
        assert f"child {spare} for 127.0.0.1:{port} exit status 3" in line
        assert server.stop() == 0


@pytest.mark.timeout(40)
def test_tls_listener_is_accepted_and_handshaken_by_a_spare(
    start_server: StartServer, pki: Pki
) -> None:
    body = server_table(spare_children=2) + listen(
        tcp="127.0.0.1:0", handler=TLS_LINE, **pki.listener()
    )
    server = start_server(body)
    spares = idle_spares(server, 2)
    replies, wanted = [], []
    with frozen(server):  # only the spares can accept, and do the handshake
        for i in range(2):
            with tls_connect(tcp_at(server, 0), pki.client_context()) as tls:
                port = tls.getsockname()[1]
                replies.append(tls_line(tls, b"line %d\n" % i))
                wanted.append(f"SSLSocket {tls.version()} - 127.0.0.1 {port}\nline {i}\n".encode())
    assert replies == wanted
    fresh_spares(server, 2, spares)  # both used, both replaced
    assert server.stop() == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log


@pytest.mark.timeout(40)
def test_a_plaintext_client_on_a_direct_tls_listener_fails_alone(
    start_server: StartServer, pki: Pki
) -> None:
    body = server_table(spare_children=1) + listen(
        tcp="127.0.0.1:0", handler=TLS_LINE, **pki.listener()
    )
    server = start_server(body)
    idle_spares(server, 1)
    with connect(tcp_at(server, 0)) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            data = recv_to_eof(plain)
        except ConnectionResetError:
            data = b""
        assert b"SSLSocket" not in data
    with tls_connect(tcp_at(server, 0), pki.client_context()) as tls:
        assert tls_line(tls, b"after\n").endswith(b"\nafter\n")
    assert server.stop() == 0


@pytest.mark.timeout(40)
def test_tcp_and_unix_listeners_both_direct_with_a_listener_handler(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = str(tmp_path / "own.sock")
    body = (
        server_table(handler=PID_ADDR_ECHO, spare_children=3)
        + listen(tcp="127.0.0.1:0")
        + listen(unix=path, handler=TAGGED_PID_ECHO)
        + listen(tcp="127.0.0.1:0", handler=TAGGED_PID_ECHO)
    )
    server = start_server(body)
    used: set[int] = set()
    for _ in range(2):  # the pre-forked spares, then their replacements
        spares = fresh_spares(server, 3, used)
        used |= spares
        with frozen(server):
            tcp = connect(tcp_at(server, 0))
            unix = connect(unix_at(server, 1))
            own = connect(tcp_at(server, 2))
            pid, addr = read_greeting(tcp)
            assert addr == repr(("127.0.0.1", tcp.getsockname()[1]))
            unix_greeting = recv_until(unix, b"\n").split()
            own_greeting = recv_until(own, b"\n").split()
            assert unix_greeting[0] == own_greeting[0] == b"own"
            pids = {pid, int(unix_greeting[1]), int(own_greeting[1])}
            assert pids == spares  # three connections, three spares, each its own
            for sock, line in ((tcp, b"t\n"), (unix, b"u\n"), (own, b"o\n")):
                assert echo_line(sock, line) == line
                sock.close()
    assert server.stop() == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log
    assert not os.path.exists(path)


@needs_ipv6
@pytest.mark.timeout(40)
def test_ipv6_client_address_and_listing_are_those_of_fork_on_accept(
    start_server: StartServer,
) -> None:
    seen = {}
    modes: list[tuple[str, dict[str, Any]]] = [
        ("fork", {}),
        ("direct", {"spare_children": 2}),
        ("handed", {"spare_children": 2, "allow": ["::1/128"]}),  # the parent accepts
    ]
    for mode, settings in modes:
        server = start_server(config(PID_ADDR_ECHO, host="::1", metrics="127.0.0.1:0", **settings))
        base = metrics_url(server)
        spares = idle_spares(server, int(settings.get("spare_children", 0)))
        with connect(server.tcp_address) as sock:
            pid, addr = read_greeting(sock)
            port = sock.getsockname()[1]
            assert (pid in spares) == (mode != "fork")
            wait_until(
                lambda: _children_listing(base).get(pid, {}).get("state") == "busy",  # noqa: B023
                what="the child listed busy",
            )
            listed = _children_listing(base)[pid]
            shown = (addr, listed["peer"], listed["state"])
            seen[mode] = tuple(text.replace(str(port), "PORT") for text in shown)
            assert listed["peer"] == f"[::1]:{port}"
        assert server.stop() == 0
    assert seen["direct"] == seen["fork"] == seen["handed"], seen
    assert seen["fork"] == ("('::1', PORT, 0, 0)", "[::1]:PORT", "busy")


@pytest.mark.timeout(40)
def test_children_listing_of_direct_unix_and_tcp_children(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    server = start_server(
        config(PID_ADDR_ECHO, spare_children=2, unix=str(path), metrics="127.0.0.1:0")
    )
    base = metrics_url(server)
    spares = idle_spares(server, 2)
    with frozen(server):
        tcp = connect(server.tcp_address)
        unix = connect(str(path))
        tcp_pid, _ = read_greeting(tcp)
        unix_pid, unix_addr = read_greeting(unix)
    assert {tcp_pid, unix_pid} == spares
    assert unix_addr == "''"  # an unnamed Unix client, as accept() gives it

    def listed() -> bool:  # both busy, and both replaced by new spares
        states = {p: c["state"] for p, c in _children_listing(base).items()}
        return sorted(states.values()) == ["busy", "busy", "idle", "idle"] and all(
            states.get(p) == "busy" for p in spares
        )

    wait_until(listed, what="both children listed busy, two new spares idle")
    children = _children_listing(base)
    assert children[tcp_pid]["peer"] == f"127.0.0.1:{tcp.getsockname()[1]}"
    assert children[unix_pid]["peer"] == "unix:(unnamed)"
    assert sorted(c["state"] for c in children.values()) == ["busy", "busy", "idle", "idle"]
    tcp.close()
    unix.close()
    assert server.stop() == 0
