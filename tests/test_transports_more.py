"""More per-listener transports end to end: ``[[listen]]`` tables across a
reload and an upgrade, metrics of PROXY refusals, ``max_children`` and
``when_full`` with UDP and PROXY listeners, stopping while a PROXY header is
incomplete, and a graceful stop under load.

As in tests/test_transports.py (whose helpers these tests share): the real
``python -m forkserver``, loopback port 0, the addresses it logs, PROXY
headers built by hand.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    ABNORMAL_EXIT,
    READY,
    ServerProcess,
    StartServer,
    accept_queue_length,
    children_gone,
    connect,
    group_members,
    idle_children,
    recv_to_eof,
    send_and_read,
    udp_queued_bytes,
    wait_until,
)
from tests.test_transports import (
    DATAGRAM_ECHO,
    ECHO,
    PAYLOAD,
    PROXY_REPORT,
    SERVICES,
    SIG,
    TLS_LINE,
    ParentWatch,
    Pki,
    expected,
    listen,
    read_until_closed,
    server_table,
    stop_cleanly,
    tcp_at,
    tls_connect,
    tls_line,
    udp_at,
    udp_client,
    unix_at,
    unserved,
    v1,
    v2,
)
from tests.test_transports import pki as _pki_fixture

MORE = "tests.transport_services_more"
DATAGRAM_HOLD = f"{MORE}:datagram_hold"
DATAGRAM_PARENT = f"{MORE}:datagram_parent"
PARENT_REPORT = f"{MORE}:parent_report"
ADDRESS_REPR = f"{MORE}:address_repr"
DATAGRAM_PID_ECHO = f"{SERVICES}:datagram_pid_echo"

pki = _pki_fixture  # the throwaway CA and certificates, made once per module

LISTENING = re.compile(r"\[(\d+)\] .*listening on (\S+)(.*)$")


# -- helpers ----------------------------------------------------------------------------


def config_file(tmp_path: Path) -> Path:
    """The config file start_server wrote (the only one in these tests)."""
    [path] = tmp_path.glob("server*.toml")
    return path


def listening_since(server: ServerProcess, mark: int, pid: int | None = None) -> list[str]:
    """The address (and suffix) of each "listening on" line logged since line
    *mark* (by parent *pid*, if given), in order."""
    found = []
    for line in server.lines[mark:]:
        m = LISTENING.search(line)
        if m and (pid is None or int(m.group(1)) == pid):
            found.append((m.group(2) + m.group(3)).strip())
    return found


def reload(server: ServerProcess, path: Path, body: str) -> int:
    """Write *body* to the config file and SIGHUP; returns the log mark."""
    path.write_text(body)
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    return mark


def udp_ask(target: tuple[str, int], payload: bytes) -> bytes:
    with udp_client() as client:
        client.sendto(payload, target)
        reply, source = client.recvfrom(65536)
    assert source == target
    return reply


def open_fifo_writer(path: Path, timeout: float = 10.0) -> int:
    """Open FIFO *path* for writing once a reader has it open (a held child)."""
    fd = -1

    def opened() -> bool:
        nonlocal fd
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
            return False
        return True

    wait_until(opened, timeout, f"a child to open {path}")
    return fd


def proxied_at(address: Any, data: bytes) -> bytes:
    with connect(address) as sock:
        return send_and_read(sock, data)


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metrics_base(server: ServerProcess) -> str:
    line = server.wait_for_log(r"metrics on http://\S+/metrics")
    m = re.search(r"(http://\S+)/metrics", line)
    assert m is not None
    return m.group(1)


def access_lines(server: ServerProcess) -> list[str]:
    marker = "forkserver.access: "
    return [line.split(marker, 1)[1] for line in server.lines if marker in line]


def gone_or_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_clean(server: ServerProcess, settings: dict[str, Any]) -> None:
    """stop_cleanly(), also with spare_children (whose idle spares never go):
    only the spares left, a clean exit, nothing left in the process group."""
    if not settings.get("spare_children"):
        stop_cleanly(server)
        return
    idle_children(server, settings)
    assert server.stop() == 0, server.log
    assert not ABNORMAL_EXIT.search(server.log), server.log
    wait_until(lambda: not group_members(server.pid), 10, "the spares to exit")


# -- 1. SIGHUP reload with [[listen]] tables -------------------------------------------


@pytest.mark.timeout(60)
def test_reload_keeps_tcp_and_udp_ports_adds_tls_and_switches_the_udp_handler(
    start_server: StartServer, tmp_path: Path, pki: Pki
) -> None:
    tcp_plain = listen(tcp="127.0.0.1:0", handler=ECHO)
    server = start_server(tcp_plain + listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO))
    tcp, udp = tcp_at(server, 0), udp_at(server, 1)
    assert udp_ask(udp, b"before") == b"before"
    held = connect(tcp)  # in flight across the reload: its child keeps serving it
    held.sendall(b"one ")
    assert held.recv(64) == b"one "

    new_udp = listen(udp="127.0.0.1:0", handler=DATAGRAM_PID_ECHO)
    tls = listen(tcp="127.0.0.1:0", handler=TLS_LINE, **pki.listener())
    mark = reload(server, config_file(tmp_path), tcp_plain + new_udp + tls)
    # Sent while the reload is under way: answered by the old handler or the
    # new one (from the kept socket's queue), never lost.
    with udp_client() as client:
        client.sendto(b"during", udp)
        during, _ = client.recvfrom(65536)
    assert during == b"during" or re.fullmatch(rb"\d+ during", during), during
    server.wait_for_log(r"reloading: the new config is valid", 30, start=mark)
    server.wait_for_log(READY, 30, start=mark)
    assert server.proc.poll() is None
    shown = listening_since(server, mark, server.pid)
    assert shown[:2] == [f"127.0.0.1:{tcp[1]}", f"udp:127.0.0.1:{udp[1]}"], server.log
    assert re.fullmatch(r"127\.0\.0\.1:(\d+) \(tls\)", shown[2]), shown
    tls_address = ("127.0.0.1", int(shown[2].split(":")[1].split()[0]))
    assert tls_address[1] not in (tcp[1], udp[1])

    def serves_new_config() -> None:
        assert proxied_at(tcp, b"plain after") == b"plain after"
        pid, _, data = udp_ask(udp, b"after").partition(b" ")
        assert data == b"after" and int(pid) not in (server.pid, 0)
        with tls_connect(tls_address, pki.client_context()) as conn:
            port = conn.getsockname()[1]
            reply = tls_line(conn, b"tls after\n")
            version = conn.version()
        assert reply == f"SSLSocket {version} - 127.0.0.1 {port}\ntls after\n".encode()

    serves_new_config()
    held.sendall(b"two")
    held.shutdown(socket.SHUT_WR)
    assert recv_to_eof(held) == b"two"
    held.close()

    # A certificate that exists but is not PEM passes the config's file
    # check: the reload's --check must load it, refuse, and keep serving.
    not_pem = tmp_path / "not-pem.pem"
    not_pem.write_text("this is not a certificate\n")
    bad_tls = listen(
        tcp="127.0.0.1:0", handler=TLS_LINE, tls_cert=str(not_pem), tls_key=str(pki.server_key)
    )
    mark = reload(server, config_file(tmp_path), tcp_plain + new_udp + bad_tls)
    line = server.wait_for_log("reload refused", 30, start=mark)
    assert "not-pem.pem" in line, line
    assert server.proc.poll() is None
    assert listening_since(server, mark) == []  # not re-executed
    serves_new_config()
    stop_cleanly(server)


# Both cases: a reload that moves a listener to a port in use.  The new
# parent falls back to the listeners it had ("keeping the listeners we
# had"), but build_services matches them to the new config's [[listen]]
# tables by address, and a moved listener matches none.
MOVED = {
    # Its handler was the table's own: no server.handler to fall back to.
    "own-handler": (listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True), ""),
    # server.handler exists: the listener stays up, but without its PROXY
    # protocol the header reaches the handler as data (and admission judges
    # the proxy's address, not the client's).
    "proxy-protocol": (listen(tcp="127.0.0.1:0", proxy_protocol=True), PROXY_REPORT),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(MOVED))
def test_reload_that_cannot_bind_a_moved_listener_keeps_serving_as_before(
    start_server: StartServer, tmp_path: Path, case: str
) -> None:
    table, default = MOVED[case]
    head = server_table(handler=default) if default else ""
    server = start_server(head + table + listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO))
    tcp, udp = tcp_at(server, 0), udp_at(server, 1)
    assert proxied_at(tcp, v1("1.2.3.4", 5678) + PAYLOAD) == expected("1.2.3.4", 5678)
    with socket.socket() as taken:  # the port the listener moves to is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        moved = table.replace("127.0.0.1:0", f"127.0.0.1:{taken.getsockname()[1]}")
        udp_table = listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO)
        mark = reload(server, config_file(tmp_path), head + moved + udp_table)
        server.wait_for_log(r"keeping the listeners we had", 30, start=mark)
        try:
            server.wait_for_log(READY, 30, start=mark)
        finally:
            assert server.proc.poll() is None, server.log  # a reload must not stop the server
    assert proxied_at(tcp, v1("1.2.3.4", 5678) + PAYLOAD) == expected("1.2.3.4", 5678)
    assert udp_ask(udp, b"still") == b"still"
    stop_cleanly(server)


# -- 2. SIGUSR2 upgrade with a PROXY and a UDP listener ---------------------------------


@pytest.mark.timeout(60)
def test_sigusr2_upgrade_serves_proxy_and_udp_on_the_same_ports(
    start_server: StartServer,
) -> None:
    server = start_server(
        listen(tcp="127.0.0.1:0", handler=PARENT_REPORT, proxy_protocol=True)
        + listen(udp="127.0.0.1:0", handler=DATAGRAM_PARENT)
    )
    proxy, udp = tcp_at(server, 0), udp_at(server, 1)
    old = server.pid
    header = v2("203.0.113.5", 4321)
    assert proxied_at(proxy, header + b"x") == f"{old} 203.0.113.5 4321\nx".encode()
    assert udp_ask(udp, b"x") == f"{old} x".encode()
    # A connection whose header is still incomplete when the new parent takes
    # over stays with the old parent, which serves it before it exits.
    pending = connect(proxy)
    ParentWatch(server, proxy[1]).send(pending, header[:20])

    mark = len(server.lines)
    server.signal(signal.SIGUSR2)
    line = server.wait_for_log(r"new parent \d+ is ready: handing over", 30, start=mark)
    new = int(line.split("new parent ")[1].split()[0])
    assert listening_since(server, mark, new) == [
        f"127.0.0.1:{proxy[1]} (proxy)",
        f"udp:{udp[0]}:{udp[1]}",
    ]
    assert send_and_read(pending, header[20:] + b"late") == f"{old} 203.0.113.5 4321\nlate".encode()
    pending.close()
    assert server.wait(30) == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log

    for i in range(3):
        reply = proxied_at(proxy, v1("198.51.100.1", 1000 + i) + b"new")
        assert reply == f"{new} 198.51.100.1 {1000 + i}\nnew".encode()
        assert udp_ask(udp, b"new %d" % i) == f"{new} new {i}".encode()
    mark = len(server.lines)
    os.kill(new, signal.SIGTERM)
    server.wait_for_log(rf"\[{new}\] .*stopped: all children have exited", 30, start=mark)
    wait_until(lambda: gone_or_zombie(new), 30, "the new parent to exit")
    assert not ABNORMAL_EXIT.search(server.log), server.log
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy, timeout=5).close()


# -- 3. metrics: PROXY refusals and UDP datagrams -----------------------------------------


@pytest.mark.timeout(60)
def test_metrics_count_proxy_refusals_by_reason_and_datagrams_as_accepted(
    start_server: StartServer,
) -> None:
    server = start_server(
        server_table(metrics="127.0.0.1:0")
        + listen(
            tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True,
            proxy_trusted=["127.0.0.2/32"],
        )
        + listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO)
    )  # fmt: skip
    base = metrics_base(server)
    proxy, udp = tcp_at(server, 0), udp_at(server, 1)
    before = scrape(base)
    assert not [k for k in before if k[0] == "forkserver_connections_refused_total"], before

    def from_trusted(data: bytes) -> socket.socket:
        sock = socket.create_connection(proxy, timeout=10, source_address=("127.0.0.2", 0))
        sock.sendall(data)
        return sock

    with from_trusted(v1("192.0.2.1", 1) + b"ok") as sock:
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b"192.0.2.1 1\nok"
    with from_trusted(b"GET / HTTP/1.0\r\n\r\n") as sock:  # no header at all
        assert read_until_closed(sock) == b""
    with connect(proxy) as sock:  # from 127.0.0.1: not trusted
        assert unserved(sock, v1("192.0.2.2", 2) + b"untrusted") == b""
    for i in range(3):
        assert udp_ask(udp, b"%d" % i) == b"%d" % i
    # Each refusal was counted before its connection was closed: no waiting.
    m = scrape(base)
    refused = {k[1]: v for k, v in m.items() if k[0] == "forkserver_connections_refused_total"}
    assert refused == {(("reason", "proxy_header"),): 1, (("reason", "proxy_untrusted"),): 1}
    assert m[("forkserver_connections_accepted_total", ())] == 3 + 3
    ok = ("forkserver_children_exited_total", (("how", "ok"),))
    wait_until(lambda: scrape(base)[ok] == 1 + 3, 20, "the served children to be reaped")
    stop_cleanly(server)


# -- 4. max_children and when_full with UDP ---------------------------------------------


def _hold_one_datagram(
    start_server: StartServer, tmp_path: Path, when_full: str
) -> tuple[ServerProcess, tuple[str, int], socket.socket, int]:
    """A server at max_children = 1, its only child held on a FIFO: returns
    the server, its UDP address, the client that sent the held datagram and
    the FIFO's write end (closing it lets the child reply and exit)."""
    fifo = tmp_path / "hold.fifo"
    os.mkfifo(fifo)
    server = start_server(
        server_table(max_children=1, when_full=when_full)
        + listen(udp="127.0.0.1:0", handler=DATAGRAM_HOLD)
    )
    target = udp_at(server, 0)
    client = udp_client()
    client.sendto(b"hold " + str(fifo).encode(), target)
    writer = open_fifo_writer(fifo)  # the child runs, and waits for the writer's EOF
    assert len(server.children()) == 1
    return server, target, client, writer


