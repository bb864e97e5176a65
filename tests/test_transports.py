"""Listeners of several kinds in one server, through the real CLI: ``[[listen]]``
tables with TCP, UDP and Unix listeners side by side, each with its own
handler, IPv6, spares on every transport, and bad listener configs.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.clients import connect, needs_ipv6, send_and_read
from tests.helpers.proxy import PAYLOAD, expected, proxied_at, proxy_listener, v1, v2
from tests.helpers.servers import ABNORMAL_EXIT, StartServer, assert_config_refused, run_forkserver
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
    udp_at,
    udp_client,
    unix_at,
    unserved,
)


@pytest.mark.timeout(30)
def test_tcp_udp_and_unix_listeners_each_serve_with_their_own_handler(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "mixed.sock"
    server = start_server(
        server_table(handler=ECHO)
        + listen(tcp="127.0.0.1:0")  # [server].handler
        + listen(udp="127.0.0.1:0", handler=f"{SERVICES}:datagram_pid_echo")
        + listen(unix=str(path), handler="tests.helpers.services:PidEcho")
    )
    assert len(server.listening) == 3, server.log
    assert re.fullmatch(r"127\.0\.0\.1:\d+", server.listening[0]), server.listening
    assert re.fullmatch(r"udp:127\.0\.0\.1:\d+", server.listening[1]), server.listening
    assert server.listening[2] == f"unix:{path}", server.listening
    assert server.tcp_address == tcp_at(server, 0)

    payload = os.urandom(200_000)
    with connect(tcp_at(server, 0)) as sock:
        assert send_and_read(sock, payload) == payload

    with udp_client() as client:
        client.sendto(b"over udp", udp_at(server, 1))
        reply, _ = client.recvfrom(65536)
    pid, _, data = reply.partition(b" ")
    assert data == b"over udp"
    assert int(pid) not in (server.pid, 0)

    with connect(unix_at(server, 2)) as sock:
        greeting, _, echoed = send_and_read(sock, b"line one\nline two\n").partition(b"\n")
    assert greeting.isdigit(), greeting
    assert echoed == b"line one\nline two\n"
    stop_cleanly(server)


@needs_ipv6
@pytest.mark.timeout(30)
def test_ipv6_tcp_and_udp_listeners(start_server: StartServer) -> None:
    server = start_server(
        listen(tcp="[::1]:0", handler=ECHO) + listen(udp="[::1]:0", handler=DATAGRAM_ECHO)
    )
    assert re.fullmatch(r"\[::1\]:\d+", server.listening[0]), server.listening
    assert re.fullmatch(r"udp:\[::1\]:\d+", server.listening[1]), server.listening
    with connect(tcp_at(server, 0)) as sock:
        assert send_and_read(sock, b"over tcp6") == b"over tcp6"
    target = udp_at(server, 1)
    with udp_client("::1") as client:
        client.sendto(b"over udp6", target)
        reply, source = client.recvfrom(65536)
    assert reply == b"over udp6"
    assert source[:2] == target
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_every_transport_with_spare_children(start_server: StartServer, pki: Pki) -> None:
    # Pre-forked spares serve stream connections the parent hands them; UDP,
    # TLS and PROXY listeners must work the same in that mode.
    server = start_server(
        server_table(spare_children=2)
        + listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO)
        + proxy_listener()
        + listen(tcp="127.0.0.1:0", handler=TLS_LINE, **pki.listener())
        + listen(tcp="127.0.0.1:0", handler=ECHO)
    )
    for _ in range(3):  # more than there are spares: refills too
        with udp_client() as client:
            client.sendto(b"datagram", udp_at(server, 0))
            assert client.recvfrom(65536)[0] == b"datagram"
        with connect(tcp_at(server, 1)) as sock:
            assert send_and_read(sock, v1("1.2.3.4", 5678) + PAYLOAD) == expected("1.2.3.4", 5678)
        with tls_connect(tcp_at(server, 2), pki.client_context()) as tls:
            port = tls.getsockname()[1]
            reply = tls_line(tls, b"spare\n")
            assert reply == f"SSLSocket {tls.version()} - 127.0.0.1 {port}\nspare\n".encode()
        with connect(tcp_at(server, 3)) as sock:
            assert send_and_read(sock, b"plain") == b"plain"
    assert server.stop() == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log


@dataclass(frozen=True)
class Bad:
    body: Callable[[Pki, Path], str]
    says: tuple[str, ...]


BAD_CONFIGS: dict[str, Bad] = {
    "tcp-and-udp": Bad(
        lambda p, d: listen(tcp="127.0.0.1:0", udp="127.0.0.1:0", handler=ECHO), ("tcp", "udp")
    ),
    "tcp-and-unix": Bad(
        lambda p, d: listen(tcp="127.0.0.1:0", unix=str(d / "x.sock"), handler=ECHO),
        ("tcp", "unix"),
    ),
    "no-transport": Bad(lambda p, d: listen(handler=ECHO), ("tcp", "udp", "unix")),
    "tcp-without-port": Bad(lambda p, d: listen(tcp="127.0.0.1", handler=ECHO), ("127.0.0.1",)),
    "unknown-key": Bad(
        lambda p, d: listen(tcp="127.0.0.1:0", handler=ECHO, colour="blue"), ("colour",)
    ),
    "no-handler": Bad(lambda p, d: listen(tcp="127.0.0.1:0"), ("handler",)),
    "tls-cert-without-key": Bad(
        lambda p, d: listen(tcp="127.0.0.1:0", handler=ECHO, tls_cert=str(p.server_cert)),
        ("tls_key",),
    ),
    "tls-key-without-cert": Bad(
        lambda p, d: listen(tcp="127.0.0.1:0", handler=ECHO, tls_key=str(p.server_key)),
        ("tls_cert",),
    ),
    "tls-cert-missing": Bad(
        lambda p, d: listen(
            tcp="127.0.0.1:0",
            handler=ECHO,
            tls_cert=str(d / "missing-cert.pem"),
            tls_key=str(p.server_key),
        ),
        ("missing-cert.pem",),
    ),
    "tls-key-missing": Bad(
        lambda p, d: listen(
            tcp="127.0.0.1:0",
            handler=ECHO,
            tls_cert=str(p.server_cert),
            tls_key=str(d / "missing-key.pem"),
        ),
        ("missing-key.pem",),
    ),
    "tls-cert-not-pem": Bad(
        lambda p, d: listen(
            tcp="127.0.0.1:0",
            handler=ECHO,
            tls_cert=str(d / "not-pem.txt"),
            tls_key=str(p.server_key),
        ),
        ("not-pem.txt",),
    ),
    "tls-client-ca-missing": Bad(
        lambda p, d: listen(
            tcp="127.0.0.1:0", handler=ECHO, **p.listener(), tls_client_ca=str(d / "missing-ca.pem")
        ),
        ("missing-ca.pem",),
    ),
    "tls-on-udp": Bad(
        lambda p, d: listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO, **p.listener()),
        ("tls", "udp"),
    ),
    "proxy-on-udp": Bad(
        lambda p, d: listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO, proxy_protocol=True),
        ("proxy", "udp"),
    ),
    "proxy-trusted-not-a-network": Bad(
        lambda p, d: listen(
            tcp="127.0.0.1:0", handler=ECHO, proxy_protocol=True, proxy_trusted=["not-a-network"]
        ),
        ("not-a-network",),
    ),
    "exec-on-udp": Bad(lambda p, d: listen(udp="127.0.0.1:0", handler="exec:cat"), ("exec", "udp")),
    "exec-on-tls": Bad(
        lambda p, d: listen(tcp="127.0.0.1:0", handler="exec:cat", **p.listener()), ("exec", "tls")
    ),
    "listen-and-server-host": Bad(
        lambda p, d: server_table(host="127.0.0.1", handler=ECHO) + listen(tcp="127.0.0.1:0"),
        ("host", "listen"),
    ),
    "listen-and-server-port": Bad(
        lambda p, d: server_table(port=0, handler=ECHO) + listen(tcp="127.0.0.1:0"),
        ("port", "listen"),
    ),
    "listen-and-server-unix": Bad(
        lambda p, d: server_table(unix=str(d / "s.sock"), handler=ECHO) + listen(tcp="127.0.0.1:0"),
        ("unix", "listen"),
    ),
}


@dataclass(frozen=True)
class Run:
    path: Path
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def rejected(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Callable[[str], Run]]:
    """Runs the CLI on a bad config once per module; the tests below share the run."""
    runs: dict[str, Run] = {}
    workdir = tmp_path_factory.mktemp("bad-listen")
    (workdir / "not-pem.txt").write_text("this is not a certificate\n")

    def run(name: str) -> Run:
        if name not in runs:
            path = workdir / f"{name}.toml"
            path.write_text(BAD_CONFIGS[name].body(pki, workdir))
            runs[name] = Run(path, run_forkserver("--config", str(path), cwd=workdir, timeout=10))
        return runs[name]

    yield run


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_listen_config_exits_2_with_one_line(name: str, rejected: Callable[[str], Run]) -> None:
    assert_config_refused(rejected(name).result)


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_listen_config_message_names_what_is_wrong(
    name: str, rejected: Callable[[str], Run]
) -> None:
    stderr = rejected(name).result.stderr
    for fragment in BAD_CONFIGS[name].says:
        assert fragment.lower() in stderr.lower(), f"{fragment!r} not in {stderr!r}"


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_bad_listen_config_message_names_the_file(
    name: str, rejected: Callable[[str], Run]
) -> None:
    run = rejected(name)
    assert run.result.stderr.startswith(f"forkserver: {run.path}: "), run.result.stderr


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
    cases: list[tuple[Any, bytes]] = [
        (tcp_at(server, 0), v2("2001:db8::1", 1)),
        (unix_at(server, 1), v1("192.0.2.1", 2)),
        (unix_at(server, 1), v2("2001:db8::2", 3)),
    ]
    for address, header in cases:
        with connect(address) as sock:
            assert unserved(sock, header) == b"busy\r\n"
    assert proxied_at(tcp_at(server, 0), v1("198.51.100.1", 4) + b"x") == expected(
        "198.51.100.1", 4, b"x"
    )
    stop_cleanly(server)
