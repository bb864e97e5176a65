#!/usr/bin/env python3
"""The floor of fork-per-connection *in Python*: the least such a server can do.

    python bench/peers/forkecho.py [--host 127.0.0.1] [--port 0] [--backlog 128]

Prints the bound port on stdout (one line, flushed) once it is listening, then
serves until killed.  The parent accepts, forks and closes its copy, and
reaps in a SIGCHLD handler; the child closes the listener, echoes to EOF and
leaves with ``os._exit``.  No limits, no logging, no admission, no graceful
stop: nothing else a real server needs.  What it costs is what a Python
server cannot get below on this machine: the interpreter's fork and exit,
and the copy-on-write faults of running Python code in a child.  Its C twin
is bench/peers/forkecho.c.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import sys
from types import FrameType

BUFSIZE = 65536  # as forkserver.examples.echo


def serve(sock: socket.socket) -> None:
    while True:
        conn, _ = sock.accept()
        if os.fork() == 0:
            sock.close()
            while data := conn.recv(BUFSIZE):
                conn.sendall(data)
            conn.close()
            os._exit(0)
        conn.close()


def reap(signum: int, frame: FrameType | None) -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--backlog", type=int, default=128)
    parser.add_argument("--max-children", type=int, default=0, help="ignored")
    args = parser.parse_args()
    sock = socket.create_server((args.host, args.port), backlog=args.backlog)
    print(sock.getsockname()[1], flush=True)
    signal.signal(signal.SIGCHLD, reap)  # accept() is retried after it (PEP 475)
    gc.freeze()
    try:
        serve(sock)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