def _reply(client: socket.socket) -> tuple[int, bytes]:
    reply, _ = client.recvfrom(65536)
    pid, _, data = reply.partition(b" ")
    return int(pid), data


@pytest.mark.timeout(30)
def test_udp_at_max_children_waits_in_the_socket_queue(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, target, client, writer = _hold_one_datagram(start_server, tmp_path, "wait")
    with client:
        client.sendto(b"second", target)
        # Not read: the parent stopped reading at the limit, so the datagram
        # waits in the kernel's queue of the socket (not lost, not dropped).
        wait_until(lambda: udp_queued_bytes(target[1]) > 0, 10, "the datagram to be queued")
        assert len(server.children()) == 1
        assert "dropped a datagram" not in server.log
        os.close(writer)
        first_pid, first = _reply(client)
        second_pid, second = _reply(client)
    assert first.startswith(b"hold ") and second == b"second"
    assert first_pid != second_pid
    assert udp_queued_bytes(target[1]) == 0
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_udp_at_max_children_with_refuse_drops_the_datagram(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, target, client, writer = _hold_one_datagram(start_server, tmp_path, "refuse")
    with client:
        port = client.getsockname()[1]
        client.sendto(b"second", target)
        server.wait_for_log(rf"dropped a datagram from 127\.0\.0\.1:{port}: full$")
        os.close(writer)
        _, first = _reply(client)
        assert first.startswith(b"hold ")
        children_gone(server)
        client.sendto(b"third", target)  # a slot is free again: served
        assert _reply(client)[1] == b"third"
        client.setblocking(False)
        with pytest.raises(BlockingIOError):  # and nothing was ever sent for "second"
            client.recvfrom(65536)
    stop_cleanly(server)


# -- 5. max_children with a PROXY listener ------------------------------------------------


def _proxy_at_one_child(start_server: StartServer, **settings: Any) -> ServerProcess:
    return start_server(
        server_table(max_children=1, **settings)
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True)
    )


@pytest.mark.timeout(30)
def test_proxied_connection_waits_in_the_backlog_at_max_children(
    start_server: StartServer,
) -> None:
    server = _proxy_at_one_child(start_server)
    address = tcp_at(server, 0)
    with connect(address) as first:
        first.sendall(v2("198.51.100.1", 1111) + b"first")  # served; reads until our EOF
        wait_until(lambda: len(server.children()) == 1, 10, "a child for the first client")
        with connect(address) as second:
            second.sendall(v1("2001:db8::7", 2222) + b"second")
            second.shutdown(socket.SHUT_WR)  # all it will send
            # At the limit the parent does not accept: it waits in the backlog.
            wait_until(lambda: accept_queue_length(address[1]) == 1, 10, "a queued connection")
            assert len(server.children()) == 1
            assert send_and_read(first, b"") == expected("198.51.100.1", 1111, b"first")
            assert recv_to_eof(second) == expected("2001:db8::7", 2222, b"second")
    stop_cleanly(server)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("when_full", ["wait", "refuse"])
def test_header_completed_at_max_children_is_queued_or_refused(
    start_server: StartServer, when_full: str
) -> None:
    # The first client's header is incomplete while two others take both
    # slots; it completes while their children run: the connection is
    # accepted already, so it waits in the parent's queue (or is refused).
    # (max_children = 2: at most max_children connections may wait for a
    # header, so with 1 the others would be refused as proxy_backlog.)
    server = start_server(
        server_table(max_children=2, when_full=when_full, busy_message="busy\r\n")
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True)
    )
    address = tcp_at(server, 0)
    watch = ParentWatch(server, address[1])
    header = v2("198.51.100.1", 1111)
    with connect(address) as first:
        watch.send(first, header[:10])
        second = connect(address)
        second.sendall(v1("192.0.2.2", 2222) + b"second")
        third = connect(address)
        third.sendall(v1("192.0.2.3", 3333) + b"third")
        wait_until(lambda: len(server.children()) == 2, 10, "children for the others")
        # (No payload when it is to be refused: closing with unread bytes
        # would be a reset rather than the busy message and a FIN.)
        watch.send(first, header[10:] + (b"first" if when_full == "wait" else b""))
        first.shutdown(socket.SHUT_WR)
        if when_full == "refuse":
            assert read_until_closed(first) == b"busy\r\n"
            server.wait_for_log(r"refused 198\.51\.100\.1:1111: full")
        assert len(server.children()) == 2
        assert accept_queue_length(address[1]) == 0
        assert send_and_read(second, b"") == expected("192.0.2.2", 2222, b"second")
        if when_full == "wait":
            assert recv_to_eof(first) == expected("198.51.100.1", 1111, b"first")
        assert send_and_read(third, b"") == expected("192.0.2.3", 3333, b"third")
    second.close()
    third.close()
    stop_cleanly(server)


