"""Per-listener transports end to end, through the real CLI: ``[[listen]]`` tables
with UDP, TCP and Unix listeners side by side, TLS, and the PROXY protocol.

Every test starts ``python -m forkserver`` on loopback port 0, reads the
addresses it logs (one per listener, in config order) and talks to it over
real sockets; TLS material is made once per module with the ``openssl`` CLI.
PROXY headers are built by hand here, byte by byte, so these tests do not
depend on forkserver's own parser.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import (
    ABNORMAL_EXIT,
    ServerProcess,
    StartServer,
    accept_queue_length,
    assert_config_refused,
    children_gone,
    connect,
    needs_ipv6,
    recv_to_eof,
    run_forkserver,
    send_and_read,
    toml_value,
    wait_until,
)

ECHO = "forkserver.examples.echo:EchoHandler"
DATAGRAM_ECHO = "forkserver.examples.echo:DatagramEchoHandler"
SERVICES = "tests.transport_services"
PROXY_REPORT = f"{SERVICES}:proxy_report"
TLS_LINE = f"{SERVICES}:TlsLine"

# -- config text --------------------------------------------------------------------


def listen(**settings: Any) -> str:
    """One ``[[listen]]`` table, as TOML text."""
    return "[[listen]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())


def server_table(**settings: Any) -> str:
    """A ``[server]`` table (without host/port: the listeners say where)."""
    return "[server]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in settings.items())


# -- addresses and processes --------------------------------------------------------


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def tcp_at(server: ServerProcess, index: int) -> tuple[str, int]:
    address = server.addresses[index]
    assert not address.startswith(("udp:", "unix:")), server.addresses
    return _host_port(address)


def udp_at(server: ServerProcess, index: int) -> tuple[str, int]:
    address = server.addresses[index]
    assert address.startswith("udp:"), server.addresses
    return _host_port(address.removeprefix("udp:"))


def unix_at(server: ServerProcess, index: int) -> str:
    address = server.addresses[index]
    assert address.startswith("unix:"), server.addresses
    return address.removeprefix("unix:")


def listening_line(server: ServerProcess, index: int) -> str:
    """The whole "listening on ..." log line of listener *index* (with its suffix)."""
    lines = [line for line in server.lines if "listening on " in line]
    assert len(lines) == len(server.addresses), server.log
    return lines[index].split("listening on ", 1)[1]


def stop_cleanly(server: ServerProcess) -> None:
    children_gone(server)
    assert server.stop() == 0, server.log
    assert not ABNORMAL_EXIT.search(server.log), server.log


# -- stream clients -----------------------------------------------------------------


def unserved(sock: socket.socket, payload: bytes = b"") -> bytes:
    """Send *payload*, half-close, and return what came back before the close.

    A connection closed with unread data may end in a reset rather than EOF:
    both are a close; what matters is that nothing was sent back."""
    try:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return b""
    return read_until_closed(sock)


def read_until_closed(sock: socket.socket, timeout: float = 15.0) -> bytes:
    """Everything received until EOF or a reset."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"not closed within {timeout}s; got {received!r}") from None
    return received


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return data


# -- UDP --------------------------------------------------------------------------------


def udp_client(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.settimeout(10)
    sock.bind((host, 0))
    return sock


def udp_config(handler: str, **settings: Any) -> str:
    return listen(udp="127.0.0.1:0", handler=handler, **settings)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [1, 1000, 8192])
def test_udp_echo_is_exact_and_goes_back_to_the_sender(
    start_server: StartServer, size: int
) -> None:
    # No [server] table at all: every listener names its handler.
    server = start_server(udp_config(DATAGRAM_ECHO))
    [address] = server.addresses
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


# -- several transports in one server ---------------------------------------------------


