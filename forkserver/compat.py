"""socketserver's forking classes, name for name: ``from forkserver import ForkingTCPServer``.

Each class is built as socketserver builds it (the constructor makes
``self.socket`` from ``address_family`` and ``socket_type``, then calls
``server_bind()`` and ``server_activate()``, which a subclass may override),
and is served by forkserver's parent: children reaped through their pidfds
(never a process the program started itself), signals only waking the loop,
no polling.  docs/migrating.md lists every socketserver name and what
forkserver does with it.

Named ``compat``, not ``socketserver``: a module of the stdlib's name inside
the package would shadow the real one for any script run from this directory.
"""

from __future__ import annotations

import os
import socket

from .addresses import host_port
from .listeners import Listener
from .server import Server

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .handlers import HandlerType

__all__ = [
    "ForkingMixIn",
    "ForkingTCPServer",
    "ForkingUDPServer",
    "ForkingUnixDatagramServer",
    "ForkingUnixStreamServer",
    "TCPServer",
    "UDPServer",
    "UnixDatagramServer",
    "UnixStreamServer",
]


class TCPServer(Server):
    """socketserver.TCPServer's construction and hooks; every request gets its own child."""

    address_family = socket.AF_INET
    socket_type = socket.SOCK_STREAM
    request_queue_size = 5
    allow_reuse_address = False  # as socketserver: set True in a subclass for quick restarts
    allow_reuse_port = False
    max_children = 40  # socketserver's ForkingMixIn limit; forkserver's Settings default differs

    def __init__(
        self,
        server_address: Any,
        RequestHandlerClass: HandlerType,  # socketserver's parameter name
        bind_and_activate: bool = True,
    ) -> None:
        from .config import Settings

        settings = Settings(
            host=(), max_children=self.max_children, backlog=max(1, self.request_queue_size)
        )
        self._setup(settings, RequestHandlerClass)
        self.server_address = server_address
        self.socket = socket.socket(self.address_family, self.socket_type)
        if bind_and_activate:
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

    def server_bind(self) -> None:
        """Bind ``self.socket`` to ``self.server_address`` (socketserver's own)."""
        if self.allow_reuse_address and hasattr(socket, "SO_REUSEADDR"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.allow_reuse_port and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """listen(request_queue_size), on a stream socket."""
        if self.socket_type == socket.SOCK_STREAM:
            self.socket.listen(self.request_queue_size)

    def _ready_to_serve(self) -> None:
        """Before serving: the bound socket becomes forkserver's listener."""
        if self.listeners:
            return
        from .config.listen import Listen
        from .service import build_services

        sock = self.socket
        sock.setblocking(False)  # the loop accepts on readiness; the drain until EAGAIN
        address = sock.getsockname()
        datagram = sock.type == socket.SOCK_DGRAM
        inode = None
        if sock.family == socket.AF_UNIX:
            st = os.stat(address)  # so that server_close() unlinks only our own file
            inode = (st.st_dev, st.st_ino)
            spec = Listen(unix_datagram=address) if datagram else Listen(unix=address)
        else:
            shown = host_port(address[0], address[1])
            spec = Listen(udp=shown) if datagram else Listen(tcp=shown)
        listener = Listener(sock, inode, spec.key)
        self.listeners = [listener]
        build_services([spec], self.listeners, self.finish_request, self)
        self._services = [listener.service] if listener.service is not None else []


class UDPServer(TCPServer):
    """socketserver.UDPServer: a child per datagram; ``request`` is ``(data, socket)``."""

    socket_type = socket.SOCK_DGRAM
    allow_reuse_address = False
    max_packet_size = 8192


class UnixStreamServer(TCPServer):
    address_family = socket.AF_UNIX


class UnixDatagramServer(UDPServer):
    address_family = socket.AF_UNIX


class ForkingMixIn:
    """socketserver.ForkingMixIn's settings, for forkserver's servers.

    forkserver's servers fork already: mixing this in sets socketserver's
    ForkingMixIn values (``timeout = 300``, ``max_children = 40``,
    ``block_on_close = True``); ``active_children`` and ``collect_children()``
    come from :class:`forkserver.Server`.  It cannot make a stdlib
    socketserver class fork through forkserver: that raises TypeError."""

    timeout: float | None = 300
    max_children = 40
    block_on_close = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not issubclass(cls, Server):
            raise TypeError(
                f"{cls.__name__}: forkserver.ForkingMixIn goes with forkserver's servers "
                "(forkserver.TCPServer, UDPServer, UnixStreamServer, UnixDatagramServer)"
            )


class ForkingTCPServer(ForkingMixIn, TCPServer):
    pass


class ForkingUDPServer(ForkingMixIn, UDPServer):
    pass


class ForkingUnixStreamServer(ForkingMixIn, UnixStreamServer):
    pass


class ForkingUnixDatagramServer(ForkingMixIn, UnixDatagramServer):
    pass