# -- 6. graceful stop while a PROXY header is incomplete ----------------------------------


@pytest.mark.timeout(30)
def test_stop_waits_for_an_incomplete_header_and_serves_it(start_server: StartServer) -> None:
    server = start_server(
        listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True, proxy_timeout=20)
    )
    address = tcp_at(server, 0)
    header = v2("2001:db8::9", 9999)
    with connect(address) as slow:
        ParentWatch(server, address[1]).send(slow, header[:17])
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"stopping: no longer accepting")
        with pytest.raises(ConnectionRefusedError):  # the listener is closed...
            connect(address).close()
        assert server.proc.poll() is None  # ...but the parent waits for the header
        assert send_and_read(slow, header[17:] + PAYLOAD) == expected("2001:db8::9", 9999)
    assert server.wait(20) == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log
    assert "PROXY header from" not in server.log


@pytest.mark.timeout(30)
def test_stop_closes_an_incomplete_header_at_proxy_timeout(start_server: StartServer) -> None:
    server = start_server(
        server_table(graceful_timeout=20)
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True, proxy_timeout=1)
    )
    address = tcp_at(server, 0)
    with connect(address) as slow:
        port = slow.getsockname()[1]
        ParentWatch(server, address[1]).send(slow, b"PROXY TCP4 1.2.")
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        assert read_until_closed(slow) == b""
        assert server.wait(20) == 0
    # Not before proxy_timeout, nor as late as graceful_timeout.
    assert 0.5 < time.monotonic() - started < 10
    server.wait_for_log(rf"PROXY header from 127\.0\.0\.1:{port}: no complete header within")


