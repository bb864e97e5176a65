"""SIGHUP reload and SIGUSR2 upgrade, under continuous load."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from forkserver.testing.process import READY
from tests.helpers.clients import connect, recv_to_eof, recv_until, send_and_read
from tests.helpers.metrics import metrics_url, scrape
from tests.helpers.processes import child_pids, group_members, live_children
from tests.helpers.proxy import PAYLOAD, ParentWatch, expected, proxied_at, v1, v2
from tests.helpers.servers import (
    ABNORMAL_EXIT,
    ServerProcess,
    StartServer,
    config,
    wait_until,
    write_module,
)
from tests.helpers.spares import (
    PID_ADDR_ECHO,
    alive,
    echo_line,
    idle_spares,
    read_greeting,
    write_versioned,
)
from tests.helpers.tls import Pki, tls_connect, tls_line
from tests.helpers.transports import (
    DATAGRAM_ECHO,
    ECHO,
    PROXY_REPORT,
    SERVICES,
    TLS_LINE,
    listen,
    server_table,
    stop_cleanly,
    tcp_at,
    udp_ask,
    udp_at,
    udp_client,
)

HANDLER = """
def handler(conn, addr):
    conn.sendall(b"{version}\\n")
    while data := conn.recv(100):
        conn.sendall(b"{version}:" + data)
