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
  ``os._exit``;
- and, as forkserver does, the parent runs that path a few times before
  the first fork, so that the children inherit it warm (``warm``).

No limits, no logging, no graceful stop (SIGTERM and SIGINT end the loop):
what forkserver adds over this is what its features cost.  Prints the bound
port (one line) once listening; serves until killed.

``--landlock-read PATH`` and ``--seccomp BPF_FILE`` make it the floor of a
sandboxed child (bench/sandbox.py): the parent builds the Landlock ruleset
and reads the classic BPF once, and each child makes the three calls a
sandbox needs and nothing else (prctl(PR_SET_NO_NEW_PRIVS),
landlock_restrict_self, prctl(PR_SET_SECCOMP)), through the cheapest ctypes
calls we know: one function object each, every argument converted in the
parent.
"""

import _signal
import gc
import os
import select
import signal
import socket
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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


# (function, args) for each sandbox call a child makes, prepared by sandbox(),
# and the ctypes objects their arguments point into, kept alive.
SANDBOX: "list[tuple[Any, tuple[object, ...]]]" = []
_KEPT: list[object] = []


def sandbox(landlock_read: str | None, seccomp: str | None) -> None:
    """Prepare the calls: what forkserver/sandbox/ does, at its barest."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    prctl, syscall = libc.prctl, libc.syscall
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    syscall.restype = ctypes.c_long
    SANDBOX.append((prctl, (38, 1, 0, 0, 0)))  # PR_SET_NO_NEW_PRIVS
    if landlock_read:
        rights = (1 << 16) - 1  # every filesystem right of ABI 5+
        attr = ctypes.c_uint64(rights)
        ruleset = syscall(ctypes.c_long(444), ctypes.byref(attr), ctypes.c_size_t(8), 0)

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))

        beneath = os.open(landlock_read, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(1 | 4 | 8, beneath)  # execute, read files, read directories
        if ruleset < 0 or syscall(ctypes.c_long(445), ruleset, 1, ctypes.byref(rule), 0):
            raise OSError(ctypes.get_errno(), "landlock ruleset")
        os.close(beneath)
        SANDBOX.append((syscall, (ctypes.c_long(446), ruleset, 0)))  # landlock_restrict_self
    if seccomp:
        with open(seccomp, "rb") as f:
            code = f.read()

        class Fprog(ctypes.Structure):
            _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))

        buffer = ctypes.create_string_buffer(code, len(code))
        fprog = Fprog(len(code) // 8, ctypes.addressof(buffer))
        SANDBOX.append((prctl, (22, 2, ctypes.addressof(fprog), 0, 0)))  # PR_SET_SECCOMP
        _KEPT.extend((buffer, fprog))
    prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS: the first call's set-up done here


def serve_connection(family: int, fd: int, peer: object) -> None:
    """The handler on connection *fd*, then shutdown and close."""
    conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
    try:
        Handler(conn, peer)
    finally:
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()


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
        for function, args in SANDBOX:
            if function(*args) != 0:
                return
        serve_connection(family, fd, peer)
        status = 0
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def warm(family: int) -> None:
    """Run the child's path a few times in the parent, on a socketpair whose
    other end is shut (the handler sees EOF at once), as forkserver's
    child/warm.py does: CPython rewrites bytecode with specialized
    instructions on its first runs and fills its type caches, and done here,
    every child inherits that instead of writing (so copying) those pages."""
    a, b = socket.socketpair()
    with a, b:
        b.shutdown(socket.SHUT_WR)
        # 10, as forkserver: CPython 3.11 quickens a function at its 8th call.
        for _ in range(10):
            serve_connection(family, os.dup(a.fileno()), None)


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


def listening(opts: dict[str, str]) -> tuple[socket.socket, int]:
    """The bound listener (--host, --port, --backlog), and the read end of the
    signals' wakeup pipe, with HANDLED caught."""
    host = opts.get("--host", "127.0.0.1")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(opts.get("--port", "0"))))
    sock.listen(int(opts.get("--backlog", "128")))
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.set_wakeup_fd(w)
    for signum in HANDLED:
        _signal.signal(signum, lambda signum, frame: None)
    return sock, r


def main(argv: list[str]) -> None:
    opts = dict(zip(argv[0::2], argv[1::2], strict=False))
    sock, r = listening(opts)
    sock.setblocking(False)
    if "--landlock-read" in opts or "--seccomp" in opts:
        sandbox(opts.get("--landlock-read"), opts.get("--seccomp"))
    warm(sock.family)
    os.write(1, b"%d\n" % sock.getsockname()[1])
    gc.freeze()
    gc.disable()
    serve(sock, r)


if __name__ == "__main__":
    main(sys.argv[1:])