# -- 7. graceful stop under load: refused at connect() or served in full ---------------------


def _client_loop(
    address: tuple[str, int], n: int, deadline: float, results: dict[str, list[Any]]
) -> None:
    """Echo round trips until the server refuses a connect() (or the deadline).

    results["lost"] gets (local port or 0, what happened) for each connection
    that was neither refused nor served in full."""
    i = 0
    while time.monotonic() < deadline:
        payload = b"client %d round %d " % (n, i) * 40
        i += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            try:
                sock.connect(address)
            except ConnectionRefusedError:
                results["refused"].append(n)
                return  # the listener is closed for good
            except OSError as exc:  # reset in the handshake: not a refusal either
                results["lost"].append((0, f"connect(): {type(exc).__name__}: {exc}"))
                continue
            port = sock.getsockname()[1]
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            except OSError as exc:  # reset, or no reply in 10 s
                results["lost"].append((port, f"{type(exc).__name__}: {exc}"))
            else:
                if reply == payload:
                    results["served"].append(n)
                else:
                    results["lost"].append((port, f"{len(reply)} of {len(payload)} bytes"))
        finally:
            sock.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("settings", [{}, {"spare_children": 2}], ids=["fork", "pool"])
def test_graceful_stop_under_load_refuses_or_serves_every_connection(
    start_server: StartServer, settings: dict[str, Any]
) -> None:
    # access_log: a child writes one line per connection it served, naming
    # the client's port, so a lost connection can be told apart: one the
    # server accepted (a bug in the drain, the fork or the child) or one the
    # kernel reset before any process accepted it.
    server = start_server(
        server_table(access_log=True, **settings) + listen(tcp="127.0.0.1:0", handler=ECHO)
    )
    address = tcp_at(server, 0)
    results: dict[str, list[Any]] = {"served": [], "refused": [], "lost": []}
    deadline = time.monotonic() + 20
    clients = [
        threading.Thread(target=_client_loop, args=(address, n, deadline, results))
        for n in range(4)
    ]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: len(results["served"]) >= 200, 15, "load before the stop")
        server.signal(signal.SIGTERM)
        assert server.wait(20) == 0
    finally:
        for thread in clients:
            thread.join(30)
    server.wait_for_log("stopped: all children have exited")  # after every access line
    assert sorted(results["refused"]) == [0, 1, 2, 3]  # every client ran until the stop
    assert not ABNORMAL_EXIT.search(server.log), server.log
    # Nor did the parent close one it had accepted (refused, or dropped from its queue).
    assert not re.search(r"refused|unserved|fork\(\) failed", server.log), server.log
    served_ports = {int(m.group(1)) for m in re.finditer(r"127\.0\.0\.1:(\d+) pid ", server.log)}
    assert len(served_ports) >= len(results["served"])
    # Nor a connection that completed its handshake after the last accept():
    # new SYNs are dropped (refuse_new) before the final drain.
    assert results["lost"] == [], results["lost"][:5]


