"""The metrics endpoint of a running server: scraped, parsed, and read by `status`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from tests.helpers.clients import connect, echo_roundtrip, recv_to_eof, recv_until
from tests.helpers.metrics import answering_pid, health, metrics_url, scrape
from tests.helpers.proxy import v1
from tests.helpers.servers import ROOT, ServerProcess, StartServer, config, wait_until
from tests.helpers.transports import (
    DATAGRAM_ECHO,
    PROXY_REPORT,
    listen,
    read_until_closed,
    server_table,
    stop_cleanly,
    tcp_at,
    udp_ask,
    udp_at,
    unserved,
)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spares", [0, 2])
def test_scrape_counts_connections_refusals_and_children(
    start_server: StartServer, spares: int
) -> None:
    server = start_server(
        config("tests.helpers.services:PidEcho", metrics="127.0.0.1:0", per_source_limit=1,
               spare_children=spares)
    )  # fmt: skip
    base = metrics_url(server)
    ok = ("forkserver_children_exited_total", (("how", "ok"),))
    for i in range(3):
        with connect(server.tcp_address) as sock:
            recv_until(sock, b"\n")
        # The source's count drops when its child is reaped: wait for that.
        want = i + 1
        wait_until(lambda: scrape(base)[ok] == want, what="the child reaped")  # noqa: B023
    held = connect(server.tcp_address)
    recv_until(held, b"\n")
    with connect(server.tcp_address) as refused:  # per_source_limit: one at a time
        assert recv_to_eof(refused) == b""
    # After a handoff half the spares are replaced at once, the rest soon after.
    idle = ("forkserver_children", (("state", "idle"),))
    wait_until(lambda: scrape(base)[idle] == spares, what="the spares replaced")
    m = scrape(base)
    assert m[("forkserver_connections_accepted_total", ())] == 5
    assert m[("forkserver_connections_refused_total", (("reason", "per_source_limit"),))] == 1
    assert m[("forkserver_children", (("state", "busy"),))] == 1
    assert m[("forkserver_children", (("state", "idle"),))] == spares
    assert m[("forkserver_children_uss_bytes", ())] > 0
    assert m[("forkserver_parent_rss_bytes", ())] > 0
    status = subprocess.run(
        [sys.executable, "-m", "forkserver", "status", "--url", base],
        capture_output=True, text=True, timeout=30, check=False, cwd=ROOT,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    local = held.getsockname()
    assert f"{local[0]}:{local[1]}" in status.stdout
    assert "busy" in status.stdout
    held.close()
    # Scrapes are children too, but not connections: they never count as such.
    assert scrape(base)[("forkserver_connections_accepted_total", ())] == 5
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_metrics_listener_survives_a_reload(start_server: StartServer) -> None:
    server = start_server(config(metrics="127.0.0.1:0"))
    base = metrics_url(server)
    assert echo_roundtrip(server.tcp_address, b"x") == b"x"
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    server.wait_for_log("forkserver ready", 30, start=mark)
    assert scrape(base)[("forkserver_max_children", ())] == 1024  # same port, still served
    assert server.stop() == 0


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
    base = metrics_url(server)
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


def _held_connection(server: ServerProcess) -> socket.socket:
    """A connection its child is serving (PidEcho greets with its pid)."""
    held = connect(server.tcp_address)
    recv_until(held, b"\n")
    return held


@pytest.mark.timeout(60)
def test_healthz_answers_503_from_the_moment_a_stop_begins(start_server: StartServer) -> None:
    server = start_server(
        config("tests.helpers.services:PidEcho", metrics="127.0.0.1:0", graceful_timeout=30)
    )
    base = metrics_url(server)
    assert health(base) == (200, b"serving\n")
    held = _held_connection(server)
    mark = len(server.lines)
    server.signal(signal.SIGTERM)
    server.wait_for_log("stopping: no longer accepting", start=mark)
    # Draining: the metrics listener still answers, and says so.
    for _ in range(3):
        assert health(base) == (503, b"stopping\n")
    assert scrape(base)[("forkserver_children", (("state", "busy"),))] == 1
    assert not server.wait_exit(0)
    held.sendall(b"last words\n")  # the connection in flight is still served
    assert recv_until(held, b"\n") == b"last words\n"
    held.close()
    assert server.wait(30) == 0
    with pytest.raises(OSError):  # closed with the parent: refused now
        health(base)


@pytest.mark.timeout(90)
def test_at_an_upgrade_healthz_is_answered_by_the_new_parent(start_server: StartServer) -> None:
    """The old parent drains, but lets go of the metrics listener at the
    handover: both parents share that socket, and only the new one serves,
    so no health check may reach the old one and see 503."""
    server = start_server(
        config("tests.helpers.services:PidEcho", metrics="127.0.0.1:0", graceful_timeout=30)
    )
    base = metrics_url(server)
    assert answering_pid(base) == server.pid
    held = _held_connection(server)
    server.signal(signal.SIGUSR2)
    line = server.wait_for_log(r"new parent \d+ is ready: handing over", 30)
    new_pid = int(line.split("new parent ")[1].split()[0])
    try:
        for _ in range(10):
            assert health(base) == (200, b"serving\n")
            assert answering_pid(base) == new_pid
        assert not server.wait_exit(0), "the old parent no longer drains the held connection"
        held.sendall(b"to the old one\n")
        assert recv_until(held, b"\n") == b"to the old one\n"
        held.close()
        assert server.wait(30) == 0
        assert health(base) == (200, b"serving\n")
    finally:
        held.close()
        os.kill(new_pid, signal.SIGTERM)
        wait_until(lambda: not psutil.pid_exists(new_pid) or
                   psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE,
                   30, "the new parent to stop")  # fmt: skip
