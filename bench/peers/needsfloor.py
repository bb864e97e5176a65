"""The floor with what forkserver must do: the lean loop plus the product's needs.

    python -S -I bench/peers/needsfloor.py [--host 127.0.0.1] [--port 0] [--backlog 128]

bench/peers/leanfloor.py is the least a Python fork-per-connection server can
do.  This is the least one can do while keeping the promises forkserver
makes, each written the cheapest way we know, in one function, and nothing
else:

- the parent sleeps in an epoll loop (so signals, timers and other fds can
  wake it), with SIGTERM, SIGINT, SIGHUP... routed to a wakeup fd by
  ``set_wakeup_fd``, and blocked across ``fork()``;
- it reaps only its own children, each through its own pidfd (a program
  embedding the server keeps its children's statuses);
- a child puts the parent's signals back to their defaults, closes the
  listener and the epoll fd, serves a ``socket.socket`` object through a
  socketserver-style handler instance (``setup``/``handle``/``finish``),
  shuts down and closes the connection, flushes stdio and leaves with
  ``os._exit``.

No limits, no logging, no graceful stop (SIGTERM and SIGINT end the loop):
what forkserver adds over this is what its features cost.  Prints the bound
port (one line) once listening; serves until killed.
"""

import _signal
import gc
import os
import select
import signal
import socket
import sys

BUFSIZE = 65536  # as forkserver.examples.echo
# Plain ints: the calls go through _signal (signal.py wraps results in enums).
STOP = {int(signal.SIGTERM), int(signal.SIGINT)}
HANDLED = (*STOP, int(signal.SIGHUP), int(signal.SIGQUIT), int(signal.SIGUSR1))


class Handler:
    """socketserver's BaseRequestHandler, with forkserver.examples.echo's handle()."""

    def __init__(self, request: socket.socket, client_address: object) -> None:
        self.request = request
        self.client_address = client_address
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        pass

    def handle(self) -> None:
        conn = self.request
        while data := conn.recv(BUFSIZE):
            conn.sendall(data)

    def finish(self) -> None:
        pass


def child(closes: tuple[int, ...], fd: int, family: int, peer: object) -> None:
    """Serve *fd*; never returns into the parent's loop."""
    status = 1
    try:
        _signal.set_wakeup_fd(-1)
        for signum in HANDLED:
            _signal.signal(signum, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, HANDLED)
        for parent_fd in closes:
            os.close(parent_fd)
        conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        try:
            Handler(conn, peer)
        finally:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.close()
        status = 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve(sock: socket.socket, wakeup: int) -> None:
    ep = select.epoll()
    listener = sock.fileno()
    ep.register(listener, select.EPOLLIN)
    ep.register(wakeup, select.EPOLLIN)
    accept, fork, close, poll = sock._accept, os.fork, os.close, ep.poll  # type: ignore[attr-defined]
    pidfd_open, waitpid, family = os.pidfd_open, os.waitpid, sock.family
    closes = (listener, ep.fileno(), wakeup)
    block, unblock, sigmask = _signal.SIG_BLOCK, _signal.SIG_UNBLOCK, _signal.pthread_sigmask
    children: dict[int, tuple[int, object]] = {}  # pidfd: (pid, peer)
    while True:
        for fd, _ in poll():
            if fd == listener:
                try:
                    conn, peer = accept()
                except OSError:
                    continue
                sigmask(block, HANDLED)
                pid = fork()
                if pid == 0:
                    child(closes, conn, family, peer)
                sigmask(unblock, HANDLED)
                close(conn)
                pidfd = pidfd_open(pid)
                children[pidfd] = (pid, peer)
                ep.register(pidfd, select.EPOLLIN)
            elif fd == wakeup:
                if STOP & set(os.read(wakeup, 512)):
                    return  # no graceful stop here: the children are left to finish
            else:
                pid, _ = children.pop(fd)
                ep.unregister(fd)
                close(fd)
                waitpid(pid, 0)


def main(argv: list[str]) -> None:
    opts = dict(zip(argv[0::2], argv[1::2], strict=False))
    host = opts.get("--host", "127.0.0.1")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(opts.get("--port", "0"))))
    sock.listen(int(opts.get("--backlog", "128")))
    sock.setblocking(False)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.set_wakeup_fd(w)
    for signum in HANDLED:
        _signal.signal(signum, lambda signum, frame: None)
    os.write(1, b"%d\n" % sock.getsockname()[1])
    gc.freeze()
    gc.disable()
    serve(sock, r)


if __name__ == "__main__":
    main(sys.argv[1:])