# -- 8. what else reading the code turned up ----------------------------------------------


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


@pytest.mark.timeout(30)
def test_access_log_has_a_line_for_a_proxy_header_refusal(start_server: StartServer) -> None:
    server = start_server(
        server_table(access_log=True, deny=["203.0.113.0/24"])
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True)
    )
    address = tcp_at(server, 0)
    with connect(address) as sock:  # refused by deny: "PEER refused deny"
        assert unserved(sock, v1("203.0.113.1", 1)) == b""
    server.wait_for_log(r"access: 203\.0\.113\.1:1 refused deny$")
    with connect(address) as sock:
        port = sock.getsockname()[1]
        assert unserved(sock, b"no header at all\r\n") == b""
    server.wait_for_log(rf"PROXY header from 127\.0\.0\.1:{port}: ")
    server.wait_for_log(rf"access: 127\.0\.0\.1:{port} refused proxy_header$", timeout=2)
    stop_cleanly(server)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("settings", [{}, {"spare_children": 2}], ids=["fork", "pool"])
def test_access_log_names_the_real_client_for_udp_and_proxy(
    start_server: StartServer, settings: dict[str, Any]
) -> None:
    server = start_server(
        server_table(access_log=True, **settings)
        + listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO)
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True)
    )
    with udp_client() as client:
        port = client.getsockname()[1]
        client.sendto(b"12345", udp_at(server, 0))
        assert client.recv(64) == b"12345"
    assert proxied_at(tcp_at(server, 1), v2("2001:db8::5", 555) + b"abc") == expected(
        "2001:db8::5", 555, b"abc"
    )
    stop_clean(server, settings)
    lines = access_lines(server)
    assert len(lines) == 2, lines
    udp_line = next(line for line in lines if line.startswith("127.0.0.1:"))
    assert re.fullmatch(
        rf"127\.0\.0\.1:{port} pid \d+ \d+\.\d+s in 5 out - exit status 0", udp_line
    )
    proxy_line = next(line for line in lines if line.startswith("[2001:db8::5]:555 "))
    # in: the header and the payload, read from the proxy's connection.
    assert re.fullmatch(
        r"\[2001:db8::5\]:555 pid \d+ \d+\.\d+s in \d+ out \d+ exit status 0", proxy_line
    )


