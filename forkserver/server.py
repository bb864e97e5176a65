"""Server: socketserver's API over the forking parent in ``parent/``.

``Server`` binds its listeners; ``serve_forever()`` hands them to its
:class:`~forkserver.parent.parent.Parent`, which runs the loop (``parent/``)
and forks the children (``child/``).  Every hook of socketserver's
``BaseServer`` runs in the process socketserver runs it in; a subclass that
overrides a request hook (``verify_request``...) has its listeners served
through ``parent/hooks.py``, decided once at start.
"""

from __future__ import annotations

import _thread
import os
import socket as _socket
import sys

from . import log
from .addresses import format_address
from .handlers import import_handler, is_handler_class
from .listeners import Listener, open_listeners
from .parent.parent import Parent
from .requests import PARENT_HOOKS, RequestHooks, overridden

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from socket import socket as Socket
    from typing import Any, Self

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


class Server(RequestHooks):
    """A forking server with socketserver's API and hooks.

    ``Server(("127.0.0.1", 0), Handler)`` binds at once (``bind_and_activate``)
    and serves on ``serve_forever()``.  *server_address* is ``(host, port)`` or a
    Unix socket path; *options* are :class:`forkserver.config.Settings` fields
    (``max_children=64``, ``graceful_timeout=5``...).  *handler* is a
    socketserver-style handler class or a function ``handler(conn, addr)``.
    For socketserver's exact classes see :mod:`forkserver.compat`.
    """

    # socketserver's class attributes (read-only: override them in a subclass).
    address_family = _socket.AF_INET  # informational: each address picks its own family
    socket_type = _socket.SOCK_STREAM
    allow_reuse_address = True  # SO_REUSEADDR on TCP listeners (socketserver: False)
    allow_reuse_port = False  # or the reuse_port setting
    timeout: float | None = None  # handle_request()'s wait; None: for ever
    max_packet_size = 8192  # a datagram get_request() reads
    # server_close() waits for the children (True, as ForkingMixIn), or
    # stops them: SIGTERM, kill_timeout, SIGKILL (forkserver's default).
    block_on_close = False

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
            try:
                self.server_bind()
                self.server_activate()
            except BaseException:
                self.server_close()
                raise

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
        self._socket: Socket | None = None  # set by a class that makes its own (compat.py)
        self._address: Any = None
        # Held while serve_forever() runs; shutdown() waits on it.  A _thread
        # lock, not threading.Event: see log.py for why threading stays out.
        self._is_shut_down = _thread.allocate_lock()
        # The serving parent; finish_request and handle_error are bound here,
        # so a subclass's overrides are what the children call.
        self._parent = Parent(settings, self.finish_request, self._child_error)
        self._hooks = None  # the hook path (requests.py), made when first used

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

    def server_bind(self) -> None:
        """Bind and listen on every configured address (raises BindError, an OSError)."""
        if self._bound():
            return
        s = self.settings
        self.listeners = open_listeners(
            s.listeners(),
            s.backlog,
            s.unix_mode,
            reuse_port=s.reuse_port or self.allow_reuse_port,
            reuse_address=self.allow_reuse_address,
        )
        try:
            self._build_services()
        except BaseException:
            for listener in self.listeners:
                listener.close_and_unlink()
            raise

    def _bound(self) -> bool:
        return bool(self.listeners) and not self.listeners[0].closed

    def server_activate(self) -> None:
        """Listen (server_bind() first if it was not called); open the metrics endpoint."""
        if not self._bound():
            self.server_bind()
        self._open_metrics()

    def _ready_to_serve(self) -> None:
        """Before serving: bound and activated, whether or not the constructor did it."""
        if not self._bound():
            self.server_bind()
            self.server_activate()
        self._open_metrics()

    def _open_metrics(self) -> None:
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
        # Listeners with a Service of their own (UDP, TLS, PROXY) call the
        # default handler through finish_request too, so an override counts.
        default = None if self._default_handler is None else self.finish_request
        build_services(specs, self.listeners, default, self, source)
        self._services = [lis.service for lis in self.listeners if lis.service is not None]

    @property
    def server_address(self) -> Any:
        """The first listener's real bound address (port 0 resolved)."""
        return self.listeners[0].address if self.listeners else self._address

    @server_address.setter
    def server_address(self, address: Any) -> None:  # socketserver's server_bind sets it
        self._address = address

    @property
    def socket(self) -> Socket:
        return self._socket if self._socket is not None else self.listeners[0].sock

    @socket.setter
    def socket(self, sock: Socket) -> None:
        self._socket = sock

    def fileno(self) -> int:
        """What handle_request() waits on (socketserver's selector does the same)."""
        return self.socket.fileno()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server_close()

    def finish_request(self, request: Socket, client_address: Any) -> None:
        """Run the handler for one connection (in the child)."""
        if self._handler_is_class:
            self.RequestHandlerClass(request, client_address, self)
        else:
            self.RequestHandlerClass(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Called in the child when the handler raised an Exception; logs the traceback."""
        sock = request[1] if isinstance(request, tuple) else request
        logger.exception("handler failed for %s", format_address(sock.family, client_address))

    def _child_error(self, request: Any, client_address: Any) -> None:
        """handle_error() gets an Exception only, as in socketserver; a
        KeyboardInterrupt (or the like) just ends the child, with status 1."""
        exc = sys.exc_info()[1]
        if isinstance(exc, Exception):
            self.handle_error(request, client_address)
            return
        sock = request[1] if isinstance(request, tuple) else request
        logger.info(
            "handler for %s ended by %s",
            format_address(sock.family, client_address),
            type(exc).__name__,
        )

    def serve_forever(self, poll_interval: float | None = 0.5) -> None:
        """Serve until SIGTERM/SIGINT/SIGQUIT or shutdown(); returns after the drain.

        The loop sleeps in epoll until there is work; *poll_interval* is how
        often an overridden service_actions() is called.
        """
        self._ready_to_serve()
        hooked = overridden(self, Server, PARENT_HOOKS)
        if hooked:
            self._check_hooks(hooked[0])
            self._requests.install()
        with self._is_shut_down:
            self._serve(poll_interval if poll_interval is not None else 0.5)

    def _check_hooks(self, hook: str) -> None:
        """The hook path needs the parent to accept every connection."""
        proxied = [lis.name for lis in self.listeners if getattr(lis.service, "trusted", None)]
        if self.settings.spare_children or proxied:
            from .errors import ConfigError

            what = "spare_children" if self.settings.spare_children else "proxy_protocol"
            raise ConfigError(
                f"{type(self).__name__} overrides {hook}(), which runs in the parent for "
                f"each connection: {what} hands connections past it, so they cannot go together"
            )

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
        """Close the listeners; wait for the children (``block_on_close``) or
        stop them.  Idempotent."""
        for listener in self.listeners:
            listener.close_and_unlink()
        if self._socket is not None:
            self._socket.close()
        self._parent.forker.changed()
        if not self._serving:
            if self.block_on_close:
                self.collect_children(blocking=True)
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

    def _serve(self, poll_interval: float) -> None:
        parent = self._parent
        parent.metrics_listener = self.metrics_listener
        pid = os.getpid()

        def answer_scrape(conn: Socket, _peer: Any) -> None:
            from . import metrics  # in the scrape child: from its copy of the parent

            metrics.serve_metrics(conn, metrics.snapshot(self, parent_pid=pid))

        loop, timer = parent.loop, None
        if overridden(self, Server, ("service_actions",)):

            def tick() -> None:
                nonlocal timer
                self.service_actions()
                timer = loop.call_later(poll_interval, tick)

            timer = loop.call_later(poll_interval, tick)
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
            loop.cancel(timer)


def _no_handler(conn: Socket, addr: Any) -> None:
    """Server.RequestHandlerClass when every listener has its own handler."""
    raise RuntimeError("no handler for this listener")


def _handler_name(handler: HandlerType | None) -> str:
    if handler is None:
        return "(each listener its own)"
    module = getattr(handler, "__module__", "?")
    return f"{module}:{getattr(handler, '__qualname__', repr(handler))}"
