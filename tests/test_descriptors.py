"""The parent's descriptors under a flood (forkserver/parent/proxied.py): PROXY
header waiters are bounded by the descriptors the parent can afford, so
connections that never send a header cannot starve a plain listener.

The parent's RLIMIT_NOFILE is lowered (prlimit, through psutil) once it is
serving, to what it holds plus the reserve plus a few waiters.
"""

from __future__ import annotations

import os
import socket
import time

import psutil
import pytest

from forkserver.parent.proxied import RESERVE
from tests.helpers.clients import accept_queue_length, connect, echo_roundtrip, recv_to_eof
from tests.helpers.proxy import expected, v1
from tests.helpers.servers import StartServer, wait_until
from tests.helpers.transports import PROXY_REPORT, listen, server_table, tcp_at

ROOM = 8  # header waiters the lowered limit leaves room for


def _limit_descriptors(pid: int, waiters: int) -> int:
    """Lower *pid*'s soft RLIMIT_NOFILE to what it holds, RESERVE, and *waiters*."""
    proc = psutil.Process(pid)
    hard = proc.rlimit(psutil.RLIMIT_NOFILE)[1]
    soft = len(os.listdir(f"/proc/{pid}/fd")) + RESERVE + waiters
    proc.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
    return soft


@pytest.mark.timeout(60)
@pytest.mark.parametrize("when_full", ["wait", "refuse"])
def test_proxy_waiters_at_the_descriptor_limit_leave_plain_listeners_served(
    start_server: StartServer, when_full: str
) -> None:
    server = start_server(
        server_table(when_full=when_full, backlog=256)
        + listen(tcp="127.0.0.1:0", handler="forkserver.examples.echo:EchoHandler")
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True, proxy_timeout=30)
    )
    plain, proxied = tcp_at(server, 0), tcp_at(server, 1)
    _limit_descriptors(server.pid, ROOM)
    silent: list[socket.socket] = []
    try:
        # Five times what the descriptors allow, none sending a header.
        for _ in range(5 * ROOM):
            silent.append(connect(proxied, timeout=10))
        if when_full == "wait":  # the parent stopped taking PROXY connections
            wait_until(lambda: accept_queue_length(proxied[1]) > 0, 10, "a PROXY backlog")
        else:
            server.wait_for_log(r"refused 127\.0\.0\.1:\d+: proxy_backlog")
        for i in range(5):
            started = time.monotonic()
            assert echo_roundtrip(plain, f"plain {i}".encode()) == f"plain {i}".encode()
            took = time.monotonic() - started
            assert took < 0.5, f"a plain listener's client waited {took:.2f}s"
        assert "Too many open files" not in server.log  # the reserve was never touched
        if when_full == "wait":
            assert "as many as the descriptors allow: the PROXY listeners pause" in server.log
    finally:
        for sock in silent:
            sock.close()
    # The waiters gone, the PROXY listener serves again.
    with connect(proxied) as sock:
        sock.sendall(v1("192.0.2.9", 999) + b"after")
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == expected("192.0.2.9", 999, b"after")
    assert server.stop() == 0