def v2_unix(source: str, destination: str) -> bytes:
    """A v2 header for a client on a Unix socket (AF_UNIX, family 0x31)."""
    block = source.encode().ljust(108, b"\0") + destination.encode().ljust(108, b"\0")
    return SIG + bytes([0x21, 0x31]) + len(block).to_bytes(2, "big") + block


# A client whose address family is not the socket's: the header is all that
# says who it is, and a spare gets it through pool.encode_peer.
CLAIMED = {
    "ipv6-on-ipv4": v2("2001:db8::1", 5678),
    "unix-on-ipv4": v2_unix("/run/client.sock", "/run/server.sock"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(CLAIMED))
def test_client_address_from_a_header_is_the_same_with_spare_children(
    start_server: StartServer, name: str
) -> None:
    seen = []
    for settings in ({}, {"spare_children": 2}):
        server = start_server(
            server_table(**settings)
            + listen(tcp="127.0.0.1:0", handler=ADDRESS_REPR, proxy_protocol=True)
        )
        seen.append(proxied_at(tcp_at(server, 0), CLAIMED[name]))
        stop_clean(server, settings)
    # As accept() gives them: an IPv6 address as a 4-tuple, a Unix one as its path.
    assert seen[0] in (b"('2001:db8::1', 5678, 0, 0)\n", b"'/run/client.sock'\n"), seen
    assert seen[1] == seen[0], f"fork: {seen[0]!r}, pool: {seen[1]!r}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("settings", [{}, {"spare_children": 1}], ids=["fork", "pool"])
def test_exec_handler_on_a_unix_listener_behind_proxy(
    start_server: StartServer, tmp_path: Path, settings: dict[str, Any]
) -> None:
    env = shutil.which("env")
    assert env is not None
    path = tmp_path / "exec.sock"
    server = start_server(
        server_table(**settings)
        + listen(unix=str(path), handler=f"exec:{env}", proxy_protocol=True)
    )

    def environment(header: bytes) -> dict[str, str]:
        with connect(unix_at(server, 0)) as sock:
            reply = send_and_read(sock, header)
        return dict(line.split("=", 1) for line in reply.decode().splitlines() if "=" in line)

    seen = environment(v1("2001:db8::3", 3333))
    # The client is TCP (the header says so); the local end is a Unix socket,
    # with no IP address or port to give.
    assert seen["PROTO"] == "TCP"
    assert (seen["TCPREMOTEIP"], seen["TCPREMOTEPORT"]) == ("2001:db8::3", "3333")
    assert (seen["TCPLOCALIP"], seen["TCPLOCALPORT"]) == ("", "")
    seen = environment(b"PROXY UNKNOWN\r\n")  # the proxy itself: a Unix client
    assert seen["PROTO"] == "UNIX"
    assert "TCPREMOTEIP" not in seen
    stop_clean(server, settings)


@pytest.mark.timeout(30)
def test_busy_message_reaches_a_refused_client_of_another_family(
    start_server: StartServer, tmp_path: Path
) -> None:
    # _refuse wraps the fd as a socket of the *client's* family: an IPv6
    # client on an IPv4 socket, an IPv4 client on a Unix socket.
    path = tmp_path / "refuse.sock"
    server = start_server(
        server_table(deny=["2001:db8::/32", "192.0.2.0/24"], busy_message="busy\r\n")
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True)
        + listen(unix=str(path), handler=PROXY_REPORT, proxy_protocol=True)
    )
    for address, header in [
        (tcp_at(server, 0), v2("2001:db8::1", 1)),
        (unix_at(server, 1), v1("192.0.2.1", 2)),
        (unix_at(server, 1), v2("2001:db8::2", 3)),
    ]:
        with connect(address) as sock:
            assert unserved(sock, header) == b"busy\r\n"
    assert proxied_at(tcp_at(server, 0), v1("198.51.100.1", 4) + b"x") == expected(
        "198.51.100.1", 4, b"x"
    )
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_reload_does_not_lose_a_connection_whose_header_is_incomplete(
    start_server: StartServer, tmp_path: Path
) -> None:
    body = listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True, proxy_timeout=20)
    server = start_server(body)
    address = tcp_at(server, 0)
    header = v2("192.0.2.9", 9)
    with connect(address) as slow:
        ParentWatch(server, address[1]).send(slow, header[:20])
        mark = reload(server, config_file(tmp_path), body)
        # The reload waits for the header (what was read would not survive exec).
        server.wait_for_log("reloading once 1 connections have their PROXY header", 30, mark)
        assert send_and_read(slow, header[20:] + b"x") == expected("192.0.2.9", 9, b"x")
        server.wait_for_log(READY, 30, start=mark)
    assert proxied_at(address, v1("192.0.2.10", 10) + b"y") == expected("192.0.2.10", 10, b"y")
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_stop_serves_a_datagram_waiting_at_max_children(
    start_server: StartServer, tmp_path: Path
) -> None:
    server, target, client, writer = _hold_one_datagram(start_server, tmp_path, "wait")
    with client:
        client.sendto(b"second", target)
        wait_until(lambda: udp_queued_bytes(target[1]) > 0, 10, "the datagram to be queued")
        server.signal(signal.SIGTERM)
        server.wait_for_log(r"stopping: no longer accepting")
        os.close(writer)
        _, first = _reply(client)
        assert first.startswith(b"hold ")
        assert server.wait(20) == 0
        assert "dropped a datagram" not in server.log, server.log
        client.settimeout(5)
        assert _reply(client)[1] == b"second"


@pytest.mark.timeout(30)
def test_with_when_full_wait_a_slow_header_does_not_refuse_others(
    start_server: StartServer,
) -> None:
    server = start_server(
        server_table(max_children=1, when_full="wait")
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True, proxy_timeout=20)
    )
    address = tcp_at(server, 0)
    with connect(address) as slow:
        ParentWatch(server, address[1]).send(slow, b"PROXY TCP4 ")
        with connect(address) as other:
            try:
                reply = send_and_read(other, v1("192.0.2.8", 8) + b"other")
            except ConnectionResetError:  # closed with its bytes unread
                reply = b""
        assert reply == expected("192.0.2.8", 8, b"other")
        slow.sendall(b"1.2.3.4 5.6.7.8 1 2\r\nslow")
        slow.shutdown(socket.SHUT_WR)
        assert recv_to_eof(slow) == expected("1.2.3.4", 1, b"slow")
    stop_cleanly(server)
