"""The parent: bind, accept, fork one child per connection, reap, stop.

One blocking selector watches the listeners and the wakeup pipe; there is no
polling interval, so an idle parent uses no CPU.  Per connection the parent
does only accept, fork and close; everything else happens in the child
(``child.py``).  Signals arrive through the wakeup pipe and are dispatched by
name (``handle_term``, ``handle_chld``...) from the loop.
"""

from __future__ import annotations

import _signal  # enum-free signal calls on the per-connection path (see child.py)
import _thread
import gc
import heapq
import os
import select
import selectors
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from socket import (
    AF_UNIX,
    MSG_DONTWAIT,
    SCM_RIGHTS,
    SHUT_RD,
    SHUT_WR,
    SOCK_SEQPACKET,
    SOCK_STREAM,
    SOL_SOCKET,
    socketpair,
)
from socket import socket as Socket

from . import boot, log, pidfile, systemd
from .admission import Admission
from .boot import INHERIT_ENV, handover_env
from .child import ChildLimits, serve_connection, serve_datagram, set_exit_notes
from .children import WALK_DELAY, Child, ChildTable, describe_status
from .handlers import import_handler, is_handler_class
from .listeners import (
    BACKOFF_SECONDS,
    SKIPPED_ACCEPT_ERRNOS,
    Listener,
    format_address,
    open_listeners,
)
from .pool import BUSY_RECORD, decode_busy, encode_peer, message_size, reclaim, run_spare
from .wakeup import HANDLED_SIGNALS, Wakeup

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .config import Settings
    from .handlers import HandlerType
    from .headers import HeaderReader
    from .service import Service

__all__ = ["Server"]

logger = log.get_logger(__name__)
access = log.get_logger("forkserver.access")

