"""The classic echo server: send back every byte until the peer closes."""

from __future__ import annotations

from forkserver import BaseHandler

BUFSIZE = 65536


class EchoHandler(BaseHandler):
    """Echo bytes back as they arrive; TCP is a stream, so no framing is assumed."""

    def handle(self) -> None:
        conn = self.request
        # recv() rather than recv_into() a preallocated buffer: a 64 KiB
        # bytearray is 16 zero-filled pages touched in every child, while
        # recv() only touches what actually arrives.
        while data := conn.recv(BUFSIZE):  # b"": the peer closed its side
            conn.sendall(data)


class DatagramEchoHandler(BaseHandler):
    """UDP echo: send each datagram back to its sender, whole (UDP keeps
    message boundaries, unlike TCP)."""

    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)