"""


def _write_handler(directory: Path, version: str) -> None:
    write_module(directory / "versioned.py", HANDLER.format(version=version))


def _greeting(address: tuple[str, int]) -> bytes:
    with connect(address) as sock:
        return recv_until(sock, b"\n")


@contextmanager
def _load(address: tuple[str, int]) -> Iterator[dict[str, list[object]]]:
    """Clients connecting in a loop until the block ends; failures recorded."""
    result: dict[str, list[object]] = {"ok": [], "failed": []}
    stop = threading.Event()

    def run() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            try:
                with connect(address, timeout=10) as sock:
                    line = recv_until(sock, b"\n")
                    result["ok"].append(line)
            except (OSError, AssertionError) as exc:
                result["failed"].append(exc)

    workers = [threading.Thread(target=run) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        yield result
    finally:
        stop.set()
        for w in workers:
            w.join(30)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("spares", [0, 2])
def test_sighup_reload_switches_code_keeps_in_flight_and_loses_nothing(
    start_server: StartServer, tmp_path: Path, spares: int
) -> None:
    _write_handler(tmp_path, "v1")
    server = start_server(config("versioned:handler", spare_children=spares))
    address = server.tcp_address
    held = connect(address)
    assert recv_until(held, b"\n") == b"v1\n"
    _write_handler(tmp_path, "v2")
    with _load(address) as load:
        wait_until(lambda: len(load["ok"]) > 20, 20, "load before the reload")
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for_log(r"reloading: the new config is valid", 30, start=mark)
        server.wait_for_log("forkserver ready", 30, start=mark)
        wait_until(lambda: b"v2\n" in load["ok"][-5:], 20, "new code serving the load")
    assert load["failed"] == [], load["failed"][:3]
    assert server.poll() is None and _greeting(address) == b"v2\n"  # same pid, same port
    # The connection in flight was not touched: still the old code.
    held.sendall(b"x")
    assert recv_until(held, b"x") == b"v1:x"
    held.close()
    assert "exit status" not in server.log and "killed by" not in server.log
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_invalid_config_on_reload_is_refused_and_the_old_one_serves(
    start_server: StartServer, tmp_path: Path
) -> None:
    _write_handler(tmp_path, "v1")
    server = start_server(config("versioned:handler"))
    path = server.config_file
    path.write_text(path.read_text() + "max_chilren = 3\n")
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    line = server.wait_for_log("reload refused", 30, start=mark)
    assert 'unknown key server.max_chilren (did you mean "max_children"?)' in line
    assert _greeting(server.tcp_address) == b"v1\n"
    # A handler that no longer imports is refused the same way.
    path.write_text(config("versioned:handler"))
    write_module(tmp_path / "versioned.py", "raise RuntimeError('broken on purpose')\n")
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    line = server.wait_for_log("reload refused", 30, start=mark)
    assert "RuntimeError: broken on purpose" in line
    assert _greeting(server.tcp_address) == b"v1\n"
    assert server.stop() == 0


@pytest.mark.timeout(90)
def test_reload_keeps_unchanged_listeners_and_applies_new_ones(
    start_server: StartServer, tmp_path: Path
) -> None:
    _write_handler(tmp_path, "v1")
    old_sock, new_sock = tmp_path / "old.sock", tmp_path / "new.sock"
    server = start_server(config("versioned:handler", unix=str(old_sock)))
    tcp = server.tcp_address
    path = server.config_file
    path.write_text(config("versioned:handler", unix=str(new_sock)))
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    server.wait_for_log("forkserver ready", 30, start=mark)
    assert _greeting(tcp) == b"v1\n"  # port 0 in the config: the same listener, kept
    assert not old_sock.exists()
    with connect(str(new_sock)) as sock:
        assert recv_until(sock, b"\n") == b"v1\n"
    assert server.stop() == 0
    assert not new_sock.exists()


@pytest.mark.timeout(90)
def test_sigusr2_upgrade_under_load_loses_no_connection(
    start_server: StartServer, tmp_path: Path
) -> None:
    _write_handler(tmp_path, "v1")
    pid_path = tmp_path / "server.pid"
    server = start_server(config("versioned:handler", pidfile=str(pid_path)))
    address = server.tcp_address
    _write_handler(tmp_path, "v2")
    with _load(address) as load:
        wait_until(lambda: len(load["ok"]) > 20, 20, "load before the upgrade")
        server.signal(signal.SIGUSR2)
        line = server.wait_for_log(r"new parent \d+ is ready: handing over", 30)
        new_pid = int(line.split("new parent ")[1].split()[0])
        # The old parent drains and exits cleanly; the new one serves the load.
        assert server.wait(30) == 0
        count = len(load["ok"])
        wait_until(lambda: len(load["ok"]) > count + 20, 20, "load after the upgrade")
    assert load["failed"] == [], load["failed"][:3]
    assert load["ok"][-1] == b"v2\n"
    assert psutil.pid_exists(new_pid)
    assert pid_path.read_text() == f"{new_pid}\n"
    os.kill(new_pid, signal.SIGTERM)
    wait_until(lambda: not psutil.pid_exists(new_pid), 30, "the new parent to stop")
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=2).close()


@pytest.mark.timeout(60)
def test_stop_during_a_reload_check_is_graceful(start_server: StartServer, tmp_path: Path) -> None:
    _write_handler(tmp_path, "v1")
    server = start_server(config("versioned:handler", graceful_timeout=20))
    held = connect(server.tcp_address)
    assert recv_until(held, b"\n") == b"v1\n"
    server.signal(signal.SIGHUP)
    server.signal(signal.SIGTERM)  # while the config check runs
    server.wait_for_log("stopping")
    held.sendall(b"x")  # the connection in flight still finishes
    assert recv_until(held, b"x") == b"v1:x"
    held.close()
    assert server.wait(30) == 0
    assert "Traceback" not in server.log


@pytest.mark.timeout(60)
def test_stop_during_an_upgrade_stops_the_new_parent_too(
    start_server: StartServer, tmp_path: Path
) -> None:
    _write_handler(tmp_path, "v1")
    server = start_server(config("versioned:handler"))
    server.signal(signal.SIGUSR2)
    line = server.wait_for_log(r"started a new parent, pid \d+")
    new_pid = int(line.split("pid ")[-1].split(";")[0])
    server.signal(signal.SIGTERM)  # before the new parent is ready
    assert server.wait(30) == 0
    wait_until(lambda: not psutil.pid_exists(new_pid) or
               psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE,
               20, "the new parent to stop as well")  # fmt: skip


@pytest.mark.timeout(60)
def test_failed_upgrade_leaves_the_old_parent_and_its_socket_file(
    start_server: StartServer, tmp_path: Path
) -> None:
    _write_handler(tmp_path, "v1")
    path = tmp_path / "s.sock"
    server = start_server(config("versioned:handler", unix=str(path)))
    write_module(tmp_path / "versioned.py", "raise RuntimeError('broken upgrade')\n")
    server.signal(signal.SIGUSR2)
    server.wait_for_log("upgrade failed", 30)
    assert path.exists(), "the failed new parent removed the old one's socket file"
    with connect(str(path)) as sock:
        assert recv_until(sock, b"\n") == b"v1\n"
    assert server.stop() == 0


DATAGRAM_PARENT = f"{SERVICES}:datagram_parent"


PARENT_REPORT = f"{SERVICES}:parent_report"


DATAGRAM_PID_ECHO = f"{SERVICES}:datagram_pid_echo"


LISTENING = re.compile(r"\[(\d+)\] .*listening on (\S+)(.*)$")


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


def gone_or_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


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
    mark = reload(server, server.config_file, tcp_plain + new_udp + tls)
    # Sent while the reload is under way: answered by the old handler or the
    # new one (from the kept socket's queue), never lost.
    with udp_client() as client:
        client.sendto(b"during", udp)
        during, _ = client.recvfrom(65536)
    assert during == b"during" or re.fullmatch(rb"\d+ during", during), during
    server.wait_for_log(r"reloading: the new config is valid", 30, start=mark)
    server.wait_for_log(READY, 30, start=mark)
    assert server.poll() is None
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
    mark = reload(server, server.config_file, tcp_plain + new_udp + bad_tls)
    line = server.wait_for_log("reload refused", 30, start=mark)
    assert "not-pem.pem" in line, line
    assert server.poll() is None
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
        mark = reload(server, server.config_file, head + moved + udp_table)
        server.wait_for_log(r"keeping the listeners we had", 30, start=mark)
        try:
            server.wait_for_log(READY, 30, start=mark)
        finally:
            assert server.poll() is None, server.log  # a reload must not stop the server
    assert proxied_at(tcp, v1("1.2.3.4", 5678) + PAYLOAD) == expected("1.2.3.4", 5678)
    assert udp_ask(udp, b"still") == b"still"
    stop_cleanly(server)


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
        mark = reload(server, server.config_file, body)
        # The reload waits for the header (what was read would not survive exec).
        server.wait_for_log("reloading once 1 connections have their PROXY header", 30, mark)
        assert send_and_read(slow, header[20:] + b"x") == expected("192.0.2.9", 9, b"x")
        server.wait_for_log(READY, 30, start=mark)
    assert proxied_at(address, v1("192.0.2.10", 10) + b"y") == expected("192.0.2.10", 10, b"y")
    stop_cleanly(server)


def _states(base: str) -> tuple[float, float]:
    """(busy, idle) children, as the parent counts them."""
    m = scrape(base)
    return tuple(  # type: ignore[return-value]
        m.get(("forkserver_children", (("state", state),)), -1.0) for state in ("busy", "idle")
    )


@dataclass
class Load:
    """What the load's clients saw: (start time, address, version) of each
    complete exchange, and every failure."""

    ok: list[tuple[float, Any, str]] = field(default_factory=list)
    failed: list[tuple[Any, BaseException]] = field(default_factory=list)


@contextmanager
def _load_each(addresses: list[Any], workers: int = 4) -> Iterator[Load]:
    """Clients of a versioned handler connecting in a loop, round-robin over
    *addresses*, until the block ends: each reads the greeting, sends b"x",
    reads b"VERSION:x", half-closes and reads EOF."""
    load = Load()
    stop = threading.Event()

    def run(offset: int) -> None:
        for i in range(100_000):
            if stop.is_set():
                return
            address = addresses[(i + offset) % len(addresses)]
            started = time.monotonic()
            try:
                with connect(address, timeout=10) as sock:
                    version = recv_until(sock, b"\n").split(b" ")[0].decode()
                    sock.sendall(b"x")
                    reply = recv_until(sock, b":x")
                    assert reply == f"{version}:x".encode(), reply
                    sock.shutdown(socket.SHUT_WR)
                    assert recv_to_eof(sock) == b""
                load.ok.append((started, address, version))
            except (OSError, AssertionError) as exc:
                load.failed.append((address, exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        yield load
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)


@pytest.mark.timeout(60)
def test_reload_under_load_on_tcp_and_unix_loses_nothing_and_retires_old_spares(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_versioned(tmp_path, "v1")
    path = tmp_path / "s.sock"
    server = start_server(
        config(
            "versioned:handler",
            spare_children=2,
            max_children=8,
            unix=str(path),
            metrics="127.0.0.1:0",
        )
    )
    base = metrics_url(server)
    addresses: list[Any] = [server.tcp_address, str(path)]
    old_spares = idle_spares(server, 2)
    held = connect(server.tcp_address)
    version, held_pid = recv_until(held, b"\n").split()
    assert version == b"v1"
    write_versioned(tmp_path, "v2")
    with _load_each(addresses) as load:
        wait_until(lambda: len(load.ok) > 20, 20, "load before the reload")
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for_log("reloading: the new config is valid", 30, start=mark)
        server.wait_for_log("forkserver ready", 30, start=mark)
        count = len(load.ok)
        wait_until(lambda: len(load.ok) > count + 20, 20, "load after the reload")
    assert load.failed == [], load.failed[:3]
    # Quiet again: the held child (adopted) and two spares, none of the old
    # ones (they would count as busy children until reaped).
    wait_until(lambda: _states(base) == (1, 2), 20, "the held child and two idle spares")
    # (the last scrape's own child gone too)
    wait_until(lambda: len(child_pids(server.pid)) == 3, what="only those three")
    settled = live_children(server)
    assert len(settled) == 3 and int(held_pid) in settled
    assert not (settled - {int(held_pid)}) & old_spares
    for address in addresses * 3:
        with connect(address) as sock:
            version, pid = recv_until(sock, b"\n").split()
            assert version == b"v2", (address, pid)
            assert int(pid) not in old_spares
    assert echo_line(held, b"x") == b"v1:x"  # in flight: untouched, the old code
    held.close()
    assert server.stop() == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log


@pytest.mark.timeout(60)
def test_upgrade_under_load_with_spares_loses_nothing(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_versioned(tmp_path, "v1")
    server = start_server(config("versioned:handler", spare_children=3, max_children=8))
    addresses: list[Any] = [server.tcp_address]
    old_spares = idle_spares(server, 3)
    write_versioned(tmp_path, "v2")
    with _load_each(addresses) as load:
        wait_until(lambda: len(load.ok) > 20, 20, "load before the upgrade")
        server.signal(signal.SIGUSR2)
        line = server.wait_for_log(r"new parent \d+ is ready: handing over", 30)
        new_parent = int(line.split("new parent ")[1].split()[0])
        # The old parent drains, waits for its children (spares included) and exits.
        assert server.wait(30) == 0
        gone_at = time.monotonic()
        wait_until(lambda: sum(1 for s, _, _ in load.ok if s > gone_at) > 20, 20, "load after it")
    assert load.failed == [], load.failed[:3]
    assert {v for s, _, v in load.ok if s > gone_at} == {"v2"}
    assert not [p for p in old_spares if alive(p)]
    assert not ABNORMAL_EXIT.search(server.log), server.log
    os.kill(new_parent, signal.SIGTERM)
    wait_until(lambda: not group_members(server.pid), 30, "the new parent and its children")
    with pytest.raises(OSError):
        connect(server.tcp_address, timeout=2).close()


@pytest.mark.timeout(40)
def test_upgrade_with_spares_keeps_the_unix_socket_file(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    server = start_server(config(PID_ADDR_ECHO, spare_children=2, unix=str(path)))
    idle_spares(server, 2)
    server.signal(signal.SIGUSR2)
    line = server.wait_for_log(r"new parent \d+ is ready: handing over", 30)
    new_parent = int(line.split("new parent ")[1].split()[0])
    assert server.wait(30) == 0
    try:
        with connect(str(path)) as sock:
            pid, _ = read_greeting(sock)
            assert psutil.Process(pid).ppid() == new_parent
    finally:
        os.kill(new_parent, signal.SIGTERM)
        wait_until(lambda: not group_members(server.pid), 30, "the new parent to stop")
