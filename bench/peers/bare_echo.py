#!/usr/bin/env python3
"""The bare loop: one process, one connection at a time, ``recv``/``sendall`` until EOF.

    python bench/peers/bare_echo.py [--host 127.0.0.1] [--port 0] [--backlog 16]

Prints the bound port on stdout (one line, flushed) once it is listening, then
serves until killed: ``accept()``, then ``while data := conn.recv(65536):
conn.sendall(data)`` (the loop of ``forkserver.examples.echo``, copied so this
process loads nothing but the standard library), then close.  No fork, no
framework: what bench/bulk.py holds forkserver's per-connection throughput to.
"""

from __future__ import annotations

import argparse
import socket
import sys

BUFSIZE = 65536  # as forkserver.examples.echo


def serve(sock: socket.socket) -> None:
    """Echo each accepted connection to EOF, one after another, forever."""
    while True:
        conn, _ = sock.accept()
        with conn:
            try:
                while data := conn.recv(BUFSIZE):
                    conn.sendall(data)
            except OSError:
                pass  # the client reset or went away: next connection


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=16)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(args.backlog)
    print(sock.getsockname()[1], flush=True)
    try:
        serve(sock)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
