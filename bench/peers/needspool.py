"""The needs floor with spares: what forkserver's spare_children must do, and no more.

    python -S -E -s bench/peers/needspool.py [--host H] [--port 0] [--backlog 128] [--spares 16]

bench/peers/needsfloor.py forks on accept; this is its pool: the parent keeps
``--spares`` children forked before any connection, and each serves exactly
one connection and exits, as with forkserver's ``spare_children``.  Written
the cheapest way we know, in one file:

- the parent sleeps in epoll, with its signals on a wakeup fd and blocked
  across fork, and reaps only its own children, each through its pidfd;
- a spare puts the signals back, blocks in ``accept()`` on the listener (the
  kernel wakes one blocked accept per connection), writes its pid to the
  busy pipe (the parent must know who serves whom, and replace it), closes
  the listener and the pipe, serves a ``socket.socket`` through a
  socketserver-style handler instance, flushes stdio and leaves;
- the parent forks a replacement for each busy record;
- the parent runs the child's path a few times before the first fork
  (needsfloor.py's ``warm``).

No limits, no logging, no graceful stop (SIGTERM and SIGINT end the loop).
Prints the bound port (one line) once listening; serves until killed.
"""

import _signal
import gc
import os
import select
import socket
import sys

# Its sibling, for the same handler and signals (-S -E -s, not -I: -I would
# leave this directory off sys.path).
from needsfloor import (  # type: ignore[import-not-found]
    HANDLED,
    STOP,
    listening,
    serve_connection,
    warm,
)


def spare(closes: tuple[int, ...], listener: socket.socket, busy: int) -> None:
    """Wait for one connection, serve it; never returns into the parent's loop."""
    status = 1
    try:
        _signal.set_wakeup_fd(-1)
        for signum in HANDLED:
            _signal.signal(signum, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, HANDLED)
        for parent_fd in closes:
            os.close(parent_fd)
        fd, peer = listener._accept()  # type: ignore[attr-defined]
        os.write(busy, os.getpid().to_bytes(4, sys.byteorder))
        os.close(busy)
        listener.close()
        serve_connection(listener.family, fd, peer)
        status = 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def serve(sock: socket.socket, wakeup: int, spares: int) -> None:
    ep = select.epoll()
    busy_r, busy_w = os.pipe2(os.O_CLOEXEC)
    ep.register(busy_r, select.EPOLLIN)
    ep.register(wakeup, select.EPOLLIN)
    closes = (ep.fileno(), wakeup, busy_r)
    block, unblock, sigmask = _signal.SIG_BLOCK, _signal.SIG_UNBLOCK, _signal.pthread_sigmask
    children: dict[int, int] = {}  # pidfd: pid

    def fork_spare() -> None:
        sigmask(block, HANDLED)
        pid = os.fork()
        if pid == 0:
            spare(closes, sock, busy_w)
        sigmask(unblock, HANDLED)
        pidfd = os.pidfd_open(pid)
        children[pidfd] = pid
        ep.register(pidfd, select.EPOLLIN)

    for _ in range(spares):
        fork_spare()
    while True:
        for fd, _ in ep.poll():
            if fd == busy_r:
                for _ in range(len(os.read(busy_r, 4096)) // 4):  # whole records
                    fork_spare()
            elif fd == wakeup:
                if STOP & set(os.read(wakeup, 512)):
                    return  # no graceful stop here: the children are left to finish
            else:
                pid = children.pop(fd)
                ep.unregister(fd)
                os.close(fd)
                os.waitpid(pid, 0)


def main(argv: list[str]) -> None:
    opts = dict(zip(argv[0::2], argv[1::2], strict=False))
    sock, r = listening(opts)
    warm(sock.family)  # the child's path, as in needsfloor.py
    os.write(1, b"%d\n" % sock.getsockname()[1])
    gc.freeze()
    gc.disable()
    serve(sock, r, int(opts.get("--spares", "16")))


if __name__ == "__main__":
    main(sys.argv[1:])
