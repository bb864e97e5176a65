"""PROXY protocol headers built by hand, byte by byte (so the tests do not
depend on forkserver's own parser), and clients that send them."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import psutil

from tests.helpers.clients import accept_queue_length, connect, send_and_read
from tests.helpers.servers import ServerProcess, wait_until
from tests.helpers.transports import PROXY_REPORT, listen, tcp_at

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


# What follows the header: bytes that look like another header must reach the
# handler as they are.
PAYLOAD = b"PROXY TCP4 9.9.9.9 9.9.9.9 9 9\r\n" + SIG + bytes(range(256)) * 8


def proxy_listener(**settings: Any) -> str:
    return listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True, **settings)


def proxied(server: ServerProcess, header: bytes, payload: bytes = PAYLOAD) -> bytes:
    """One client: header and payload in one send; the proxy_report reply."""
    with connect(tcp_at(server, 0)) as sock:
        return send_and_read(sock, header + payload)


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


def proxied_at(address: Any, data: bytes) -> bytes:
    with connect(address) as sock:
        return send_and_read(sock, data)