TOP_UP_DELAY = 0.05  # seconds after a handoff: fork the rest of the spares
_DATAGRAM_MAX = 65535  # the largest UDP payload
MAX_SCRAPES = 4  # metrics scrape children at once; more are closed unanswered
_BUSY_PIPE = "busy-pipe"  # selector data for the pool's busy pipe
_UPGRADE_PIPE = "upgrade-pipe"  # selector data: a new parent says it is ready
_METRICS = "metrics"  # selector data: the metrics listener
_HEADERS = "proxy-headers"  # selector data: connections waiting for a PROXY header
# Read whole records only: records are written atomically, so a read whose
# size is a multiple of the record size never splits one.
_BUSY_READ = BUSY_RECORD.size * 2048
_NOTES_READ = 4 * 4096  # exit notes: 4-byte pids, so whole ones, as above
_NOTE = struct.Struct("i")
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
        # counted); each scrape is a child forked with a snapshot (metrics.py).
        self.metrics_listener: Listener | None = None
        self.exiting_after_serve = False  # set by the command line (boot.py)
        self._scrape_pidfds: dict[int, int] = {}
        self._scrapes = 0  # scrape children alive
        self.children = ChildTable()
        self.accepted = 0
        self.fork_failures = 0
        self._wakeup: Wakeup | None = None
        self._selector: selectors.EpollSelector | None = None
        self._listening = False
        self._stopping = False
        self._shutdown_request = False
        self._serving = False
        # Held while serve_forever() runs; shutdown() waits on it.  A _thread
        # lock, not threading.Event: see log.py for why threading stays out.
        self._is_shut_down = _thread.allocate_lock()
        self._resume_at: float | None = None
        self._term_at: float | None = None
        self._kill_at: float | None = None
        self._queued: deque[tuple[int, int, Any, Service | None]] = deque()
        # Datagrams drained at a stop while at max_children: a UDP socket dup, the
        # datagram, its sender, the listener's service.
        self._queued_datagrams: deque[tuple[int, bytes, int, Any, Service]] = deque()
        self._poll_interval: float | None = None
        self._pidfd_mode = False
        self._accept_log = log.Throttle(LOG_INTERVAL)
        self._fork_log = log.Throttle(LOG_INTERVAL)
        # The pool of spares (spare_children > 0); see pool.py.
        self._pool = settings.spare_children > 0
        self._idle: set[int] = set()  # spares not yet known to hold a connection
        self._in_transit = 0  # connections handed off, not yet reported busy
        self._refill_at: float | None = None  # a spare's fork failed: retry then
        self._top_up_at: float | None = None  # fork the spares not replaced at handoff
        self._handoff: Socket | None = None  # the parent's end
        self._handoff_child = self._busy_r = self._busy_w = -1
        # Listeners the spares accept from themselves (pool.py), each with its
        # service's index; the parent watches them only while no spare is idle.
        self._direct: dict[Listener, int] = {}
        self._watching_direct = False
        self._notes_r = self._notes_w = -1  # exit notes: pids of exiting children (children.py)
        self._walk_at: float | None = None  # then walk all children (children.py)
        # Admission (admission.py), refusals by reason, per-child limits.
        self._admission = Admission(settings)
        self._refuse_when_full = settings.when_full == "refuse"
        self.refused: dict[str, int] = {}
        self._refusal_logs: dict[str, log.Throttle] = {}
        self._limits = ChildLimits(settings)
        self._child_limits = self._limits if self._limits.any else None
        # max_lifetime: (deadline, pid, started, killing) per child serving a
        # connection; killing: the SIGTERM was sent, SIGKILL is next.
        self._lifetimes: list[tuple[float, int, float, bool]] = []
        # Reload and upgrade (re-executing the command line), when started by it.
        self._argv: list[str] | None = None
        self._ready_fd = -1  # tell the parent that started us (an upgrade) we are up
        self._check: tuple[int, int] | None = None  # a reload's config check: pid, output
        self._reexec_pending = False  # a reload waits for PROXY headers being read
        self._upgrade: tuple[int, int] | None = None  # a new parent: pid, its readiness pipe
        # Whether a new child needs anything beyond the child table (kept as
        # one flag: the per-connection path stays a few attribute reads).
        self._per_child_work = self._admission.enabled or bool(settings.max_lifetime)
        # Listeners with their own handler, TLS, PROXY protocol or UDP (service.py),
        # and connections waiting for their PROXY header (headers.py).
        self._services: list[Service] = []
        self._headers: HeaderReader | None = None
        # Most connections waiting for their header at once (each holds an fd
        # in the parent); not max_children: a slow proxy must not hold up the rest.
        self._headers_limit = max(settings.max_children, settings.backlog)

    def adopt(
        self,
        argv: list[str],
        children: list[tuple[int, int, Any, float]],
        ready_fd: int,
        notes: Sequence[int] | None = None,
    ) -> None:
        """Started by the command line (boot.py): remember its arguments for
        reload and upgrade, adopt the children a reload handed over with the
        exit-notes pipe they write to, and the fd on which to say "ready" to
        the parent an upgrade came from."""
        self._argv = argv
        self._ready_fd = ready_fd
        if notes:
            for fd in notes:
                os.set_inheritable(fd, False)
            self._notes_r, self._notes_w = notes
        now = time.monotonic()
        for pid, family, peer, age in children:
            child = Child(pid, family, peer, now - age)
            self.children.add(child)
            if self._per_child_work:
                self._serving_starts(child)
                self._admission.opened(child.source)

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
        if getattr(self.settings, "metrics", "") and (
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

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Serve until SIGTERM/SIGINT/SIGQUIT or shutdown(); returns after the drain.

        *poll_interval* is accepted for socketserver compatibility and ignored:
        the loop sleeps in select() until there is work.
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
        if self._wakeup is not None:
            self._wakeup.wake()
        with self._is_shut_down:
            pass

    def server_close(self) -> None:
        """Close the listeners; stop any children still running.  Idempotent."""
        for listener in self.listeners:
            listener.close_and_unlink()
        if len(self.children) and not self._serving:
            self._stop_leftover_children()

    # -- the loop ----------------------------------------------------------

    def _serve(self) -> None:
        self._wakeup = wakeup = Wakeup()
        self._selector = selector = selectors.EpollSelector()  # Linux: pidfd, EPOLLEXCLUSIVE
        self._serving = True
        try:
            selector.register(wakeup.rfd, selectors.EVENT_READ, None)
            if not wakeup.install_signals():
                # Not the main thread: no signal handler can be installed, so
                # watch each child's pidfd instead of waiting for SIGCHLD.
                if hasattr(os, "pidfd_open"):
                    self._pidfd_mode = True
                else:
                    self._poll_interval = 0.5
            if self._pidfd_mode or self._poll_interval is not None:
                pass  # no SIGCHLD here: no exit notes either
            elif self._notes_w >= 0:  # a reload's: its children write to it
                set_exit_notes(self._notes_w)
            else:
                self._notes_r, self._notes_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                set_exit_notes(self._notes_w)
            if self._pool:
                self._busy_r, self._busy_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                ours, theirs = socketpair(AF_UNIX, SOCK_SEQPACKET)
                ours.setblocking(False)  # a full queue means: fork instead
                self._handoff, self._handoff_child = ours, theirs.detach()
                selector.register(self._busy_r, selectors.EVENT_READ, _BUSY_PIPE)
                self._busy_poll = select.poll()
                self._busy_poll.register(self._busy_r, select.POLLIN)
            self._start_services(selector)
            if self._pool and not self._admission.enabled:
                # Admission rules and PROXY headers need the parent to see a
                # connection first; every other stream listener needs nothing
                # from it.
                self._direct = {
                    lis: self._service_index(lis.service)
                    for lis in self.listeners
                    if not lis.datagram and (lis.service is None or lis.service.trusted is None)
                }
            if self.settings.umask >= 0:
                os.umask(self.settings.umask)
            self._signals_to_reset = (
                tuple(int(s) for s in HANDLED_SIGNALS) if wakeup.signals_installed else ()
            )
            self._signal_handlers = {
                int(s): getattr(self, "handle_" + s.name[3:].lower()) for s in HANDLED_SIGNALS
            }
            self._resume_listening()
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
            for listener in self.listeners:
                label = listener.service.label if listener.service is not None else ""
                logger.info("listening on %s%s", listener.name, label)
            if self.metrics_listener is not None:
                self._metrics_paused(False)  # registered, if _resume_listening did not yet
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
            # Children adopted across a reload may have exited meanwhile, and
            # a spare may have served a connection already.
            self._catch_up_busy()
            self._after_reap(self.children.reap())
            self._loop(selector, wakeup)
        finally:
            if self.settings.pidfile:
                pidfile.remove(self.settings.pidfile)
            self._serving = False
            if self.children:  # only if the loop died of an exception
                self._stop_leftover_children()
            self._stopping = self._shutdown_request = False
            self._term_at = self._kill_at = self._resume_at = self._refill_at = None
            self._walk_at = self._top_up_at = None
            self._reexec_pending = False
            self._listening = False
            self._retire_spares()
            self._drop_queued("the loop ended")  # only after an exception
            for fd in (self._busy_r, self._busy_w, self._handoff_child, self._notes_r):
                if fd >= 0:
                    os.close(fd)
            if self._notes_w >= 0:  # ours (a Server in another thread has none)
                set_exit_notes(-1)
                self._notes_w = -1
            self._handoff_child = self._busy_r = self._busy_w = self._notes_r = -1
            self._idle.clear()
            self._in_transit = 0
            self._direct = {}
            self._watching_direct = False
            self._lifetimes.clear()
            if self._headers is not None:
                self._headers.close()
                self._headers = None
            selector.close()
            # From the command line the process exits next: keep our handlers,
            # or a late SIGUSR2 (default: terminate) would turn exit 0 into -12.
            wakeup.close(restore=not self.exiting_after_serve)
            self._wakeup = self._selector = None
            gc.unfreeze()

    def _loop(self, selector: selectors.EpollSelector, wakeup: Wakeup) -> None:
        while True:
            if wakeup.pending:
                for signum in wakeup.take_signals():
                    self._signal_handlers[signum]()
            if self._shutdown_request and not self._stopping:
                self._begin_stop(close_listeners=False)
            if (
                self._resume_at is not None
                or self._term_at is not None
                or self._kill_at is not None
                or self._refill_at is not None
                or self._walk_at is not None
                or self._top_up_at is not None
                or self._lifetimes
                or self._headers
            ):
                self._run_timers()
            if self._reexec_pending and not self._headers:
                self._reexec_pending = False
                if not self._stopping and self._upgrade is None:
                    logger.info("reloading: re-executing (pid %d)", os.getpid())
                    self._reexec()
            if (
                self._stopping
                and not self.children
                and not self._queued
                and not self._queued_datagrams
                and not self._headers
            ):
                logger.info("stopped: all children have exited")
                return
            for key, _ in selector.select(self._timeout()):
                data = key.data
                if data is None:
                    wakeup.drain()
                elif isinstance(data, Listener):
                    if data.datagram:
                        self._receive(data)
                    else:
                        self._accept(data)
                elif data is _BUSY_PIPE:
                    self._read_busy()
                elif data is _HEADERS:
                    assert self._headers is not None
                    self._headers.ready()
                    if not self._listening:  # a header done: room for the next
                        self._resume_listening()
                elif data is _UPGRADE_PIPE:
                    self._upgrade_answer()
                elif data is _METRICS:
                    self._scrape()
                else:  # a child's pidfd became readable: it has exited
                    self._reap_pidfd(data)
            if self._poll_interval is not None:
                self._after_reap(self.children.reap())

    def _timeout(self) -> float | None:
        lifetime = self._lifetimes[0][0] if self._lifetimes else None
        header = self._headers.next_deadline if self._headers else None
        timers = (
            self._resume_at,
            self._term_at,
            self._kill_at,
            self._refill_at,
            self._walk_at,
            self._top_up_at,
            lifetime,
            header,
        )
        deadlines = [t for t in timers if t is not None]
        if not deadlines:
            return self._poll_interval  # the common case: sleep until something happens
        wait = max(0.0, min(deadlines) - time.monotonic())
        return wait if self._poll_interval is None else min(wait, self._poll_interval)

    def _run_timers(self) -> None:
        now = time.monotonic()
        if self._top_up_at is not None and now >= self._top_up_at:
            self._fill_pool()  # clears _top_up_at
        if self._walk_at is not None and now >= self._walk_at:
            self._walk_at = None
            self._catch_up_busy()
            self._after_reap(self.children.reap())
        if self._refill_at is not None and now >= self._refill_at:
            self._refill_at = None
            self._fill_pool()
        while self._lifetimes and self._lifetimes[0][0] <= now:
            self._lifetime_over(*heapq.heappop(self._lifetimes))
        if self._headers:
            self._headers.expire()
            if not self._listening:
                self._resume_listening()
        if self._resume_at is not None and now >= self._resume_at:
            self._resume_at = None
            self._resume_listening()
        if self._term_at is not None and now >= self._term_at:
            self._term_at = None
            self._kill_at = now + self.settings.kill_timeout
            self._drop_queued("graceful_timeout expired")
            if self.children:
                logger.warning(
                    "graceful_timeout (%.1fs) expired: sending SIGTERM to %d children",
                    self.settings.graceful_timeout,
                    len(self.children),
                )
                self.children.signal_all(signal.SIGTERM)
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            if self.children:
                logger.warning("sending SIGKILL to %d children", len(self.children))
                self.children.signal_all(signal.SIGKILL)

    def _lifetime_over(self, deadline: float, pid: int, started: float, overdue: bool) -> None:
        """A child reached max_lifetime: SIGTERM, then SIGKILL after kill_timeout."""
        child = self.children.get(pid)
        if child is None or child.started != started:
            return  # it exited meanwhile (its pid may even be someone else's now)
        logger.warning(
            "child %d for %s exceeded max_lifetime (%gs): %s",
            pid,
            child.peer_text,
            self.settings.max_lifetime,
            "SIGKILL" if overdue else "SIGTERM",
        )
        try:
            os.kill(pid, signal.SIGKILL if overdue else signal.SIGTERM)
        except ProcessLookupError:
            return
        if not overdue:
            entry = (deadline + self.settings.kill_timeout, pid, started, True)
            heapq.heappush(self._lifetimes, entry)

    # -- accepting and forking ---------------------------------------------

    def _accept(self, listener: Listener) -> None:
        """Accept one connection and fork its child.

        One per readiness event: epoll is level-triggered, so a listener with
        more connections waiting is reported again at once, and the loop never
        ends in EAGAIN (an exception in every wakeup costs more than a
        select call: it touches pages that each fork then copies).
        """
        try:
            fd, peer = listener.sock._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return  # reset by the peer before we got to it, or a spurious wakeup
        except OSError as exc:
            if exc.errno not in SKIPPED_ACCEPT_ERRNOS:
                self._accept_failed(listener, exc)
            return
        self.accepted += 1
        service = listener.service
        if service is not None and service.trusted is not None:
            self._wait_for_header(fd, peer, listener)
        else:
            self._take(fd, listener.family, peer, service)
        if not self._can_accept():
            self._pause_listening()

    def _start_services(self, selector: selectors.EpollSelector) -> None:
        """Before the first fork: the PROXY header reader, if a listener needs it."""
        if any(s.trusted is not None for s in self._services) and self._headers is None:
            from .headers import HeaderReader

            self._headers = HeaderReader(self._header_read, self._count_refusal)
            selector.register(self._headers.fileno(), selectors.EVENT_READ, _HEADERS)

    def _wait_for_header(self, fd: int, peer: Any, listener: Listener) -> None:
        """A PROXY protocol listener: admission waits for the header (headers.py)."""
        assert self._headers is not None
        if len(self._headers) >= self._headers_limit:  # when_full = "refuse"
            self._refuse(fd, listener.family, peer, "proxy_backlog")
            return
        self._headers.start(fd, peer, listener)

    def _header_read(self, fd: int, family: int, peer: Any, listener: Listener) -> None:
        self._take(fd, family, peer, listener.service)
        if self._listening and not self._can_accept():
            self._pause_listening()

    def _take(self, fd: int, family: int, peer: Any, service: Service | None = None) -> None:
        """An accepted connection (counted by the caller): admit it (or refuse
        it), then give it a child, or queue it until a child exits."""
        if self._admission.enabled:
            reason = self._admission.check(family, peer, self._busy_children())
            if reason is not None:
                self._refuse(fd, family, peer, reason)
                return
        if not self._dispatch(fd, family, peer, service):
            if self._refuse_when_full:
                self._refuse(fd, family, peer, "full")
                return
            # At max_children while stopping (or a full handoff queue): the
            # next child to exit makes room for it.
            self._queued.append((fd, family, peer, service))

    def _spare_waits(self) -> bool:
        """Whether a spare waits for a connection to be handed over (none
        once retired, at a stop or a reload)."""
        return len(self._idle) > self._in_transit and self._handoff is not None

    def _busy_children(self) -> int:
        """The load admission judges: children serving, not idle spares (but
        those already handed a connection or datagram)."""
        return len(self.children) - len(self._idle) + self._in_transit

    def _receive(self, listener: Listener) -> bool:
        """A UDP listener: read one datagram and fork its child (socketserver's
        ForkingUDPServer); False when none was waiting."""
        try:
            data, peer = listener.sock.recvfrom(_DATAGRAM_MAX)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            # ECONNREFUSED and the like: an ICMP error for an earlier reply.
            return True
        self.accepted += 1
        family = listener.family
        if self._admission.enabled:
            reason = self._admission.check(family, peer, self._busy_children())
            if reason is not None:
                self._refuse_datagram(family, peer, reason)
                return True
        service = listener.service
        if not self._answer(listener.fileno(), data, family, peer, service):
            waits = self._stopping or not self._refuse_when_full
            if waits and len(self._queued_datagrams) < self.settings.backlog:
                # The stop's drain, or read just as the last slot went (a spare
                # counted idle took a connection of its own): answered as
                # children exit, as connections are.
                entry = (os.dup(listener.fileno()), data, family, peer, service)
                self._queued_datagrams.append(entry)
            else:
                self._refuse_datagram(family, peer, "full")
        if not self._can_accept():
            self._pause_listening()
        return True

    def _answer(
        self, fd: int, data: bytes, family: int, peer: Any, service: Service, owned: bool = False
    ) -> bool:
        """Give a datagram to an idle spare, or fork a child for it, with UDP
        socket *fd* (closed here if *owned*); False at max_children."""
        if self._spare_waits() and self._hand_off(fd, family, peer, service, data):
            if self._admission.enabled:
                self._admission.opened(self._admission.source(family, peer))
        elif len(self.children) >= self.settings.max_children:
            return False
        else:
            self._spawn_datagram(fd, data, family, peer, service)
        if owned:
            os.close(fd)
        return True

    def _spawn_datagram(
        self, fd: int, data: bytes, family: int, peer: Any, service: Service
    ) -> None:
        try:
            pid = self._fork()
        except OSError as exc:
            self._fork_failed(exc, f"dropping a datagram from {format_address(family, peer)}")
            self._refuse_datagram(family, peer, "fork_failed")
            return
        if pid == 0:
            serve_datagram(
                os.dup(fd),  # its own: the parent's fds, this one among them, are closed next
                data,
                family,
                peer,
                self._child_closes(),
                self._signals_to_reset,
                service.run,
                self.handle_error,
                self._child_limits,
            )
        self._track_serving(pid, family, peer)

    def _refuse_datagram(self, family: int, peer: Any, reason: str) -> None:
        """Drop a datagram: counted and logged like a refused connection; no
        reply (a UDP client cannot tell a refusal from a loss anyway)."""
        self._note_refusal(family, peer, reason, "dropped a datagram from", "dropped")

    def _count_refusal(self, family: int, peer: Any, reason: str, past: str = "refused") -> None:
        """Count a refusal by reason (metrics), with its access-log line."""
        self.refused[reason] = self.refused.get(reason, 0) + 1
        if self.settings.access_log:
            peer_text = format_address(family, peer)
            access.record("%s %s %s", peer_text, past, reason, peer=peer_text, status=reason)

    def _note_refusal(
        self, family: int, peer: Any, reason: str, what: str = "refused", past: str = "refused"
    ) -> None:
        """_count_refusal, and a warning at most once per interval per reason."""
        self._count_refusal(family, peer, reason, past)
        throttle = self._refusal_logs.get(reason)
        if throttle is None:
            throttle = self._refusal_logs[reason] = log.Throttle(LOG_INTERVAL)
        if throttle.ready():
            held = throttle.take_suppressed()
            logger.warning(
                "%s %s: %s%s",
                what,
                format_address(family, peer),
                reason,
                f" ({held} more {past} for this reason since the last report)" if held else "",
            )

    def _can_accept(self) -> bool:
        """Whether to accept now: a connection would get a child at once, or
        when_full = "refuse" (it would get the busy message)."""
        return (
            self._refuse_when_full
            or len(self.children) < self.settings.max_children
            or self._spare_waits()
        ) and (
            # Enough connections wait for their PROXY header: the next ones
            # wait in the backlog (or are refused).
            self._headers is None
            or self._refuse_when_full
            or len(self._headers) < self._headers_limit
        )

    def _refuse(self, fd: int, family: int, peer: Any, reason: str) -> None:
        """Close a connection the admission rules (or a full server) refuse,
        after the busy message; count and log it, at most once per interval
        per reason, so a flood cannot flood the log."""
        self._note_refusal(family, peer, reason)
        sock = Socket(family, SOCK_STREAM, 0, fd)
        try:
            if self.settings.busy_message:
                sock.send(self.settings.busy_message.encode(), MSG_DONTWAIT)
            sock.shutdown(SHUT_WR)
        except OSError:
            pass  # the client left already; it is refused all the same
        sock.close()

    def _dispatch(self, fd: int, family: int, peer: Any, service: Service | None = None) -> bool:
        """Give accepted connection *fd* to an idle spare, or fork a child for
        it; False when neither is possible (max_children reached)."""
        if self._spare_waits() and self._hand_off(fd, family, peer, service):
            if self._admission.enabled:
                self._admission.opened(self._admission.source(family, peer))
            return True
        if len(self.children) >= self.settings.max_children:
            return False
        self._spawn(fd, family, peer, service)
        return True

    def _hand_off(
        self,
        fd: int,
        family: int,
        peer: Any,
        service: Service | None,
        datagram: bytes | None = None,
    ) -> bool:
        """Send connection *fd* to an idle spare (pool.py), or with *datagram*
        the UDP socket *fd* and a datagram to answer; False if it cannot."""
        assert self._handoff is not None
        if self._direct:
            # Spares also accept by themselves: one counted idle may just
            # have, and what is handed to it waits for the next spare.
            self._catch_up_busy(refill=False)
            if not self._spare_waits():
                return False
        index = self._service_index(service)
        try:
            self._handoff.sendmsg(
                [encode_peer(family, peer, index), datagram or b""],
                [(SOL_SOCKET, SCM_RIGHTS, fd.to_bytes(4, sys.byteorder))],
            )
        except OSError:  # the queue is full (spares are slow to start): fork instead
            return False
        # The spare received its own copy: close() only drops ours (and the
        # UDP socket stays the parent's).
        if datagram is None:
            os.close(fd)
        self._in_transit += 1
        self._fill_pool(low_water=True)
        return True

    def _service_index(self, service: Service | None) -> int:
        """How a spare names *service*: its index in _services, plus one; 0: none."""
        return 0 if service is None else self._services.index(service) + 1

    def _accept_failed(self, listener: Listener, exc: OSError) -> None:
        # Out of descriptors (or some error we do not know): retrying at once
        # would spin at 100% CPU.  Leave the connections in the kernel backlog
        # and try again shortly, or as soon as a child exits.
        if self._accept_log.ready():
            held = self._accept_log.take_suppressed()
            logger.error(
                "accept() on %s failed: %s; pausing accepts for %.1fs%s",
                listener.name,
                os.strerror(exc.errno or 0),
                BACKOFF_SECONDS,
                f" ({held} more failures since the last report)" if held else "",
            )
        self._resume_at = time.monotonic() + BACKOFF_SECONDS
        self._pause_listening()  # the metrics listener too, now that _resume_at is set

    def _fork(self) -> int:
        """os.fork() with the handled signals blocked across it, so the child
        cannot run the parent's handlers before it has put back the default
        dispositions (it unblocks them itself).  Raises OSError."""
        blocked = self._signals_to_reset
        if blocked:
            _signal.pthread_sigmask(_signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
        except OSError:
            if blocked:
                _signal.pthread_sigmask(_signal.SIG_UNBLOCK, blocked)
            raise
        if pid and blocked:
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, blocked)
        return pid

    def _track(self, child: Child) -> None:
        self.children.add(child)
        if self._pidfd_mode:
            self._watch_pidfd(child)

    def _spawn(self, fd: int, family: int, peer: Any, service: Service | None = None) -> None:
        """Fork a child for accepted connection *fd*."""
        try:
            pid = self._fork()
        except OSError as exc:
            self._fork_failed(exc, f"refusing the connection from {format_address(family, peer)}")
            self._refuse(fd, family, peer, "fork_failed")
            return
        if pid == 0:
            serve_connection(
                fd,
                family,
                peer,
                self._child_closes(),
                self._signals_to_reset,
                self.finish_request if service is None else service.run,
                self.handle_error,
                self._child_limits,
                service,
            )
        # close() only drops a reference: if the parent kept its copy, the
        # client would never see EOF when the child is done.
        os.close(fd)
        self._track_serving(pid, family, peer)

    def _track_serving(self, pid: int, family: int, peer: Any) -> None:
        """A child forked for a connection or datagram: in the table, counted
        against its source, its max_lifetime started."""
        child = Child(pid, family, peer, time.monotonic())
        self._track(child)
        if self._per_child_work:
            self._serving_starts(child)
            self._admission.opened(child.source)

    def _serving_starts(self, child: Child) -> None:
        """*child* now serves a connection: note the source it counts against,
        and start its max_lifetime."""
        if self._admission.enabled:
            child.source = self._admission.source(child.family, child.peer)
        if self.settings.max_lifetime:
            deadline = child.started + self.settings.max_lifetime
            heapq.heappush(self._lifetimes, (deadline, child.pid, child.started, False))

    def _spawn_spare(self) -> bool:
        """Fork a spare that waits for one connection (pool.py)."""
        try:
            pid = self._fork()
        except OSError as exc:
            # Idle spares may still serve: keep accepting, retry the refill later.
            self._fork_failed(exc, "no spare started", pause=False)
            self._refill_at = time.monotonic() + BACKOFF_SECONDS
            return False
        if pid == 0:
            run_spare(
                self._handoff_child,
                self._busy_w,
                self._spare_closes(),
                self._signals_to_reset,
                self.finish_request,
                self.handle_error,
                self._child_limits,
                self._services,
                self._direct,
            )
        self._track(Child(pid, 0, None, time.monotonic()))
        self._idle.add(pid)
        return True

    def _fill_pool(self, low_water: bool = False) -> None:
        """Fork spares until spare_children wait idle (within max_children).

        With *low_water* (a spare just took a connection), only up to half of
        them; the rest when a child exits, or TOP_UP_DELAY later.  A fork
        (20 ms with a 1 GB parent) run while the connection that took the
        spare is being served competes with it for the CPU; once the child has
        exited (or the connection is long-lived), the parent has nothing
        better to do."""
        spares, limit = self.settings.spare_children, self.settings.max_children
        if low_water:
            spares = max(1, spares // 2)
            if self._top_up_at is None:
                self._top_up_at = time.monotonic() + TOP_UP_DELAY
        else:
            self._top_up_at = None
        while (
            len(self._idle) - self._in_transit < spares
            and len(self.children) < limit
            and not self._stopping
            and self._refill_at is None
            and self._handoff is not None
        ):
            if not self._spawn_spare():
                break
        self._sync_direct()

    def _sync_direct(self) -> None:
        """Watch the direct listeners while no spare is idle (to fork on
        accept, or refuse, as without a pool), and leave them to the spares
        otherwise: the parent stays off the connection's path."""
        if not self._direct or not self._listening or self._selector is None:
            return
        watch = not self._spare_waits() and self._can_accept()
        if watch == self._watching_direct:
            return
        for listener in self._direct:
            if watch:
                self._selector.register(listener.sock, selectors.EVENT_READ, listener)
            else:
                self._selector.unregister(listener.sock)
        self._watching_direct = watch

    def _catch_up_busy(self, refill: bool = True) -> None:
        """Read the busy records already written, before reaping (a spare that
        served and exited quickly is logged with its client, not as an idle
        spare) and before a handoff (to a spare known to be idle)."""
        if self._pool and self._busy_r >= 0 and self._busy_poll.poll(0):
            self._read_busy(refill)

    def _read_busy(self, refill: bool = True) -> None:
        """Spares that accepted a connection: note whom they serve, replace
        them (unless not *refill*: the caller holds a connection no list
        has yet, which a spare forked now would keep open)."""
        try:
            data = os.read(self._busy_r, _BUSY_READ)
        except BlockingIOError:
            return
        now = time.monotonic()
        for pid, direct, family, peer in decode_busy(data):
            if direct:  # it accepted the connection itself
                self.accepted += 1
            else:
                self._in_transit = max(0, self._in_transit - 1)
            self._idle.discard(pid)
            child = self.children.get(pid)
            if child is not None:
                child.family, child.peer, child.started = family, peer, now
                self._serving_starts(child)  # counted against its source at handoff
        if refill:
            self._fill_pool(low_water=True)

    # Which fds a new child closes is read from the live state, in the child,
    # never from a list kept since start: a closed fd's number is reused by
    # the next accept(), and closing it by its old name would cut a client off.

    def _spare_closes(self) -> Iterator[int]:
        """The fds a new spare must not keep (it keeps the shared ones, and
        the listeners it accepts from)."""
        keep = {listener.fileno() for listener in self._direct}
        yield from (fd for fd in self._private_fds() if fd not in keep)
        yield from self._other_children_fds()

    def _child_closes(self) -> Iterator[int]:
        """Every fd the parent holds that a child forked on accept must not keep."""
        yield from self._private_fds()
        yield from self._shared_fds()
        yield from self._other_children_fds()

    def _private_fds(self) -> Iterator[int]:
        """Parent-only fds: no child keeps them."""
        assert self._wakeup is not None and self._selector is not None
        yield self._wakeup.rfd
        yield self._wakeup.wfd
        yield self._selector.fileno()
        if self._headers is not None:
            yield from self._headers.fds()
        for listener in self.listeners:
            if not listener.closed:
                yield listener.fileno()
        if self.metrics_listener is not None and not self.metrics_listener.closed:
            yield self.metrics_listener.fileno()
        if self._handoff is not None:
            yield self._handoff.fileno()
        if self._busy_r >= 0:
            yield self._busy_r
        if self._notes_r >= 0:
            yield self._notes_r
        if self._check is not None:
            yield self._check[1]
        if self._upgrade is not None:
            yield self._upgrade[1]
        if self._ready_fd >= 0:
            yield self._ready_fd
        yield from self._scrape_pidfds.values()

    def _shared_fds(self) -> Iterator[int]:
        """Fds a spare keeps until it has its connection (pool.py)."""
        for fd in (self._handoff_child, self._busy_w):
            if fd >= 0:
                yield fd

    def _other_children_fds(self) -> Iterator[int]:
        for queued in self._queued:  # other clients' connections, waiting at stop
            yield queued[0]
        for waiting in self._queued_datagrams:
            yield waiting[0]
        if self._pidfd_mode:
            yield from self.children.pidfds()

    def _fork_failed(self, exc: OSError, consequence: str, pause: bool = True) -> None:
        self.fork_failures += 1
        if self._fork_log.ready():
            held = self._fork_log.take_suppressed()
            logger.error(
                "fork() failed: %s; %s%s",
                exc.strerror,
                consequence,
                f" ({held} more since the last report)" if held else "",
            )
        # EAGAIN/ENOMEM pass when children exit: give them a moment.
        if pause:
            self._pause_listening()
            self._resume_at = time.monotonic() + BACKOFF_SECONDS

    def handle_error(self, request: Socket, client_address: Any) -> None:
        """Called in the child when the handler raised; logs the traceback."""
        logger.exception("handler failed for %s", format_address(request.family, client_address))

    def _pause_listening(self) -> None:
        if self._listening and self._selector is not None:
            for listener in self.listeners:
                if listener not in self._direct or self._watching_direct:
                    self._selector.unregister(listener.sock)
            self._listening = self._watching_direct = False
        if self._resume_at is not None:  # out of descriptors: the metrics listener too
            self._metrics_paused(True)

    def _metrics_paused(self, paused: bool) -> None:
        m = self.metrics_listener
        if m is None or m.closed or self._selector is None:
            return
        registered = m.sock in self._selector.get_map()
        if paused and registered:
            self._selector.unregister(m.sock)
        elif not paused and not registered:
            self._selector.register(m.sock, selectors.EVENT_READ, _METRICS)

    def _resume_listening(self) -> None:
        if self._resume_at is None:
            self._metrics_paused(False)
        self._fill_pool()
        if self._listening or self._stopping or self._selector is None or self._reexec_pending:
            return
        if self._resume_at is not None or not self._can_accept():
            return
        for listener in self.listeners:
            if listener not in self._direct:  # those: _sync_direct
                self._selector.register(listener.sock, selectors.EVENT_READ, listener)
        self._listening = True
        self._sync_direct()

    # -- children ending ---------------------------------------------------

    def _watch_pidfd(self, child: Child) -> None:
        assert self._selector is not None
        child.pidfd = os.pidfd_open(child.pid)
        self._selector.register(child.pidfd, selectors.EVENT_READ, child.pid)

    def _reap_pidfd(self, pid: int) -> None:
        if pid < 0:  # a scrape child (negated pid: not a connection's child)
            self._reap_scrape(-pid)
            return
        self._catch_up_busy()
        child = self.children.reap_pid(pid)
        if child is not None:
            assert self._selector is not None
            self._selector.unregister(child.pidfd)
            os.close(child.pidfd)
            self._after_reap([child])

    def _after_reap(self, gone: list[Child]) -> None:
        if not gone:
            return
        if self._per_child_work:
            for child in gone:
                self._admission.closed(child.source)
        if self.settings.access_log:
            for child in gone:  # the child wrote its own line, unless it was killed
                if os.WIFSIGNALED(child.status):
                    how = describe_status(child.status)
                    age = time.monotonic() - child.started
                    access.record(
                        "%s pid %d %.3fs %s", child.peer_text, child.pid, age, how,
                        peer=child.peer_text, pid=child.pid, duration=round(age, 6), status=how,
                    )  # fmt: skip
        if self._idle:
            for child in gone:
                if child.pid in self._idle:
                    self._idle.discard(child.pid)
                    # An idle spare exits 0 only when retired; one that died
                    # otherwise may have taken a connection it never reported.
                    # Counting one too few heals itself (the idle spares still
                    # take what is queued); one too many would keep a phantom
                    # spare, or at max_children stop accepting for good.
                    if child.status != 0 and self._in_transit:
                        self._in_transit -= 1
            self._in_transit = min(self._in_transit, len(self._idle))
        if len(self._lifetimes) > 2 * len(self.children) + 64:
            # Entries of exited children wait for their deadline to be popped;
            # rebuild from the living when they outnumber them, so the heap
            # stays O(children), not O(connections per max_lifetime).
            self._lifetimes = [e for e in self._lifetimes if e[1] in self.children]
            heapq.heapify(self._lifetimes)
        self._dispatch_queued()
        if not self._stopping and (not self._listening or self._pool):
            # A slot is free, and an exiting child may have freed descriptors
            # (ENFILE) or processes (fork's EAGAIN): try again now.
            self._resume_at = self._refill_at = None
            self._resume_listening()

    def _dispatch_queued(self) -> None:
        """Give the connections and datagrams waiting for a slot their child,
        as long as there is room."""
        while self._queued:
            # Off the queue before its child is forked: a new child closes
            # every queued fd, as other clients' connections.
            fd, family, peer, service = self._queued.popleft()
            if not self._dispatch(fd, family, peer, service):
                self._queued.appendleft((fd, family, peer, service))
                break
        while self._queued_datagrams:
            fd, data, family, peer, datagram_service = self._queued_datagrams.popleft()
            if not self._answer(fd, data, family, peer, datagram_service, owned=True):
                self._queued_datagrams.appendleft((fd, data, family, peer, datagram_service))
                break

    def handle_chld(self) -> None:
        self._catch_up_busy()
        if self._notes_r < 0:
            self._after_reap(self.children.reap())
            return
        try:
            notes = os.read(self._notes_r, _NOTES_READ)
        except BlockingIOError:
            notes = b""
        pids = _NOTE.unpack(notes) if len(notes) == 4 else memoryview(notes).cast("i")
        gone, walked = self.children.reap_noted(pids, self.settings.max_children)
        if walked:
            self._walk_at = None
        elif self._walk_at is None:
            self._walk_at = time.monotonic() + WALK_DELAY
        self._after_reap(gone)

    # -- stopping ------------------------------------------------------------

    def handle_term(self) -> None:
        self._begin_stop(immediate=self._stopping)

    def handle_int(self) -> None:
        self._begin_stop(immediate=self._stopping)

    def handle_quit(self) -> None:
        self._begin_stop(immediate=True)

    def handle_usr1(self) -> None:
        """Reopen the log file (after logrotate moved it away)."""
        path = getattr(self.settings, "log_file", "")
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

    # -- metrics --------------------------------------------------------------

    def _all_listeners(self) -> list[Listener]:
        extra = [self.metrics_listener] if self.metrics_listener is not None else []
        return [*self.listeners, *extra]

    def _scrape(self) -> None:
        """Fork a child to answer one metrics request from a snapshot of this
        parent's state (metrics.py): the parent itself computes nothing."""
        assert self.metrics_listener is not None
        try:
            fd, peer = self.metrics_listener.sock._accept()  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in SKIPPED_ACCEPT_ERRNOS:
                self._accept_failed(self.metrics_listener, exc)  # EMFILE: back off, as for all
            return
        if self._scrapes >= MAX_SCRAPES:
            os.close(fd)  # a flood of scrapes must not become a flood of forks
            return
        parent = os.getpid()
        try:
            pid = self._fork()
        except OSError as exc:
            os.close(fd)
            self._fork_failed(exc, "no metrics answered")
            return
        if pid == 0:
            from . import metrics

            def answer(conn: Socket, _peer: Any) -> None:
                metrics.serve_metrics(conn, metrics.snapshot(self, parent_pid=parent))

            serve_connection(
                fd,
                self.metrics_listener.family,
                peer,
                self._child_closes(),
                self._signals_to_reset,
                answer,
                self.handle_error,
                self._child_limits,  # as the children's user, who can read their memory
            )
        os.close(fd)
        self._scrapes += 1
        self.children.watch(pid, self._scrape_done)
        if self._pidfd_mode:
            assert self._selector is not None
            pidfd = os.pidfd_open(pid)
            self._scrape_pidfds[pid] = pidfd
            self._selector.register(pidfd, selectors.EVENT_READ, -pid)

    def _scrape_done(self, status: int) -> None:
        self._scrapes -= 1
        if status != 0:
            logger.warning("a metrics scrape child ended with %s", describe_status(status))

    def _reap_scrape(self, pid: int) -> None:
        self.children.reap_pid(pid)
        if not self.children.watching(pid):  # it has exited
            pidfd = self._scrape_pidfds.pop(pid)
            assert self._selector is not None
            self._selector.unregister(pidfd)
            os.close(pidfd)

    # -- reload (SIGHUP) and upgrade (SIGUSR2) -------------------------------

    def _spawn_command(
        self, argv: list[str], env: dict[str, str], out: int = -1, parent: bool = False
    ) -> int:
        """posix_spawn python -m forkserver *argv* (not subprocess, which would
        import threading into the parent: see log.py); returns the pid."""
        actions = [(os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)] if out >= 0 else []
        # Handled signals stay blocked until the new process has its handlers
        # (Wakeup unblocks them): a default action must not kill it meanwhile.
        return os.posix_spawn(
            sys.executable,
            [sys.executable, "-m", "forkserver", *argv],
            env,
            file_actions=actions,
            setsigmask=[int(s) for s in HANDLED_SIGNALS] if parent else [],
        )

    def _command_env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in ("FORKSERVER_BOOT",)}

    def _in_progress(self) -> str | None:
        """What a reload or an upgrade would collide with, if anything."""
        if self._upgrade:
            return "an upgrade"
        if self._stopping:
            return "a stop"
        if self._check or self._reexec_pending:
            return "a reload"
        return None

    def handle_hup(self) -> None:
        """Reload: check the new config in a separate process; if it is valid,
        re-execute (same pid) with the listeners and children handed over."""
        if self._argv is None:
            logger.warning("SIGHUP ignored: reload needs the command line (python -m forkserver)")
            return
        if busy := self._in_progress():
            logger.info("SIGHUP ignored: %s is in progress", busy)
            return
        systemd.notify("RELOADING=1")
        logger.info("SIGHUP: checking the new config before reloading")
        # Its output goes to a memfd, not a pipe: a pipe could fill (and hang
        # the check) or be held open by something the handler module starts.
        out = os.memfd_create("forkserver-check", os.MFD_CLOEXEC)
        try:
            pid = self._spawn_command([*self._argv, "--check"], self._command_env(), out=out)
        except OSError as exc:
            os.close(out)
            logger.error("reload failed: cannot start the config check: %s", exc.strerror)
            systemd.notify("READY=1")
            return
        self._check = (pid, out)
        self.children.watch(pid, self._check_done)

    def _check_done(self, status: int) -> None:
        assert self._check is not None
        _, out = self._check
        self._check = None
        try:  # a memfd: the check's output, whatever its size, read without blocking
            output = os.pread(out, 1 << 16, max(0, os.fstat(out).st_size - (1 << 16)))
        finally:
            os.close(out)
        if self._stopping or self._upgrade is not None:
            logger.info("reload abandoned: %s", "stopping" if self._stopping else "upgrading")
            return
        if status != 0:
            lines = output.decode(errors="replace").strip().splitlines() or ["(no output)"]
            logger.error("reload refused, still serving the old config: %s", lines[-1])
            systemd.notify("READY=1")
            return
        if self._headers:
            # Their header is half read: what was read would be lost across
            # exec. Hold new connections in the backlog (they survive the
            # exec) until these are done, at most proxy_timeout.
            logger.info("reloading once %d connections have their PROXY header", len(self._headers))
            self._reexec_pending = True
            self._pause_listening()
            return
        logger.info("reloading: the new config is valid; re-executing (pid %d)", os.getpid())
        self._reexec()

    def _reexec(self) -> None:
        """Become a new parent in place: same pid, same listeners, same children."""
        assert self._argv is not None
        self._retire_spares()  # idle spares run the old code: they exit on EOF
        self._dispatch_queued()  # what it took back: children adopted across exec
        now = time.monotonic()
        children = [(c.pid, int(c.family), c.peer, now - c.started) for c in self.children]
        env = self._command_env()
        notes = (self._notes_r, self._notes_w) if self._notes_w >= 0 else None
        env[INHERIT_ENV] = handover_env(self._all_listeners(), children, notes=notes)
        for fd, family, peer, _ in self._queued:  # rare: at the limit, a full handoff queue
            os.close(fd)
            logger.warning(
                "reload: closed a connection from %s queued at the limit",
                format_address(family, peer),
            )
        for fd, _, family, peer, _ in self._queued_datagrams:  # as rare
            os.close(fd)
            logger.warning(
                "reload: dropped a datagram from %s queued at the limit",
                format_address(family, peer),
            )
        self._queued.clear()  # closed: not to be served if the exec fails
        self._queued_datagrams.clear()
        sys.stdout.flush()
        sys.stderr.flush()
        # Until the new image has its handlers, a signal's default action
        # (SIGUSR1 and SIGHUP terminate) would kill the server: keep them
        # pending across exec (the mask survives it); Wakeup unblocks them.
        blocked = [int(s) for s in HANDLED_SIGNALS]
        _signal.pthread_sigmask(_signal.SIG_BLOCK, blocked)
        try:
            os.execve(sys.executable, [sys.executable, "-m", "forkserver", *self._argv], env)
        except OSError as exc:
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, blocked)
            for fd in notes or ():
                os.set_inheritable(fd, False)
            logger.error("reload failed: cannot re-execute: %s; still serving", exc)
            systemd.notify("READY=1")

    def handle_usr2(self) -> None:
        """Upgrade: start a new parent (new code) on the same listeners; stop
        accepting once it says it is ready, then drain and exit."""
        if self._argv is None:
            logger.warning("SIGUSR2 ignored: upgrade needs the command line (python -m forkserver)")
            return
        if busy := self._in_progress():
            logger.info("SIGUSR2 ignored: %s is in progress", busy)
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        env = self._command_env()
        env[INHERIT_ENV] = handover_env(self._all_listeners(), ready_fd=w)
        os.set_inheritable(w, True)
        try:
            pid = self._spawn_command(self._argv, env, parent=True)
        except OSError as exc:
            os.close(r)
            logger.error("upgrade failed: cannot start a new parent: %s", exc.strerror)
            return
        finally:
            os.close(w)
            boot.discard(env[INHERIT_ENV])  # the new parent has its own copy
            for listener in self._all_listeners():
                if not listener.closed:
                    os.set_inheritable(listener.fileno(), False)
        logger.info("SIGUSR2: started a new parent, pid %d; serving until it is ready", pid)
        self._upgrade = (pid, r)
        assert self._selector is not None
        self._selector.register(r, selectors.EVENT_READ, _UPGRADE_PIPE)
        self.children.watch(pid, self._new_parent_exited)

    def _upgrade_answer(self) -> None:
        assert self._upgrade is not None and self._selector is not None
        pid, r = self._upgrade
        try:
            said = os.read(r, 16)
        except OSError:
            said = b""
        self._selector.unregister(r)
        os.close(r)
        if said:
            logger.info("new parent %d is ready: handing over and stopping", pid)
            systemd.notify(f"MAINPID={pid}")
            self._begin_stop(handover=True)
        else:
            self._upgrade = None
            logger.error("upgrade failed: the new parent %d exited before it was ready", pid)

    def _new_parent_exited(self, status: int) -> None:
        if self._upgrade is not None and not self._stopping:
            logger.error("upgrade failed: the new parent exited with %s", describe_status(status))

    def _begin_stop(
        self, immediate: bool = False, close_listeners: bool = True, handover: bool = False
    ) -> None:
        if not self._stopping:
            self._stopping = True
            if not handover:  # after an upgrade, the new parent is the service
                systemd.notify("STOPPING=1")
                if self._upgrade is not None:  # not ready yet: it must not outlive us
                    logger.info("stopping the new parent %d too", self._upgrade[0])
                    try:
                        os.kill(self._upgrade[0], signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            self._pause_listening()
            # Before the drain: a spare the parent still counts as idle may
            # have accepted a connection itself, and a drained connection
            # handed to it would wait for a spare that never comes.  Drained
            # connections get a child forked for them instead.
            self._retire_spares()
            if not immediate:  # else dropped below, with the children killed
                self._dispatch_queued()
            if self.metrics_listener is not None and not self.metrics_listener.closed:
                if self._selector is not None:
                    self._selector.unregister(self.metrics_listener.sock)
                self.metrics_listener.close()
            if handover:
                # The new parent accepts from the same queues: leave them (and
                # the Unix socket files) to it, just let go of our copies.
                for listener in self.listeners:
                    listener.hand_over()
            elif close_listeners:
                self._close_listeners(drain=not immediate)
            if immediate and self._headers:
                self._headers.close_all("stopping now")
            if not immediate:
                self._term_at = time.monotonic() + self.settings.graceful_timeout
                logger.info(
                    "stopping: no longer accepting; waiting up to %.1fs for %d children",
                    self.settings.graceful_timeout,
                    len(self.children) + len(self._queued),
                )
        if immediate:
            logger.info("stopping now: killing %d children", len(self.children))
            self._term_at = None
            self._drop_queued("immediate stop")
            self.children.signal_all(signal.SIGKILL)

    def _retire_spares(self) -> None:
        """Close our end of the handoff socket: idle spares read EOF and exit
        (pool.py).  What is still queued in it is taken back and queued here,
        to get a child forked for it (_dispatch_queued): it may have been
        handed to a spare that took a connection of its own meanwhile."""
        if self._handoff is None:
            return
        self._handoff.close()
        self._handoff = None
        for fd, family, peer, index, datagram in reclaim(
            self._handoff_child, message_size(self._services)
        ):
            self._in_transit = max(0, self._in_transit - 1)
            service = self._services[index - 1] if index else None
            if service is not None and service.datagram:
                self._queued_datagrams.append((fd, datagram, family, peer, service))
            else:
                self._queued.append((fd, family, peer, service))

    def _close_listeners(self, drain: bool = True) -> None:
        if drain:
            self._drain_backlog()
        for listener in self.listeners:
            listener.close_and_unlink()

    def _drain_backlog(self) -> None:
        """Take in connections the kernel already queued, so closing the
        listeners does not reset them; serve each as a slot frees up."""
        drained: list[tuple[int, Any, Listener]] = []
        for listener in self.listeners:
            listener.refuse_new()
        for listener in self.listeners:
            if listener.datagram:
                for _ in range(self.settings.backlog):
                    if not self._receive(listener):
                        break
                continue
            while len(drained) + len(self._queued) < self.settings.backlog:
                try:
                    fd, peer = listener.sock._accept()  # type: ignore[attr-defined]
                except OSError:
                    break
                self.accepted += 1
                drained.append((fd, peer, listener))
            # Stop listening in every process at once: a child forked a moment
            # ago holds a copy of the listener until it gets to close it, and
            # what the kernel queued on that copy would be reset then. Only
            # after the accepts: shutdown() resets what is still queued (and
            # since refuse_new(), nothing new joins the queue).
            try:
                listener.sock.shutdown(SHUT_RD)
            except OSError:
                pass  # not connected: some kernels refuse it on a Unix listener
        for fd, peer, listener in drained:  # forks only now, the window above stays short
            service = listener.service
            if service is not None and service.trusted is not None:
                self._wait_for_header(fd, peer, listener)
            else:
                self._take(fd, listener.family, peer, service)

    def _drop_queued(self, why: str) -> None:
        if self._queued:
            logger.warning("closing %d queued connections unserved: %s", len(self._queued), why)
        while self._queued:
            os.close(self._queued.popleft()[0])
        if self._queued_datagrams:
            n = len(self._queued_datagrams)
            logger.warning("dropping %d queued datagrams unanswered: %s", n, why)
        while self._queued_datagrams:
            os.close(self._queued_datagrams.popleft()[0])

    def _stop_leftover_children(self) -> None:
        """Outside the loop (an error, or server_close() without serve_forever):
        TERM, wait up to kill_timeout, then KILL, and reap every one."""
        self.children.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.kill_timeout
        while self.children and time.monotonic() < deadline:
            if not self.children.reap():
                time.sleep(0.01)
        if self.children:
            self.children.signal_all(signal.SIGKILL)
        for child in self.children:
            try:
                _, status = os.waitpid(child.pid, 0)
            except ChildProcessError:
                status = 0
            self.children.exited(child.pid, status)


def _no_handler(conn: Socket, addr: Any) -> None:
    """Server.RequestHandlerClass when every listener has its own handler."""
    raise RuntimeError("no handler for this listener")


def _handler_name(handler: HandlerType | None) -> str:
    if handler is None:
        return "(each listener its own)"
    module = getattr(handler, "__module__", "?")
    return f"{module}:{getattr(handler, '__qualname__', repr(handler))}"
