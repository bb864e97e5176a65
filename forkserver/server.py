"""Server: socketserver's API over the forking parent in ``parent/``.

``Server`` binds its listeners; ``serve_forever()`` hands them to its
:class:`~forkserver.parent.parent.Parent`, which runs the loop (``parent/``)
and forks the children (``child/``).
"""

from __future__ import annotations

import _thread
import os

from . import log
from .addresses import format_address
from .handlers import import_handler, is_handler_class
from .listeners import Listener, open_listeners
from .parent.parent import Parent

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from socket import socket as Socket
    from typing import Any

    from .config import Settings
    from .handlers import HandlerType
    from .parent.children import ChildTable
    from .service import Service

__all__ = ["Server"]

logger = log.get_logger(__name__)

LOG_INTERVAL = log.INTERVAL


def _settings_for_address(server_address: Any) -> dict[str, Any]:
    if isinstance(server_address, str | os.PathLike):
        return {"host": (), "unix": (os.fspath(server_address),)}
    host, port = server_address[0], server_address[1]
    return {"host": (host,), "port": port}


class Server:
    """A forking server; a drop-in for ``socketserver.ForkingTCPServer``.

    ``Server(("127.0.0.1", 0), Handler)`` binds at once (``bind_and_activate``)
    and serves on ``serve_forever()``.  *server_address* is ``(host, port)`` or a
    Unix socket path; *options* are :class:`forkserver.config.Settings` fields
    (``max_children=64``, ``graceful_timeout=5``...).  *handler* is a
    socketserver-style handler class or a function ``handler(conn, addr)``.
    """

    def __init__(
        self,
        server_address: Any,
        handler: HandlerType,
        bind_and_activate: bool = True,
        **options: Any,
    ) -> None:
        from .config import Settings  # the Python API validates like the config file

        settings = Settings(**{**_settings_for_address(server_address), **options})
        self._setup(settings, handler)
        if bind_and_activate:
            self.server_activate()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        handler: HandlerType | None = None,
        listeners: list[Listener] | None = None,
        source: str = "",
    ) -> Server:
        """A server for loaded settings; imports ``settings.handler`` if *handler*
        is None, and adopts already bound *listeners* if given.  *source*
        (the config file) prefixes configuration errors."""
        self = cls.__new__(cls)
        if handler is None and settings.handler:
            handler = import_handler(settings.handler)
        self._setup(settings, handler)
        if listeners:
            self.listeners = list(listeners)
            self._build_services(source)
        return self

    def _setup(self, settings: Settings, handler: HandlerType | None) -> None:
        self.settings = settings
        # None only when every listener has its own handler (service.py).
        self._default_handler = handler
        self.RequestHandlerClass: HandlerType = handler if handler is not None else _no_handler
        self._handler_is_class = is_handler_class(self.RequestHandlerClass)
        self.listeners: list[Listener] = []
        # The metrics endpoint: not a serving listener (never paused, never
        # counted); each scrape is a child forked with a snapshot (metrics/).
        self.metrics_listener: Listener | None = None
        self._services: list[Service] = []
        self._serving = False
        # Held while serve_forever() runs; shutdown() waits on it.  A _thread
        # lock, not threading.Event: see log.py for why threading stays out.
        self._is_shut_down = _thread.allocate_lock()
        # The serving parent; finish_request and handle_error are bound here,
        # so a subclass's overrides are what the children call.
        self._parent = Parent(settings, self.finish_request, self.handle_error)

    @property
    def exiting_after_serve(self) -> bool:
        """Set by the command line (boot.py): the process exits after serving."""
        return self._parent.exiting_after_serve

    @exiting_after_serve.setter
    def exiting_after_serve(self, value: bool) -> None:
        self._parent.exiting_after_serve = value

    def adopt(
        self, argv: list[str], children: list[tuple[int, int, Any, float]], ready_fd: int
    ) -> None:
        """Started by the command line (boot.py): remember its arguments for
        reload and upgrade, adopt the children a reload handed over, and the
        fd on which to say "ready" to the parent an upgrade came from."""
        self._parent.reloader.argv = argv
        self._parent.ready_fd = ready_fd
        self._parent.adopted = list(children)

    # -- socketserver-compatible surface ---------------------------------

    def server_activate(self) -> None:
        """Bind and listen on every configured address (raises BindError)."""
        if not self.listeners or self.listeners[0].closed:
            s = self.settings
            self.listeners = open_listeners(
                s.listeners(), s.backlog, s.unix_mode, reuse_port=s.reuse_port
            )
            try:
                self._build_services()
            except BaseException:
                for listener in self.listeners:
                    listener.close_and_unlink()
                raise
        if self.settings.metrics and (
            self.metrics_listener is None or self.metrics_listener.closed
        ):
            from .listeners import open_metrics_listener

            self.metrics_listener = open_metrics_listener(
                self.settings.metrics, self.settings.backlog
            )

    def _build_services(self, source: str = "") -> None:
        """Each listener's Service (service.py); raises ConfigError."""
        from .service import build_services

        specs = self.settings.listeners()
        build_services(specs, self.listeners, self._default_handler, self, source)
        self._services = [lis.service for lis in self.listeners if lis.service is not None]

    @property
    def server_address(self) -> Any:
        """The first listener's real bound address (port 0 resolved)."""
        return self.listeners[0].address if self.listeners else None

    @property
    def socket(self) -> Socket:
        return self.listeners[0].sock

    def fileno(self) -> int:
        return self.listeners[0].fileno()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server_close()

    def finish_request(self, request: Socket, client_address: Any) -> None:
        """Run the handler for one connection (in the child)."""
        if self._handler_is_class:
            self.RequestHandlerClass(request, client_address, self)
        else:
            self.RequestHandlerClass(request, client_address)

    def handle_error(self, request: Socket, client_address: Any) -> None:
        """Called in the child when the handler raised; logs the traceback."""
        logger.exception("handler failed for %s", format_address(request.family, client_address))

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Serve until SIGTERM/SIGINT/SIGQUIT or shutdown(); returns after the drain.

        *poll_interval* is accepted for socketserver compatibility and ignored:
        the loop sleeps in epoll until there is work.
        """
        self.server_activate()
        with self._is_shut_down:
            self._serve()

    def shutdown(self) -> None:
        """Stop serve_forever() and wait for it; call from another thread.

        As in socketserver, the listeners stay open (connections wait in the
        backlog) until server_close() or the next serve_forever(); children
        get graceful_timeout to finish before serve_forever() returns."""
        self._parent.shutdown_request = True
        if self._parent.pipe is not None:
            self._parent.pipe.wake()
        with self._is_shut_down:
            pass

    def server_close(self) -> None:
        """Close the listeners; stop any children still running.  Idempotent."""
        for listener in self.listeners:
            listener.close_and_unlink()
        self._parent.forker.changed()
        if not self._serving:
            self._parent.close()

    # -- what the metrics snapshot reads (metrics/snapshot.py) -----------------

    @property
    def children(self) -> ChildTable:
        return self._parent.children

    @property
    def accepted(self) -> int:
        return self._parent.accepted

    @property
    def fork_failures(self) -> int:
        return self._parent.acceptor.fork_failures

    @property
    def refused(self) -> dict[str, int]:
        return self._parent.acceptor.refusals.refused

    @property
    def _idle(self) -> set[int]:
        return self._parent.idle

    @property
    def stopping(self) -> bool:
        """A stop (or an upgrade's drain) has begun: /healthz answers 503."""
        return self._parent.stopper.stopping

    # -- serving ---------------------------------------------------------------------

    def _serve(self) -> None:
        parent = self._parent
        parent.metrics_listener = self.metrics_listener
        pid = os.getpid()

        def answer_scrape(conn: Socket, _peer: Any) -> None:
            from . import metrics  # in the scrape child: from its copy of the parent

            metrics.serve_metrics(conn, metrics.snapshot(self, parent_pid=pid))

        self._serving = True
        try:
            parent.serve(
                self.listeners,
                self._services,
                answer_scrape,
                _handler_name(self._default_handler),
                [self.RequestHandlerClass, *(service.handler for service in self._services)],
            )
        finally:
            self._serving = False


def _no_handler(conn: Socket, addr: Any) -> None:
    """Server.RequestHandlerClass when every listener has its own handler."""
    raise RuntimeError("no handler for this listener")


def _handler_name(handler: HandlerType | None) -> str:
    if handler is None:
        return "(each listener its own)"
    module = getattr(handler, "__module__", "?")
    return f"{module}:{getattr(handler, '__qualname__', repr(handler))}"
