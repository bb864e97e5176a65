"""socketserver's request hooks with forkserver's defaults: the half of Server one overrides.

``get_request``, ``verify_request``, ``process_request``, ``close_request``
and ``shutdown_request`` run in the parent; an override of any of them puts
the server's listeners on the hook path (``parent/hooks.py``), decided once
when serving starts.  ``finish_request`` and ``handle_error`` run in the
child (server.py), ``handle_request``, ``handle_timeout``,
``service_actions`` and ``collect_children`` in the parent, as in
socketserver.
"""

from __future__ import annotations

import socket as _socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .listeners import Listener
    from .parent.hooks import Requests
    from .parent.parent import Parent

__all__ = ["PARENT_HOOKS", "RequestHooks", "overridden"]

# The hooks that put a server on this path when a subclass overrides one.
PARENT_HOOKS = (
    "get_request",
    "verify_request",
    "process_request",
    "close_request",
    "shutdown_request",
)


def overridden(server: object, base: type, names: tuple[str, ...]) -> list[str]:
    """Which of *names* ``type(server)`` defines differently from *base*."""
    cls = type(server)
    return [name for name in names if getattr(cls, name, None) is not getattr(base, name, None)]


class RequestHooks:
    """The request hooks of socketserver's BaseServer; :class:`forkserver.Server` has them."""

    # What the hooks use of the Server they are part of (server.py).
    _parent: Parent
    _hooks: Requests | None
    _serving: bool
    listeners: list[Listener]
    timeout: float | None
    max_packet_size: int

    @property
    def socket(self) -> _socket.socket:
        raise NotImplementedError  # server.py

    def _ready_to_serve(self) -> None:
        raise NotImplementedError  # server.py

    @property
    def _requests(self) -> Requests:
        """The hook path (parent/hooks.py), imported only by a server that uses it:
        the default path's parent holds no page of it."""
        if self._hooks is None:
            from .parent.hooks import Requests

            self._hooks = Requests(self, self._parent)
        return self._hooks

    def get_request(self) -> tuple[Any, Any]:
        """In the parent: accept a connection (``(sock, address)``), or read a
        datagram (``((data, sock), address)``), from the listener that is ready."""
        listener = self._requests.ready or self.listeners[0]
        if listener.datagram:
            data, address = listener.sock.recvfrom(self.max_packet_size)
            return (data, listener.sock), address
        return listener.sock.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """In the parent, before any fork: False shuts the request down unserved."""
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """In the parent: fork a child that runs finish_request() and
        shutdown_request(), then close_request() here."""
        self._requests.fork(request, client_address)

    def close_request(self, request: Any) -> None:
        """Close the parent's copy of a connection (nothing for a datagram)."""
        if not isinstance(request, tuple):
            request.close()

    def shutdown_request(self, request: Any) -> None:
        """Shut a connection down (SHUT_WR: the client sees EOF) and close it."""
        if not isinstance(request, tuple):
            try:
                request.shutdown(_socket.SHUT_WR)
            except OSError:
                pass  # already reset or shut down by the peer
        self.close_request(request)

    def handle_request(self) -> None:
        """Serve one request, waiting at most ``timeout`` seconds (then
        handle_timeout()); the socket's own timeout counts too, as in socketserver."""
        self._ready_to_serve()
        timeout = self.socket.gettimeout() or None  # 0.0: the listener is non-blocking
        if timeout is None:
            timeout = self.timeout
        elif self.timeout is not None:
            timeout = min(timeout, self.timeout)
        acceptor = self._parent.acceptor
        if not acceptor.listeners:  # a child closes them (fork.py asks the acceptor)
            acceptor.listeners = self.listeners
            acceptor.changed()
        self._requests.handle_request(timeout)

    def handle_timeout(self) -> None:
        """handle_request() waited ``timeout``: reap the children that exited."""
        self.collect_children()

    def service_actions(self) -> None:
        """Called by serve_forever() every *poll_interval* when overridden
        (forkserver reaps through pidfds, with no polling of its own)."""
        self.collect_children()

    def collect_children(self, *, blocking: bool = False) -> None:
        """Reap the children that exited (waiting for all if *blocking*).
        Only outside serve_forever(): its loop reaps each child as it exits."""
        if not self._serving and self._parent.children:
            from .parent.hooks import collect

            collect(self._parent, blocking)

    @property
    def active_children(self) -> set[int] | None:
        """The pids of the children still running, or None (as ForkingMixIn)."""
        pids = {child.pid for child in self._parent.children}
        return pids or None
