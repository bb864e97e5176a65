"""The serving parent: its collaborators wired together, the loop run, all closed after.

``Parent`` builds, once per Server, the objects that each do one job
(loop, accept, fork, children, spares, stop, reload, scrape), and decides
once which path each event takes, so that the default path pays for no
feature that is not configured.  ``serve()`` takes over the signals, starts
listening, runs the loop until a stop is done, and leaves nothing behind.
"""

from __future__ import annotations

import gc
import os
import sys
import time

from .. import log, pidfile, systemd
from ..admission import Admission
from ..child.limits import ChildLimits
from ..child.stream import access_line
from ..child.warm import warm_up
from . import pidfds, threads
from .accept import Acceptor
from .accounting import Costs, describe_status
from .children import ChildTable
from .fork import Forker
from .loop import Loop
from .reload import Reloader
from .signals import HANDLED_SIGNALS, SIGNALS, SignalPipe
from .stop import Stopper

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from socket import socket as Socket
    from typing import Any

    from ..config import Settings
    from ..listeners import Listener
    from ..service import Service
    from .children import Child
    from .scrape import Scraper
    from .spares import Spares

__all__ = ["Parent"]

logger = log.get_logger(__name__)


class Parent:
    """The serving parent of one Server."""

    def __init__(
        self,
        settings: Settings,
        run: Callable[[Any, Any], None],
        on_error: Callable[[Any, Any], None],
    ) -> None:
        """*run* is the server's finish_request (the default handler), *on_error*
        its handle_error: both called in the child."""
        self.settings = settings
        self.loop = loop = Loop()
        self.forker = forker = Forker()
        self.limits = ChildLimits(settings)
        limits = self.limits if self.limits.any else None
        if settings.sandbox is not None:  # decided once: no sandbox, nothing imported
            from ..sandbox import SandboxedLimits

            limits = SandboxedLimits(settings, settings.sandbox)
        self.children = ChildTable(loop, lambda child: None)
        self.children.deaths.limit_cpu = settings.limit_cpu
        self.admission = Admission(settings)
        self.acceptor = acceptor = Acceptor(
            settings, loop, self.children, forker, self.admission, limits, run, on_error
        )
        self.spares: Spares | None = None
        if settings.spare_children > 0:
            # Imported only here: the spares' wire format needs struct, a
            # shared library whose mappings every fork would copy (loop.py).
            from .spares import Spares

            spares = Spares(settings, loop, self.children, forker, run, on_error, limits)
            spares.may_watch = lambda: acceptor.listening and acceptor.can_accept()
            spares.watch = acceptor.watch_direct
            if acceptor.per_child_work:  # admission or max_lifetime: else nothing to start
                spares.serving_starts = acceptor.serving_starts
            spares.fork_failed = acceptor.fork_failed
            self.children.before_reap = spares.catch_up
            acceptor.spares = self.spares = spares
        self.stopper = Stopper(settings, loop, acceptor, self.children, self.spares)
        self.reloader = Reloader(
            None, loop, acceptor, self.children, self.stopper, self._all_listeners
        )
        self.metrics_listener: Listener | None = None
        self._scraper: Scraper | None = None
        self.pipe: SignalPipe | None = None
        self.ready_fd = -1  # tell the parent that started us (an upgrade) we are up
        self.adopted: list[tuple[int, int, Any, float]] = []  # a reload's children
        self.shutdown_request = False
        self.exiting_after_serve = False  # the process exits next (the command line)
        forker.parent_only(self._private_fds)
        # What each connection cost, for /metrics: histograms in the parent,
        # read by the scrape child from its copy.
        self.costs = self.children.costs = Costs() if settings.metrics else None
        if settings.access_log or self.costs is not None:
            self.children.keep_usage()
        # Which reap callback runs is decided once: the default path pays
        # for no feature it has not configured.
        if self.spares is not None or settings.access_log or self.costs is not None:
            self.children.on_exit = self._after_reap
        else:
            self.children.on_exit = acceptor.slot_freed

    # -- counters the metrics snapshot reads --------------------------------------

    @property
    def accepted(self) -> int:
        return self.acceptor.accepted + (self.spares.accepted if self.spares else 0)

    @property
    def idle(self) -> set[int]:
        return self.spares.idle if self.spares is not None else set()

    # -- the signals' actions (signals.py names them) -------------------------------

    def handle_term(self) -> None:
        self.stopper.begin(immediate=self.stopper.stopping)

    handle_int = handle_term

    def handle_quit(self) -> None:
        self.stopper.begin(immediate=True)

    def handle_hup(self) -> None:
        self.reloader.reload()

    def handle_usr2(self) -> None:
        self.reloader.start_upgrade()

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

    def woken(self) -> None:
        """Another thread wrote to the pipe: shutdown() asks for a stop."""
        if self.shutdown_request and not self.stopper.stopping:
            self.stopper.begin(close_listeners=False)

    # -- serving --------------------------------------------------------------------

    def serve(
        self,
        listeners: list[Listener],
        services: list[Service],
        answer_scrape: Callable[[Socket, Any], None],
        handler_name: str,
        handlers: Sequence[Any] = (),
    ) -> None:
        """Serve until a stop is done.  *answer_scrape* answers a metrics
        request in a scrape child; *handler_name* is for the ready line;
        *handlers* are warmed up before the first fork (child/warm.py)."""
        self.pipe = pipe = SignalPipe()
        self.forker.changed()
        loop, acceptor = self.loop, self.acceptor
        try:
            if pipe.install():
                self.forker.signals = HANDLED_SIGNALS
            actions = {int(signum): getattr(self, "handle_" + a) for signum, a in SIGNALS.items()}
            loop.add_reader(pipe.rfd, lambda _fd: pipe.dispatch(actions, self.woken))
            threads.check()  # once, before the first fork: other threads are a hazard
            self.children.fd_floor = pidfds.make_room(self.settings.max_children)
            if self.spares is not None:
                self.spares.start(listeners, services, not self.admission.enabled)
            acceptor.start(listeners)
            if self.metrics_listener is not None:
                self._start_scraper(self.metrics_listener, answer_scrape)
            if self.settings.umask >= 0:
                os.umask(self.settings.umask)
            now = time.monotonic()
            for pid, family, peer, age in self.adopted:  # a reload's children, still serving
                child = self.children.add(pid, family, peer, now - age)
                if acceptor.per_child_work:
                    acceptor.serving_starts(child)
                    self.admission.opened(child.source)
            self.adopted = []
            # Warm before any fork, the first spares' (acceptor.resume) included.
            warm_up([lis.family for lis in listeners], handlers)
            # Everything imported so far is shared with every child; keep the
            # collector from touching (and so copying) those pages after fork.
            gc.collect()
            gc.freeze()
            # Output the handler module buffered at import would otherwise be
            # flushed again by every child from its copy of the buffer.
            sys.stdout.flush()
            sys.stderr.flush()
            acceptor.resume()
            if self.settings.pidfile:  # before anything says we are ready
                pidfile.write(self.settings.pidfile)
            self._say_ready(listeners, handler_name)
            if self.shutdown_request:  # asked before the loop could hear it
                self.woken()
            loop.run()
        finally:
            self._finish()

    def close(self) -> None:
        """Not serving, for good (server_close()): stop the children left, if
        any, and close the loop's epoll fd."""
        if self.children:
            self.children.close()
            self.children.stop_all(self.settings.kill_timeout)
        self.loop.close()

    def _private_fds(self) -> list[int]:
        """The loop's, the signal pipe's and the reload's fds: no child keeps them."""
        fds = [self.loop.fileno(), *self.reloader.fds()]
        if self.pipe is not None:
            fds += (self.pipe.rfd, self.pipe.wfd)
        if self.ready_fd >= 0:
            fds.append(self.ready_fd)
        return fds

    def _all_listeners(self) -> list[Listener]:
        extra = [self.metrics_listener] if self.metrics_listener is not None else []
        return [*self.acceptor.listeners, *extra]

    def _after_reap(self, child: Child) -> None:
        """A child was reaped, with spares, an access log or metrics configured."""
        if self.costs is not None:
            self.costs.record(child, self.children.usage, time.monotonic())
        if self.settings.access_log and os.WIFSIGNALED(child.status):
            # The child wrote its own line, unless it was killed: the parent
            # knows no byte counts, but what wait4 said it used.
            usage = self.children.usage
            access_line(
                child.peer_text, child.pid, time.monotonic() - child.started, None,
                describe_status(child.status),
                (usage.ru_utime, usage.ru_stime, usage.ru_maxrss) if usage else None,
                self.children.why,
            )  # fmt: skip
        if self.spares is not None:
            self.spares.gone(child)
        self.acceptor.slot_freed(child)
        if self.spares is not None and not self.stopper.stopping:
            # A slot is free, and an exiting child may have freed processes
            # (fork's EAGAIN): replace the spares now.
            self.spares.refill_now()

    def _start_scraper(self, listener: Listener, answer: Callable[[Socket, Any], None]) -> None:
        from .scrape import Scraper

        if self._scraper is None or self._scraper.listener is not listener:
            limits = self.limits if self.limits.any else None
            self._scraper = Scraper(
                listener, self.loop, self.children, self.forker, self.acceptor, answer,
                self.acceptor.on_error, limits,
            )  # fmt: skip
            self.acceptor.backoff.on_change = self._scraper.paused
            self.stopper.on_stop.append(self._scraper.stop_began)
        self._scraper.paused(False)

    def _say_ready(self, listeners: list[Listener], handler_name: str) -> None:
        for listener in listeners:
            label = listener.service.label if listener.service is not None else ""
            logger.info("listening on %s%s", listener.name, label)
        if self.metrics_listener is not None:
            logger.info("metrics on http://%s/metrics", self.metrics_listener.name)
        logger.info(
            "forkserver ready: pid %d, handler %s, max_children %d, spare_children %d",
            os.getpid(),
            handler_name,
            self.settings.max_children,
            self.settings.spare_children,
        )
        systemd.notify(f"READY=1\nMAINPID={os.getpid()}")
        if self.ready_fd >= 0:  # the old parent of an upgrade may stop now
            try:
                os.write(self.ready_fd, b"ready")
            except OSError:
                pass  # it is gone already
            os.close(self.ready_fd)
            self.ready_fd = -1
            self.forker.changed()

    def _finish(self) -> None:
        """After the loop (a stop, or an exception): leave nothing behind."""
        if self.settings.pidfile:
            pidfile.remove(self.settings.pidfile)
        self.loop.after_batch = None
        if self._scraper is not None:  # open until now: /healthz said 503 during the drain
            self._scraper.close()
        if self.spares is not None:
            self.stopper.take_back_from_spares()
        self.acceptor.finish()  # closes what was taken back, too
        if self.spares is not None:
            self.spares.close()
        if self.children:  # only if the loop died of an exception
            self.children.close()
            self.children.stop_all(self.settings.kill_timeout)
        self.stopper.reset()
        self.shutdown_request = False
        pipe = self.pipe
        assert pipe is not None
        self.loop.remove_reader(pipe.rfd)
        # From the command line the process exits next: keep our handlers,
        # or a late SIGUSR2 (default: terminate) would turn exit 0 into -12.
        pipe.close(restore=not self.exiting_after_serve)
        self.pipe = None
        self.forker.signals = ()
        self.forker.changed()
        gc.unfreeze()
