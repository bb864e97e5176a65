"""Server: socketserver's API over the forking parent in ``parent/``.

``Server`` binds its listeners, and ``serve_forever()`` builds the parent
from its collaborators and runs the loop:

* ``parent.loop``: epoll with a callback per fd, one deadline heap;
* ``parent.accept``: accept, admit or refuse, fork, queue at the limit;
* ``parent.fork``: fork() with signals blocked, what a child closes;
* ``parent.children``: the child table, each child reaped by its pidfd;
* ``parent.spares``: the parent's half of ``spare_children``;
* ``parent.signals``: the one table of handled signals;
* ``parent.stop``, ``parent.reload``, ``parent.scrape``.

What runs after fork is in ``child/``.
"""

from __future__ import annotations

import _thread
import gc
import os
import sys
import time

from . import log, pidfile, systemd
from .addresses import format_address
from .admission import Admission
from .child.limits import ChildLimits
from .handlers import import_handler, is_handler_class
from .listeners import Listener, open_listeners
from .parent.accept import Acceptor
from .parent.children import ChildTable
from .parent.fork import Forker
from .parent.loop import Loop
from .parent.reload import Reloader
from .parent.signals import HANDLED_SIGNALS, SIGNALS, SignalPipe
from .parent.spares import Spares
from .parent.stop import Stopper

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from socket import socket as Socket
    from typing import Any

    from .config import Settings
    from .handlers import HandlerType
    from .parent.children import Child
    from .parent.scrape import Scraper
    from .service import Service

__all__ = ["Server"]

logger = log.get_logger(__name__)

