"""The classic echo server: send back every byte until the peer closes."""

from __future__ import annotations

from forkserver import BaseHandler

BUFSIZE = 65536


class EchoHandler(BaseHandler):
    """Echo bytes back as they arrive; TCP is a stream, so no framing is assumed."""

    def handle(self) -> None:
        conn = self.request
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        while True:
            n = conn.recv_into(buf)
            if n == 0:  # the peer closed (or half-closed) its side
                return
            conn.sendall(view[:n])
