"""Listeners behind a proxy (``proxy_protocol``) end to end: the client address
claimed by a PROXY v1/v2 header, headers in pieces or bad, admission by the
claimed source, and PROXY listeners at max_children.  Headers are built by
hand (tests/helpers/proxy.py).  The parser itself: test_proxy_protocol.py.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.clients import (
    accept_queue_length,
    connect,
    needs_ipv6,
    recv_to_eof,
    send_and_read,
)
from tests.helpers.proxy import (
    PAYLOAD,
    SIG,
    ParentWatch,
    expected,
    proxied,
    proxied_at,
    proxy_listener,
    v1,
    v2,
)
from tests.helpers.servers import ServerProcess, StartServer, wait_until
from tests.helpers.tls import Pki, tls_line
from tests.helpers.transports import (
    PROXY_REPORT,
    SERVICES,
    TLS_LINE,
    listen,
    listening_line,
    read_until_closed,
    server_table,
    stop_clean,
    stop_cleanly,
    tcp_at,
    unix_at,
    unserved,
)


def v2_local(body: bytes = b"", family: int = 0x00) -> bytes:
    return SIG + bytes([0x20, family]) + struct.pack("!H", len(body)) + body


HEADERS = {
    "v1-tcp4": (v1("1.2.3.4", 5678), "1.2.3.4", 5678),
    "v1-tcp6": (v1("2001:db8::1", 5678), "2001:db8::1", 5678),
    "v2-tcp4": (v2("1.2.3.4", 5678), "1.2.3.4", 5678),
    "v2-tcp6": (v2("2001:db8::1", 5678), "2001:db8::1", 5678),
    # A TLV (PP2_TYPE_AUTHORITY) inside the header's length: skipped, not payload.
    "v2-tcp4-tlv": (
        v2("198.51.100.9", 1, tlvs=b"\x02\x00\x0bexample.com"),
        "198.51.100.9",
        1,
    ),
}


def proxied_unserved(server: ServerProcess, header: bytes, payload: bytes = PAYLOAD) -> bytes:
    """Like proxied(), for a client that is to be closed unserved: a reset is a close too."""
    with connect(tcp_at(server, 0)) as sock:
        return unserved(sock, header + payload)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(HEADERS))
def test_proxy_header_and_payload_in_one_send(start_server: StartServer, name: str) -> None:
    header, host, port = HEADERS[name]
    server = start_server(proxy_listener())
    assert re.fullmatch(r"127\.0\.0\.1:\d+ \(.*proxy.*\)", listening_line(server, 0)), server.log
    assert proxied(server, header) == expected(host, port)
    stop_cleanly(server)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(HEADERS))
@pytest.mark.parametrize("split", ["in-signature", "mid-header", "before-payload"])
def test_proxy_header_in_pieces(start_server: StartServer, name: str, split: str) -> None:
    header, host, port = HEADERS[name]
    server = start_server(proxy_listener())
    address = tcp_at(server, 0)
    at = {"in-signature": 5, "mid-header": len(header) - 9, "before-payload": len(header)}[split]
    watch = ParentWatch(server, address[1])
    with connect(address) as sock:
        watch.send(sock, header[:at])
        if at < len(header):
            watch.send(sock, header[at:])
        reply = send_and_read(sock, PAYLOAD)
    assert reply == expected(host, port)
    stop_cleanly(server)


LOCAL_HEADERS = {
    "v2-local": v2_local(),
    # LOCAL with an address block: the addresses must be ignored.
    "v2-local-with-addresses": v2_local(bytes([1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]), 0x11),
    "v1-unknown": b"PROXY UNKNOWN\r\n",
    "v1-unknown-with-addresses": b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1111 2222\r\n",
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(LOCAL_HEADERS))
def test_proxy_local_and_unknown_use_the_real_peer(start_server: StartServer, name: str) -> None:
    server = start_server(proxy_listener())
    with connect(tcp_at(server, 0)) as sock:
        port = sock.getsockname()[1]
        reply = send_and_read(sock, LOCAL_HEADERS[name] + PAYLOAD)
    assert reply == expected("127.0.0.1", port)
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_proxy_on_a_unix_socket_always_trusts_the_client(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.sock"
    server = start_server(
        listen(
            unix=str(path), handler=PROXY_REPORT, proxy_protocol=True,
            proxy_trusted=["10.0.0.0/8"],
        )
    )  # fmt: skip
    assert re.fullmatch(rf"unix:{re.escape(str(path))} \(.*proxy.*\)", listening_line(server, 0))
    for header, host, port in HEADERS.values():
        with connect(unix_at(server, 0)) as sock:
            assert send_and_read(sock, header + PAYLOAD) == expected(host, port)
    stop_cleanly(server)


@needs_ipv6
@pytest.mark.timeout(30)
def test_proxy_trusts_ipv6_loopback_by_default(start_server: StartServer) -> None:
    server = start_server(listen(tcp="[::1]:0", handler=PROXY_REPORT, proxy_protocol=True))
    with connect(tcp_at(server, 0)) as sock:
        assert send_and_read(sock, v2("1.2.3.4", 5678) + PAYLOAD) == expected("1.2.3.4", 5678)
    stop_cleanly(server)


BAD_HEADERS = {
    "v1-port-not-a-number": b"PROXY TCP4 1.2.3.4 5.6.7.8 notaport 2222\r\n",
    "v1-bad-address": b"PROXY TCP4 1.2.3.999 5.6.7.8 1111 2222\r\n",
    "v1-v6-address-as-tcp4": b"PROXY TCP4 2001:db8::1 5.6.7.8 1111 2222\r\n",
    "v1-no-crlf-within-107-bytes": b"PROXY TCP4 " + b"1" * 200 + b"\r\n",
    "v1-lf-only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\n",
    "v2-bad-version": SIG + b"\x31\x11\x00\x0c" + bytes(12),
    "v2-bad-command": SIG + b"\x2f\x11\x00\x0c" + bytes(12),
    "v2-tcp4-block-too-short": SIG + b"\x21\x11\x00\x04" + bytes(4),
    "missing-http": b"GET / HTTP/1.0\r\nHost: example.com\r\n\r\n",
    "missing-tls": bytes.fromhex("160301002e0100002a0303") + bytes(40),
}


def _refusal(server: ServerProcess, port: int, start: int = 0) -> str:
    """The log line saying why the connection from local *port* was closed."""
    line = server.wait_for_log(rf"PROXY header from 127\.0\.0\.1:{port}\b\W*\S", start=start)
    return line.split(f"PROXY header from 127.0.0.1:{port}", 1)[1]


def _still_serves(server: ServerProcess) -> None:
    assert proxied(server, v1("192.0.2.77", 7777)) == expected("192.0.2.77", 7777)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_bad_or_missing_header_is_closed_unserved(start_server: StartServer, name: str) -> None:
    server = start_server(proxy_listener())
    with connect(tcp_at(server, 0)) as sock:
        port = sock.getsockname()[1]
        assert unserved(sock, BAD_HEADERS[name] + PAYLOAD) == b""
    _refusal(server, port)
    _still_serves(server)
    stop_cleanly(server)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "partial",
    [b"PROXY TCP4 1.2.3", SIG[:7], v2("1.2.3.4", 5678)[:20]],
    ids=["v1", "v2-signature", "v2-addresses"],
)
def test_truncated_header_is_closed_unserved(start_server: StartServer, partial: bytes) -> None:
    server = start_server(proxy_listener())
    with connect(tcp_at(server, 0)) as sock:
        port = sock.getsockname()[1]
        assert unserved(sock, partial) == b""  # the client closes mid-header
    _refusal(server, port)
    _still_serves(server)
    stop_cleanly(server)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "partial", [b"", b"PROXY TCP4 ", SIG + b"\x21"], ids=["nothing", "v1", "v2"]
)
def test_header_timeout_closes_while_others_are_served(
    start_server: StartServer, partial: bytes
) -> None:
    server = start_server(proxy_listener(proxy_timeout=0.5))
    with connect(tcp_at(server, 0)) as slow:
        port = slow.getsockname()[1]
        slow.sendall(partial)
        _still_serves(server)  # the parent does not wait for the slow one
        assert read_until_closed(slow) == b""
    reason = _refusal(server, port)
    assert "time" in reason.lower(), reason
    _still_serves(server)
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_header_from_an_untrusted_source_is_closed_unserved(start_server: StartServer) -> None:
    server = start_server(proxy_listener(proxy_trusted=["10.0.0.0/8", "127.0.0.2/32"]))
    address = tcp_at(server, 0)
    with connect(address) as sock:  # from 127.0.0.1: not trusted
        port = sock.getsockname()[1]
        assert unserved(sock, v1("1.2.3.4", 5678) + PAYLOAD) == b""
    reason = _refusal(server, port)
    assert "trust" in reason.lower(), reason
    with socket.create_connection(address, timeout=10, source_address=("127.0.0.2", 0)) as sock:
        assert send_and_read(sock, v1("1.2.3.4", 5678) + PAYLOAD) == expected("1.2.3.4", 5678)
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_deny_applies_to_the_claimed_source(start_server: StartServer) -> None:
    server = start_server(server_table(deny=["203.0.113.0/24"]) + proxy_listener())
    assert proxied_unserved(server, v2("203.0.113.7", 5678)) == b""
    server.wait_for_log(r"refused 203\.0\.113\.7:5678\b.*: deny")
    assert proxied(server, v2("198.51.100.7", 5678)) == expected("198.51.100.7", 5678)
    assert proxied_unserved(server, v1("203.0.113.200", 1)) == b""
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_per_source_limit_counts_the_claimed_source(start_server: StartServer) -> None:
    server = start_server(server_table(per_source_limit=1) + proxy_listener())
    with connect(tcp_at(server, 0)) as held:
        held.sendall(v1("198.51.100.7", 1000) + b"held")  # its handler reads until EOF
        wait_until(lambda: len(server.children()) == 1, 10, "a child for the held client")
        # Same claimed source, same real source: over the limit.
        assert proxied_unserved(server, v1("198.51.100.7", 1001)) == b""
        server.wait_for_log(r"refused 198\.51\.100\.7:1001\b.*: per_source_limit")
        # Another claimed source over the same loopback: served.
        assert proxied(server, v1("198.51.100.8", 1002)) == expected("198.51.100.8", 1002)
        assert send_and_read(held, b"") == expected("198.51.100.7", 1000, b"held")
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_the_request_is_the_real_connection_under_the_claimed_address(
    start_server: StartServer, tmp_path: Path
) -> None:
    # The claimed client may be IPv6 while the connection from the proxy is
    # IPv4 or a Unix socket: request.family, getsockname() and getpeername()
    # must describe the real socket (SocketReport sets TCP_NODELAY unless
    # request.family says AF_UNIX).
    path = tmp_path / "real.sock"
    report = f"{SERVICES}:SocketReport"
    server = start_server(
        listen(tcp="127.0.0.1:0", handler=report, proxy_protocol=True)
        + listen(unix=str(path), handler=report, proxy_protocol=True)
    )
    address = tcp_at(server, 0)
    for header, host, port in HEADERS.values():
        with connect(address) as sock:
            local = sock.getsockname()
            reply = send_and_read(sock, header)
        assert reply == f"AF_INET {address!r} {local!r} {host} {port}\n".encode()
        with connect(unix_at(server, 1)) as sock:
            reply = send_and_read(sock, header)
        assert reply == f"AF_UNIX {str(path)!r} '' {host} {port}\n".encode()
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_exec_handler_behind_proxy_gets_the_claimed_client_in_its_environment(
    start_server: StartServer,
) -> None:
    env = shutil.which("env")
    assert env is not None
    server = start_server(listen(tcp="127.0.0.1:0", handler=f"exec:{env}", proxy_protocol=True))
    with connect(tcp_at(server, 0)) as sock:
        reply = send_and_read(sock, v2("203.0.113.9", 4242))
    seen = dict(line.split("=", 1) for line in reply.decode().splitlines() if "=" in line)
    assert (seen["TCPREMOTEIP"], seen["TCPREMOTEPORT"]) == ("203.0.113.9", "4242")
    assert (seen["TCPLOCALIP"], seen["TCPLOCALPORT"]) == ("127.0.0.1", str(tcp_at(server, 0)[1]))
    stop_cleanly(server)


@pytest.mark.timeout(30)
def test_proxy_header_before_the_tls_handshake(start_server: StartServer, pki: Pki) -> None:
    server = start_server(
        listen(tcp="127.0.0.1:0", handler=TLS_LINE, proxy_protocol=True, **pki.listener())
    )
    raw = connect(tcp_at(server, 0))
    try:
        raw.sendall(v2("1.2.3.4", 5678))
        with pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            reply = tls_line(tls, b"through\n")
            version = tls.version()
    finally:
        raw.close()
    assert reply == f"SSLSocket {version} - 1.2.3.4 5678\nthrough\n".encode()
    stop_cleanly(server)


ADDRESS_REPR = f"{SERVICES}:address_repr"


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
