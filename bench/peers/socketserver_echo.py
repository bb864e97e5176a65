#!/usr/bin/env python3
"""The stdlib baseline: ``socketserver.ForkingTCPServer`` serving forkserver's echo loop.

    python bench/peers/socketserver_echo.py [--host 127.0.0.1] [--port 0]
                                            [--max-children 40] [--backlog 5]

Prints the bound port on stdout (one line, flushed) once it is listening, then
serves until killed.  The handler is the loop of ``forkserver.examples.echo``,
copied rather than imported so this process loads nothing but the standard
library.  ``--backlog`` sets ``request_queue_size`` (socketserver's default is
5; bench/compare.py gives every server the same backlog).
"""

from __future__ import annotations

import argparse
import socketserver
import sys

BUFSIZE = 65536


class EchoHandler(socketserver.BaseRequestHandler):
    """Echo bytes back as they arrive until the peer closes (as forkserver's EchoHandler)."""

    def handle(self) -> None:
        conn = self.request
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        while True:
            n = conn.recv_into(buf)
            if n == 0:
                return
            conn.sendall(view[:n])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-children", type=int, default=40)
    parser.add_argument("--backlog", type=int, default=5)
    args = parser.parse_args()
    server = socketserver.ForkingTCPServer(
        (args.host, args.port), EchoHandler, bind_and_activate=False
    )
    server.allow_reuse_address = True
    server.max_children = args.max_children
    server.request_queue_size = args.backlog
    server.server_bind()
    server.server_activate()
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
