"""TLS listeners end to end, with throwaway certificates made by the openssl
command: the handshake in the child, close_notify, client certificates, and
clients that do not speak TLS.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.clients import connect
from tests.helpers.processes import children_gone
from tests.helpers.servers import StartServer
from tests.helpers.tls import Pki, tls_connect, tls_line
from tests.helpers.transports import (
    ECHO,
    TLS_LINE,
    listen,
    listening_line,
    read_until_closed,
    stop_cleanly,
    tcp_at,
    unix_at,
    unserved,
)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return data


@pytest.mark.timeout(30)
def test_tls_echo_over_python_ssl(start_server: StartServer, pki: Pki) -> None:
    server = start_server(listen(tcp="127.0.0.1:0", handler=ECHO, **pki.listener()))
    assert re.fullmatch(r"127\.0\.0\.1:\d+ \(.*tls.*\)", listening_line(server, 0)), server.log
    chunks = [os.urandom(16 * 1024) for _ in range(16)]
    with tls_connect(tcp_at(server, 0), pki.client_context()) as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        for chunk in chunks:  # one chunk at a time: no deadlock on full buffers
            tls.sendall(chunk)
            assert recv_exactly(tls, len(chunk)) == chunk
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_tls_handler_gets_an_sslsocket(start_server: StartServer, pki: Pki) -> None:
    server = start_server(listen(tcp="127.0.0.1:0", handler=TLS_LINE, **pki.listener()))
    with tls_connect(tcp_at(server, 0), pki.client_context(), hostname="localhost") as tls:
        port = tls.getsockname()[1]
        reply = tls_line(tls, b"hello\n")
        version = tls.version()
    assert reply == f"SSLSocket {version} - 127.0.0.1 {port}\nhello\n".encode()
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_tls_connection_ends_with_close_notify(start_server: StartServer, pki: Pki) -> None:
    # Without close_notify a TLS client cannot tell the end of the reply from
    # a truncation attack: OpenSSL 3 reports "unexpected eof while reading".
    server = start_server(listen(tcp="127.0.0.1:0", handler=TLS_LINE, **pki.listener()))
    address = tcp_at(server, 0)
    with tls_connect(address, pki.client_context(), suppress_ragged_eofs=False) as tls:
        try:
            reply = tls_line(tls, b"bye\n")
        except ssl.SSLEOFError as exc:
            raise AssertionError(f"the server closed without close_notify: {exc}") from None
    assert reply.endswith(b"\nbye\n"), reply
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_tls_over_a_unix_socket(start_server: StartServer, pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "tls.sock"
    server = start_server(listen(unix=str(path), handler=TLS_LINE, **pki.listener()))
    assert re.fullmatch(rf"unix:{re.escape(str(path))} \(.*tls.*\)", listening_line(server, 0))
    with tls_connect(unix_at(server, 0), pki.client_context(), hostname="localhost") as tls:
        reply = tls_line(tls, b"over unix\n")
        version = tls.version()
    assert reply.startswith(f"SSLSocket {version} - ".encode()), reply
    assert reply.endswith(b"\nover unix\n"), reply
    stop_cleanly(server)


@pytest.mark.timeout(60)
def test_openssl_s_client_talks_to_a_tls_listener(start_server: StartServer, pki: Pki) -> None:
    server = start_server(listen(tcp="127.0.0.1:0", handler=TLS_LINE, **pki.listener()))
    host, port = tcp_at(server, 0)
    # -quiet implies -ign_eof: s_client reads until the server closes, which
    # TlsLine does once it has replied.
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-CAfile", str(pki.ca),
         "-verify_return_error", "-verify_ip", "127.0.0.1", "-quiet"],
        input=b"hello from s_client\n", capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    stderr = result.stderr.decode(errors="replace")
    assert re.fullmatch(
        rb"SSLSocket TLSv1\.[23] - 127\.0\.0\.1 \d+\nhello from s_client\n", result.stdout
    ), (result.stdout, stderr)
    assert result.returncode == 0, stderr
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_plaintext_client_on_a_tls_port_is_closed_and_logged(
    start_server: StartServer, pki: Pki
) -> None:
    server = start_server(listen(tcp="127.0.0.1:0", handler=TLS_LINE, **pki.listener()))
    address = tcp_at(server, 0)
    with connect(address) as sock:
        port = sock.getsockname()[1]
        received = unserved(sock, b"GET / HTTP/1.0\r\n\r\n")
    # Nothing from the handler; at most a TLS alert record (content type 21).
    assert received == b"" or received[:1] == b"\x15", received
    server.wait_for_log(rf"TLS handshake with 127\.0\.0\.1:{port} failed: \S")
    # And the listener serves TLS clients as before.
    with tls_connect(address, pki.client_context()) as tls:
        assert tls_line(tls, b"after\n").endswith(b"\nafter\n")
    children_gone(server)
    assert server.stop() == 0


@pytest.mark.timeout(30)
def test_silent_client_times_out_while_others_are_served(
    start_server: StartServer, pki: Pki
) -> None:
    server = start_server(
        listen(tcp="127.0.0.1:0", handler=TLS_LINE, **pki.listener(tls_handshake_timeout=1.0))
    )
    address = tcp_at(server, 0)
    with connect(address) as silent:
        silent_port = silent.getsockname()[1]
        # While the silent client's handshake is pending, another is served.
        for i in range(3):
            with tls_connect(address, pki.client_context()) as tls:
                assert tls_line(tls, b"%d\n" % i).endswith(b"\n%d\n" % i)
        assert read_until_closed(silent) == b""
    server.wait_for_log(rf"TLS handshake with 127\.0\.0\.1:{silent_port} timed out")
    children_gone(server)
    assert server.stop() == 0


def _tls_attempt(address: Any, ctx: ssl.SSLContext) -> bytes | None:
    """The reply to one line over TLS, or None if the connection failed."""
    try:
        with tls_connect(address, ctx) as tls:
            return tls_line(tls, b"let me in\n")
    except (ssl.SSLError, OSError):
        return None  # refused in the handshake, or by an alert on first read


@pytest.mark.timeout(30)
def test_tls_client_ca_requires_a_client_certificate_it_signed(
    start_server: StartServer, pki: Pki
) -> None:
    server = start_server(
        listen(tcp="127.0.0.1:0", handler=TLS_LINE, **pki.listener(tls_client_ca=str(pki.ca)))
    )
    address = tcp_at(server, 0)
    for ctx, who in [
        (pki.client_context(), "no certificate"),
        (pki.client_context(pki.rogue_cert, pki.rogue_key), "a certificate from another CA"),
    ]:
        start = len(server.lines)
        reply = _tls_attempt(address, ctx)
        assert not reply, f"served with {who}: {reply!r}"
        server.wait_for_log(r"TLS handshake with 127\.0\.0\.1:\d+ failed: \S", start=start)
    with tls_connect(address, pki.client_context(pki.client_cert, pki.client_key)) as tls:
        port = tls.getsockname()[1]
        reply = tls_line(tls, b"let me in\n")
        version = tls.version()
    assert reply == f"SSLSocket {version} test-client 127.0.0.1 {port}\nlet me in\n".encode()
    children_gone(server)
    assert server.stop() == 0