@pytest.mark.timeout(30)
def test_tcp_udp_and_unix_listeners_each_serve_with_their_own_handler(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "mixed.sock"
    server = start_server(
        server_table(handler=ECHO)
        + listen(tcp="127.0.0.1:0")  # [server].handler
        + listen(udp="127.0.0.1:0", handler=f"{SERVICES}:datagram_pid_echo")
        + listen(unix=str(path), handler="tests.services:PidEcho")
    )
    assert len(server.addresses) == 3, server.log
    assert re.fullmatch(r"127\.0\.0\.1:\d+", server.addresses[0]), server.addresses
    assert re.fullmatch(r"udp:127\.0\.0\.1:\d+", server.addresses[1]), server.addresses
    assert server.addresses[2] == f"unix:{path}", server.addresses
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
    assert re.fullmatch(r"\[::1\]:\d+", server.addresses[0]), server.addresses
    assert re.fullmatch(r"udp:\[::1\]:\d+", server.addresses[1]), server.addresses
    with connect(tcp_at(server, 0)) as sock:
        assert send_and_read(sock, b"over tcp6") == b"over tcp6"
    target = udp_at(server, 1)
    with udp_client("::1") as client:
        client.sendto(b"over udp6", target)
        reply, source = client.recvfrom(65536)
    assert reply == b"over udp6"
    assert source[:2] == target
    stop_cleanly(server)


# -- TLS material -------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, a client
    certificate from the same CA, and one from a CA the server does not know."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    def listener(self, **settings: Any) -> dict[str, Any]:
        return {"tls_cert": str(self.server_cert), "tls_key": str(self.server_key), **settings}

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


def _make_ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip


def _make_leaf(name: str, ca: str, cn: str, extensions: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=cwd,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: it makes the test certificates")
    d = tmp_path_factory.mktemp("pki")
    _make_ca("ca", d)
    _make_ca("rogue-ca", d)
    _make_leaf(
        "server", "ca", "127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", d,
    )  # fmt: skip
    _make_leaf("client", "ca", "test-client", "extendedKeyUsage=clientAuth\n", d)
    _make_leaf("rogue", "rogue-ca", "rogue-client", "extendedKeyUsage=clientAuth\n", d)
    return Pki(
        d, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
        d / "client.key", d / "rogue.pem", d / "rogue.key",
    )  # fmt: skip


def tls_connect(
    address: Any, ctx: ssl.SSLContext, hostname: str = "127.0.0.1", **wrap: Any
) -> ssl.SSLSocket:
    raw = connect(address)
    try:
        return ctx.wrap_socket(raw, server_hostname=hostname, **wrap)
    finally:
        raw.close()  # detached by wrap_socket: this only matters if wrapping failed


def tls_line(sock: ssl.SSLSocket, line: bytes) -> bytes:
    """Send one line to a TlsLine handler and read its reply to the end."""
    sock.sendall(line)
    return recv_to_eof(sock)


# -- TLS --------------------------------------------------------------------------------


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


# -- PROXY protocol headers, by hand ------------------------------------------------------

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(src: str, sport: int, dst: str = "", dport: int = 443) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    dst = dst or ("2001:db8::2" if family == "TCP6" else "192.0.2.2")
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, sport: int, dst: str = "", dport: int = 443, tlvs: bytes = b"") -> bytes:
    source = ipaddress.ip_address(src)
    dest = ipaddress.ip_address(dst or ("2001:db8::2" if source.version == 6 else "192.0.2.2"))
    family = 0x21 if source.version == 6 else 0x11
    body = source.packed + dest.packed + struct.pack("!HH", sport, dport) + tlvs
    return SIG + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def v2_local(body: bytes = b"", family: int = 0x00) -> bytes:
    return SIG + bytes([0x20, family]) + struct.pack("!H", len(body)) + body


# What follows the header: bytes that look like another header must reach the
# handler as they are.
PAYLOAD = b"PROXY TCP4 9.9.9.9 9.9.9.9 9 9\r\n" + SIG + bytes(range(256)) * 8

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


def proxy_listener(**settings: Any) -> str:
    return listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True, **settings)


def proxied(server: ServerProcess, header: bytes, payload: bytes = PAYLOAD) -> bytes:
    """One client: header and payload in one send; the proxy_report reply."""
    with connect(tcp_at(server, 0)) as sock:
        return send_and_read(sock, header + payload)


def proxied_unserved(server: ServerProcess, header: bytes, payload: bytes = PAYLOAD) -> bytes:
    """Like proxied(), for a client that is to be closed unserved: a reset is a close too."""
    with connect(tcp_at(server, 0)) as sock:
        return unserved(sock, header + payload)


def expected(host: str, port: int, payload: bytes = PAYLOAD) -> bytes:
    return f"{host} {port}\n".encode() + payload


class ParentWatch:
    """Tells when the parent has looked at what a client sent and gone back
    to waiting: it blocked (a voluntary context switch) after the bytes had
    arrived.  Lets a test hand the parent a header in pieces, each seen on
    its own, without sleeping."""

    def __init__(self, server: ServerProcess, port: int) -> None:
        self.process = psutil.Process(server.pid)
        self.port = port

    def _switches(self) -> int:
        return int(self.process.num_ctx_switches().voluntary)

    def _waiting(self) -> bool:
        return bool(self.process.status() == psutil.STATUS_SLEEPING)

    def idle(self) -> int:
        """Wait until the parent has accepted every connection and is waiting."""
        wait_until(lambda: accept_queue_length(self.port) == 0, 10, "the parent to accept")
        wait_until(self._waiting, 10, "the parent to wait")
        return self._switches()

    def send(self, sock: socket.socket, data: bytes) -> None:
        """Send *data* and wait until the parent has been woken by it and waits again."""
        before = self.idle()
        sock.sendall(data)
        wait_until(lambda: self._switches() > before and self._waiting(), 10, "the parent to read")


# -- PROXY protocol: the claimed source --------------------------------------------------


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


# -- PROXY protocol: connections closed without the handler ----------------------------

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


# -- PROXY protocol: admission by the claimed source ------------------------------------


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


# -- TLS behind PROXY ---------------------------------------------------------------------


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


# -- configuration errors -----------------------------------------------------------------


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