LOG_INTERVAL = log.INTERVAL
FD_RESERVE = 64  # descriptors beyond one pidfd per child: listeners, logs, the handler's own
# Pidfds go at this number or above, when the limit allows: connections keep
# the numbers below, which select() accepts (parent/children.py).
PIDFD_FLOOR = 1024


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
        # counted); each scrape is a child forked with a snapshot (metrics.py).
        self.metrics_listener: Listener | None = None
        self.exiting_after_serve = False  # set by the command line (boot.py)
        self._services: list[Service] = []
        self._shutdown_request = False
        self._serving = False
        # Held while serve_forever() runs; shutdown() waits on it.  A _thread
        # lock, not threading.Event: see log.py for why threading stays out.
        self._is_shut_down = _thread.allocate_lock()
        self._pipe: SignalPipe | None = None
        # Reload and upgrade (re-executing the command line), when started by it.
        self._argv: list[str] | None = None
        self._ready_fd = -1  # tell the parent that started us (an upgrade) we are up
        self._adopted: list[tuple[int, int, Any, float]] = []  # a reload's children
        # The parent's collaborators (parent/), each with one job.
        self._loop = loop = Loop()
        self._forker = forker = Forker()
        self._limits = ChildLimits(settings)
        limits = self._limits if self._limits.any else None
        self.children = ChildTable(loop, self._child_exited)
        self._admission = Admission(settings)
        self._acceptor = acceptor = Acceptor(
            settings, loop, self.children, forker, self._admission, limits,
            self.finish_request, self.handle_error,
        )  # fmt: skip
        self._spares: Spares | None = None
        if settings.spare_children > 0:
            spares = Spares(
                settings, loop, self.children, forker, self.finish_request, self.handle_error,
                limits,
            )  # fmt: skip
            spares.may_watch = lambda: acceptor.listening and acceptor.can_accept()
            spares.watch = acceptor.watch_direct
            spares.serving_starts = acceptor.serving_starts
            spares.fork_failed = acceptor.fork_failed
            self.children.before_reap = spares.catch_up
            acceptor.spares = self._spares = spares
        self._stopper = Stopper(settings, loop, acceptor, self.children, self._spares)
        self._reloader = Reloader(
            None, loop, acceptor, self.children, self._stopper, self._all_listeners
        )
        self._scraper: Scraper | None = None
        forker.parent_only(self._private_fds)
        # Which reap callback runs is decided once: the default path pays
        # for no feature it has not configured.
        self._on_exit = acceptor.slot_freed
        if self._spares is not None or settings.access_log:
            self._on_exit = self._after_reap

    def adopt(
        self, argv: list[str], children: list[tuple[int, int, Any, float]], ready_fd: int
    ) -> None:
        """Started by the command line (boot.py): remember its arguments for
        reload and upgrade, adopt the children a reload handed over, and the
        fd on which to say "ready" to the parent an upgrade came from."""
        self._argv = argv
        self._reloader._argv = argv
        self._ready_fd = ready_fd
        self._adopted = list(children)

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
        self._shutdown_request = True
        if self._pipe is not None:
            self._pipe.wake()
        with self._is_shut_down:
            pass

    def server_close(self) -> None:
        """Close the listeners; stop any children still running.  Idempotent."""
        for listener in self.listeners:
            listener.close_and_unlink()
        self._forker.changed()
        if len(self.children) and not self._serving:
            self.children.stop_all(self.settings.kill_timeout)

    # -- what the metrics snapshot reads (metrics.py) --------------------------

    @property
    def accepted(self) -> int:
        return self._acceptor.accepted + (self._spares.accepted if self._spares else 0)

    @property
    def fork_failures(self) -> int:
        return self._acceptor.fork_failures

    @property
    def refused(self) -> dict[str, int]:
        return self._acceptor.refusals.refused

    @property
    def _idle(self) -> set[int]:
        return self._spares.idle if self._spares is not None else set()

    # -- signals (parent/signals.py names them) ----------------------------------

    def handle_term(self) -> None:
        self._stopper.begin(immediate=self._stopper.stopping)

    def handle_int(self) -> None:
        self._stopper.begin(immediate=self._stopper.stopping)

    def handle_quit(self) -> None:
        self._stopper.begin(immediate=True)

    def handle_hup(self) -> None:
        self._reloader.reload()

    def handle_usr2(self) -> None:
        self._reloader.start_upgrade()

    def handle_usr1(self) -> None:
        """Reopen the log file (after logrotate moved it away)."""
        path = self.settings.log_file
        if not path:
            logger.info("SIGUSR1 ignored: no log_file to reopen")
            return
        try:
            log.reopen(path)
        except OSError as exc:
            logger.error(
                "SIGUSR1: cannot reopen %s: %s; still writing to the old one", path, exc.strerror
            )
            return
        logger.info("SIGUSR1: reopened %s", path)

    def _woken(self) -> None:
        """Another thread wrote to the pipe: shutdown() asks for a stop."""
        if self._shutdown_request and not self._stopper.stopping:
            self._stopper.begin(close_listeners=False)

    # -- the serving parent --------------------------------------------------------

    def _private_fds(self) -> list[int]:
        """The loop's, the signal pipe's and the reload's fds: no child keeps them."""
        fds = [self._loop.fileno(), *self._reloader.fds()]
        if self._pipe is not None:
            fds += (self._pipe.rfd, self._pipe.wfd)
        if self._ready_fd >= 0:
            fds.append(self._ready_fd)
        return fds

    def _all_listeners(self) -> list[Listener]:
        extra = [self.metrics_listener] if self.metrics_listener is not None else []
        return [*self.listeners, *extra]

    def _child_exited(self, child: Child) -> None:
        self._on_exit(child)

    def _after_reap(self, child: Child) -> None:
        """A child was reaped, with spares or an access log configured."""
        if self.settings.access_log and os.WIFSIGNALED(child.status):
            # The child wrote its own line, unless it was killed.
            from .parent.children import describe_status

            how = describe_status(child.status)
            age = time.monotonic() - child.started
            log.get_logger("forkserver.access").record(
                "%s pid %d %.3fs %s", child.peer_text, child.pid, age, how,
                peer=child.peer_text, pid=child.pid, duration=round(age, 6), status=how,
            )  # fmt: skip
        if self._spares is not None:
            self._spares.gone(child)
        self._acceptor.slot_freed(child)
        if self._spares is not None and not self._stopper.stopping:
            # A slot is free, and an exiting child may have freed processes
            # (fork's EAGAIN): replace the spares now.
            self._spares.refill_now()

    def _serve(self) -> None:
        self._pipe = pipe = SignalPipe()
        self._forker.changed()
        self._serving = True
        loop, acceptor = self._loop, self._acceptor
        try:
            if pipe.install():
                self._forker.signals = HANDLED_SIGNALS
            actions: dict[int, Callable[[], None]] = {
                int(signum): getattr(self, "handle_" + action) for signum, action in SIGNALS.items()
            }
            loop.add_reader(pipe.rfd, lambda _fd: pipe.dispatch(actions, self._woken))
            self._make_room_for_pidfds()
            if self._spares is not None:
                self._spares.start(self.listeners, self._services, not self._admission.enabled)
            acceptor.start(self.listeners)
            if self.metrics_listener is not None:
                self._start_scraper(self.metrics_listener)
            if self.settings.umask >= 0:
                os.umask(self.settings.umask)
            now = time.monotonic()
            for pid, family, peer, age in self._adopted:  # a reload's children, still serving
                child = self.children.add(pid, family, peer, now - age)
                if acceptor._per_child_work:
                    acceptor.serving_starts(child)
                    self._admission.opened(child.source)
            self._adopted = []
            acceptor.resume()
            # Everything imported so far is shared with every child; keep the
            # collector from touching (and so copying) those pages after fork.
            gc.collect()
            gc.freeze()
            # Output the handler module buffered at import would otherwise be
            # flushed again by every child from its copy of the buffer.
            sys.stdout.flush()
            sys.stderr.flush()
            if self.settings.pidfile:  # before anything says we are ready
                pidfile.write(self.settings.pidfile)
            self._say_ready()
            if self._shutdown_request:  # asked before the loop could hear it
                self._woken()
            loop.run()
        finally:
            self._finish_serving()

    def _make_room_for_pidfds(self) -> None:
        """Each child is watched through a pidfd, kept at PIDFD_FLOOR or above:
        raise the soft RLIMIT_NOFILE (within the hard limit) to fit
        max_children of them there."""
        import resource

        need = PIDFD_FLOOR + self.settings.max_children + FD_RESERVE
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
            if raised > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
        fits = soft == resource.RLIM_INFINITY or soft >= need
        self.children.fd_floor = PIDFD_FLOOR if fits else 0

    def _start_scraper(self, listener: Listener) -> None:
        from .parent.scrape import Scraper

        if self._scraper is None or self._scraper.listener is not listener:
            parent = os.getpid()

            def answer(conn: Socket, _peer: Any) -> None:
                from . import metrics

                metrics.serve_metrics(conn, metrics.snapshot(self, parent_pid=parent))

            limits = self._limits if self._limits.any else None
            self._scraper = Scraper(
                listener, self._loop, self.children, self._forker, self._acceptor, answer,
                self.handle_error, limits,
            )  # fmt: skip
            self._acceptor.on_backoff = self._scraper.paused
            self._stopper.on_stop.append(self._scraper.close)
        self._scraper.paused(False)

    def _say_ready(self) -> None:
        for listener in self.listeners:
            label = listener.service.label if listener.service is not None else ""
            logger.info("listening on %s%s", listener.name, label)
        if self.metrics_listener is not None:
            logger.info("metrics on http://%s/metrics", self.metrics_listener.name)
        logger.info(
            "forkserver ready: pid %d, handler %s, max_children %d, spare_children %d",
            os.getpid(),
            _handler_name(self._default_handler),
            self.settings.max_children,
            self.settings.spare_children,
        )
        systemd.notify(f"READY=1\nMAINPID={os.getpid()}")
        if self._ready_fd >= 0:  # the old parent of an upgrade may stop now
            try:
                os.write(self._ready_fd, b"ready")
            except OSError:
                pass  # it is gone already
            os.close(self._ready_fd)
            self._ready_fd = -1
            self._forker.changed()

    def _finish_serving(self) -> None:
        """After the loop (a stop, or an exception): leave nothing behind."""
        if self.settings.pidfile:
            pidfile.remove(self.settings.pidfile)
        self._serving = False
        self._loop.after_batch = None
        if self._spares is not None:
            self._stopper.take_back_from_spares()
        self._acceptor.finish()  # closes what was taken back, too
        if self._spares is not None:
            self._spares.close()
        if self.children:  # only if the loop died of an exception
            self.children.close()
            self.children.stop_all(self.settings.kill_timeout)
        self._stopper.reset()
        self._shutdown_request = False
        pipe = self._pipe
        assert pipe is not None
        self._loop.remove_reader(pipe.rfd)
        # From the command line the process exits next: keep our handlers,
        # or a late SIGUSR2 (default: terminate) would turn exit 0 into -12.
        pipe.close(restore=not self.exiting_after_serve)
        self._pipe = None
        self._forker.signals = ()
        self._forker.changed()
        gc.unfreeze()


def _no_handler(conn: Socket, addr: Any) -> None:
    """Server.RequestHandlerClass when every listener has its own handler."""
    raise RuntimeError("no handler for this listener")


def _handler_name(handler: HandlerType | None) -> str:
    if handler is None:
        return "(each listener its own)"
    module = getattr(handler, "__module__", "?")
    return f"{module}:{getattr(handler, '__qualname__', repr(handler))}"
