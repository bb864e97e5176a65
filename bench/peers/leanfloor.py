"""The floor of fork-per-connection in Python: the least such a server can do.

    python -S -I bench/peers/leanfloor.py [--host 127.0.0.1] [--port 0] [--backlog 128]

Prints the bound port on stdout (one line) once it is listening, then serves
until killed.  Everything a Python server could skip is skipped: no ``site``
(``-S -I``), no argparse, the collector frozen and off, ``socket._accept()``
(a bare fd, no socket object), ``os.read``/``os.write`` in the child, and no
signal handler: the parent reaps with ``waitpid(-1, WNOHANG)`` after each
accept, and when idle (``SO_RCVTIMEO`` makes a blocking ``accept`` give up
after 50 ms, so zombies go without a timer or an extra system call per
connection).  No limits, no logging, no stop.  Its C twin is
bench/peers/forkecho.c; bench/peers/forkecho.py is the same loop written the
ordinary way (socket objects, a SIGCHLD handler).
"""

import gc
import os
import socket
import struct
import sys

BUFSIZE = 65536  # as forkserver.examples.echo
IDLE_REAP = 0.05  # seconds a blocked accept() waits before reaping zombies


def child(listener: int, fd: int) -> None:
    """Echo *fd* to EOF; never returns into the parent's loop."""
    status = 1
    try:
        os.close(listener)
        while data := os.read(fd, BUFSIZE):
            sent = os.write(fd, data)
            while sent < len(data):
                sent += os.write(fd, data[sent:])
        status = 0
    finally:
        os._exit(status)


def serve(sock: socket.socket) -> None:
    accept, fork, close, waitpid = sock._accept, os.fork, os.close, os.waitpid  # type: ignore[attr-defined]
    listener, nohang = sock.fileno(), os.WNOHANG
    live = 0
    while True:
        try:
            fd, _ = accept()
        except OSError:  # SO_RCVTIMEO expired (EAGAIN), or EMFILE and the like
            fd = -1
        if fd >= 0:
            if fork() == 0:
                child(listener, fd)
            close(fd)
            live += 1
        while live and waitpid(-1, nohang)[0]:
            live -= 1


def main(argv: list[str]) -> None:
    opts = dict(zip(argv[0::2], argv[1::2], strict=False))
    host = opts.get("--host", "127.0.0.1")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(opts.get("--port", "0"))))
    sock.listen(int(opts.get("--backlog", "128")))
    usec = int(IDLE_REAP * 1e6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, usec))
    os.write(1, b"%d\n" % sock.getsockname()[1])
    gc.freeze()
    gc.disable()
    try:
        serve(sock)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
