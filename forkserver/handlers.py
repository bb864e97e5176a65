"""Handlers: what a child runs for its one connection.

A handler is either a class with socketserver's contract, constructed as
``Handler(request, client_address, server)`` and running ``setup()``,
``handle()`` and ``finish()`` from its constructor (so every
``socketserver.BaseRequestHandler`` subclass works unchanged), or a plain
callable ``handler(conn, addr)``.  In a config file it is named
``"module:attr"`` and imported once in the parent, before the first fork.
"""

from __future__ import annotations

import importlib
import io
import socket
import sys

from .errors import ConfigError

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeAlias

    HandlerType: TypeAlias = Callable[..., Any]

__all__ = ["BaseHandler", "DatagramHandler", "HandlerType", "StreamHandler", "import_handler"]


class BaseHandler:
    """socketserver's request-handler contract.

    Override :meth:`handle` (and optionally :meth:`setup` and :meth:`finish`).
    ``request`` is the connected socket, ``client_address`` the peer's address,
    ``server`` the :class:`forkserver.Server` that forked this child.
    """

    def __init__(self, request: Any, client_address: Any, server: Any) -> None:
        self.request = request
        self.client_address = client_address
        self.server = server
        self.setup()
        try:
            self.handle()
        finally:
            self.finish()

    def setup(self) -> None:
        pass

    def handle(self) -> None:
        pass

    def finish(self) -> None:
        pass


class StreamHandler(BaseHandler):
    """A handler with buffered ``rfile`` (reads) and ``wfile`` (writes).

    Like socketserver's StreamRequestHandler: ``timeout`` (seconds, or None)
    bounds every socket operation, ``wbufsize = 0`` writes straight through.
    """

    rbufsize = -1
    wbufsize = 0
    timeout: float | None = None
    disable_nagle_algorithm = False

    rfile: io.BufferedIOBase
    wfile: io.BufferedIOBase

    def setup(self) -> None:
        self.connection = self.request
        if self.timeout is not None:
            self.connection.settimeout(self.timeout)
        if self.disable_nagle_algorithm and self.connection.family != socket.AF_UNIX:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = self.connection.makefile("rb", self.rbufsize)
        if self.wbufsize == 0:
            self.wfile = _SocketWriter(self.connection)
        else:
            self.wfile = self.connection.makefile("wb", self.wbufsize)

    def finish(self) -> None:
        if not self.wfile.closed:
            try:
                self.wfile.flush()
            except OSError:
                pass  # the peer went away; nothing left to deliver to
        self.wfile.close()
        self.rfile.close()


class DatagramHandler(BaseHandler):
    """For UDP listeners, like socketserver's DatagramRequestHandler.

    ``request`` is ``(data, socket)``: ``rfile`` reads the datagram, and what
    :meth:`handle` writes to ``wfile`` is sent back to ``client_address`` in
    one datagram (if anything was written).
    """

    rfile: io.BytesIO
    wfile: io.BytesIO

    def setup(self) -> None:
        self.packet, self.socket = self.request
        self.rfile = io.BytesIO(self.packet)
        self.wfile = io.BytesIO()

    def finish(self) -> None:
        reply = self.wfile.getvalue()
        if reply:
            self.socket.sendto(reply, self.client_address)


class _SocketWriter(io.BufferedIOBase):
    """Unbuffered writer whose write() sends everything (sendall), not a prefix."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


def import_handler(spec: str, source: str = "") -> HandlerType:
    """Resolve ``"module:attr"`` (attr may be dotted) to a class or callable.

    *source* (a config path, or "command line") prefixes error messages."""
    try:
        return _import_handler(spec)
    except ConfigError as exc:
        if not source:
            raise
        raise ConfigError(f"{source}: {exc}") from exc.__cause__


def _import_handler(spec: str) -> HandlerType:
    if spec.startswith(EXEC_PREFIX):
        return ExecHandler.from_spec(spec)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f'server.handler must be "module:attr", got "{spec}"')
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f'server.handler: no module named {exc.name!r} (from "{spec}"; '
                f"sys.path[0] is {sys.path[0]!r})"
            ) from None
        raise ConfigError(f"server.handler: importing {module_name!r} failed: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(
            f"server.handler: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(
                f"server.handler: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(target):
        kind = type(target).__name__
        article = "an" if kind[0] in "aeiou" else "a"
        raise ConfigError(f'server.handler: "{spec}" is {article} {kind}, not a class or function')
    return target  # type: ignore[no-any-return]


EXEC_PREFIX = "exec:"


class ExecHandler:
    """An inetd/tcpserver-style service: ``handler = "exec:/usr/bin/prog arg"``.

    The command is split into words (quotes respected) and executed directly,
    never through a shell, with the connection as its stdin and stdout and the
    UCSPI environment: PROTO, TCPREMOTEIP, TCPREMOTEPORT, TCPLOCALIP,
    TCPLOCALPORT. Its exit status is the child's; stderr stays the server's.
    """

    def __init__(self, path: str, argv: list[str]) -> None:
        self.path = path
        self.argv = argv
        self.__qualname__ = f"exec {path}"

    @classmethod
    def from_spec(cls, spec: str) -> ExecHandler:
        import shlex  # only for exec services: the parent stays lean otherwise

        try:
            argv = shlex.split(spec[len(EXEC_PREFIX) :])
        except ValueError as exc:
            raise ConfigError(f'server.handler: "{spec}": {exc}') from None
        if not argv:
            raise ConfigError(f'server.handler: "{spec}" names no program')
        path = _find_program(argv[0])
        if path is None:
            raise ConfigError(
                f'server.handler: "{spec}": no executable {argv[0]!r} (PATH is searched '
                "when the name has no slash)"
            )
        return cls(path, argv)

    def __call__(self, conn: Any, addr: Any) -> None:
        import os
        import socket

        env = dict(os.environ)
        # By the client's address, not the socket's family: through the PROXY
        # protocol a TCP client may arrive on a Unix socket.
        if isinstance(addr, tuple):
            local = conn.getsockname() if conn.family != socket.AF_UNIX else ("", "")
            env.update(
                PROTO="TCP",
                TCPREMOTEIP=str(addr[0]),
                TCPREMOTEPORT=str(addr[1]),
                TCPLOCALIP=str(local[0]),
                TCPLOCALPORT=str(local[1]),
            )
        else:
            env["PROTO"] = "UNIX"
        fd = conn.fileno()
        os.dup2(fd, 0)
        os.dup2(fd, 1)  # dup2 clears close-on-exec on the copies
        os.execve(self.path, self.argv, env)  # raises only if the exec fails


def _find_program(name: str) -> str | None:
    import os

    candidates = [name] if "/" in name else [
        os.path.join(d, name) for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d
    ]  # fmt: skip
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    return None


def is_handler_class(handler: HandlerType) -> bool:
    """Classes get socketserver's (request, client_address, server) call."""
    return isinstance(handler, type)
