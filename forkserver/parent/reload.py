"""Reload (SIGHUP) and upgrade (SIGUSR2): both re-run the command line.

* **Reload**: the new config is checked first, in a separate process
  (``--check``); if it is valid the parent re-executes itself in place (same
  pid, so systemd and pidfiles stay right), handing its listeners and its
  children across exec (handover.py).  A child keeps serving its client
  throughout, and the new image reaps it.
* **Upgrade**: a new parent (new code) starts beside this one on the same
  listeners; once it says it is ready, this one stops accepting, drains and
  exits, as at a graceful stop.

Only the command line (``python -m forkserver``) can reload or upgrade: a
Server used as a library has no command to re-run.
"""

from __future__ import annotations

import _signal
import os
import sys
import time

from .. import log, systemd
from ..addresses import format_address
from ..handover import INHERIT_ENV, discard, handover_env
from .accounting import describe_status
from .signals import HANDLED_SIGNALS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from ..listeners import Listener
    from .accept import Acceptor
    from .children import ChildTable
    from .loop import Loop
    from .stop import Stopper

__all__ = ["Reloader"]

logger = log.get_logger(__name__)


class Reloader:
    """The parent's SIGHUP and SIGUSR2."""

    def __init__(
        self,
        argv: list[str] | None,
        loop: Loop,
        acceptor: Acceptor,
        children: ChildTable,
        stopper: Stopper,
        all_listeners: Callable[[], list[Listener]],
    ) -> None:
        self.argv = argv
        self._loop = loop
        self._acceptor = acceptor
        self._children = children
        self._stopper = stopper
        self._all_listeners = all_listeners
        self._check: tuple[int, int] | None = None  # the config check: pid, its output memfd
        self._pending = False  # a reload waits for PROXY headers being read
        self.upgrade: tuple[int, int] | None = None  # a new parent: pid, its readiness pipe
        stopper.on_stop.append(self._stopping)

    def fds(self) -> list[int]:
        """Parent-only fds: a child forked now closes them."""
        fds = [self._check[1]] if self._check is not None else []
        if self.upgrade is not None and self.upgrade[1] >= 0:
            fds.append(self.upgrade[1])
        return fds

    def _in_progress(self) -> str | None:
        """What a reload or an upgrade would collide with, if anything."""
        if self.upgrade:
            return "an upgrade"
        if self._stopper.stopping:
            return "a stop"
        if self._check or self._pending:
            return "a reload"
        return None

    # -- reload ------------------------------------------------------------------

    def reload(self) -> None:
        """Check the new config in a separate process; if it is valid,
        re-execute (same pid) with the listeners and children handed over."""
        if self.argv is None:
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
            pid = _spawn_command([*self.argv, "--check"], _command_env(), out=out)
        except OSError as exc:
            os.close(out)
            logger.error("reload failed: cannot start the config check: %s", exc.strerror)
            systemd.notify("READY=1")
            return
        self._check = (pid, out)
        self._acceptor.changed()
        self._children.watch(pid, self._checked)

    def _checked(self, status: int) -> None:
        assert self._check is not None
        _, out = self._check
        self._check = None
        self._acceptor.changed()
        try:  # a memfd: the check's output, whatever its size, read without blocking
            output = os.pread(out, 1 << 16, max(0, os.fstat(out).st_size - (1 << 16)))
        finally:
            os.close(out)
        if self._stopper.stopping or self.upgrade is not None:
            why = "stopping" if self._stopper.stopping else "upgrading"
            logger.info("reload abandoned: %s", why)
            return
        if status != 0:
            lines = output.decode(errors="replace").strip().splitlines() or ["(no output)"]
            logger.error("reload refused, still serving the old config: %s", lines[-1])
            systemd.notify("READY=1")
            return
        headers = self._acceptor.proxied.reader
        if headers:
            # Their header is half read: what was read would be lost across
            # exec. Hold new connections in the backlog (they survive the
            # exec) until these are done, at most proxy_timeout.
            logger.info("reloading once %d connections have their PROXY header", len(headers))
            self._pending = self._acceptor.held = True
            self._acceptor.pause()
            self._loop.after_batch = self._when_headers_done
            return
        logger.info("reloading: the new config is valid; re-executing (pid %d)", os.getpid())
        self._reexec()

    def _when_headers_done(self) -> None:
        if self._acceptor.proxied.reader:
            return
        self._loop.after_batch = None
        self._pending = self._acceptor.held = False
        if not self._stopper.stopping and self.upgrade is None:
            logger.info("reloading: re-executing (pid %d)", os.getpid())
            self._reexec()

    def _reexec(self) -> None:
        """Become a new parent in place: same pid, same listeners, same children."""
        assert self.argv is not None
        acceptor = self._acceptor
        self._stopper.take_back_from_spares()  # idle spares run the old code: they exit on EOF
        acceptor.dispatch_queued()  # what it took back: children adopted across exec
        now = time.monotonic()
        children = [(c.pid, int(c.family), c.peer, now - c.started) for c in self._children]
        env = _command_env()
        env[INHERIT_ENV] = handover_env(self._all_listeners(), children)
        for fd, family, peer, _ in acceptor.queued:  # rare: at the limit, a full handoff queue
            os.close(fd)
            logger.warning(
                "reload: closed a connection from %s queued at the limit",
                format_address(family, peer),
            )
        for fd, _, family, peer, _ in acceptor.datagrams.queued:  # as rare
            os.close(fd)
            logger.warning(
                "reload: dropped a datagram from %s queued at the limit",
                format_address(family, peer),
            )
        acceptor.queued.clear()  # closed: not to be served if the exec fails
        acceptor.datagrams.queued.clear()
        acceptor.changed()
        sys.stdout.flush()
        sys.stderr.flush()
        # Until the new image has its handlers, a signal's default action
        # (SIGUSR1 and SIGHUP terminate) would kill the server: keep them
        # pending across exec (the mask survives it); signals.py unblocks them.
        _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            os.execve(sys.executable, [sys.executable, "-m", "forkserver", *self.argv], env)
        except OSError as exc:
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, HANDLED_SIGNALS)
            discard(env[INHERIT_ENV])
            logger.error("reload failed: cannot re-execute: %s; still serving", exc)
            systemd.notify("READY=1")

    # -- upgrade ------------------------------------------------------------------

    def start_upgrade(self) -> None:
        """Start a new parent (new code) on the same listeners; stop accepting
        once it says it is ready, then drain and exit."""
        if self.argv is None:
            logger.warning("SIGUSR2 ignored: upgrade needs the command line (python -m forkserver)")
            return
        if busy := self._in_progress():
            logger.info("SIGUSR2 ignored: %s is in progress", busy)
            return
        r, w = os.pipe2(os.O_CLOEXEC)
        env = _command_env()
        env[INHERIT_ENV] = handover_env(self._all_listeners(), ready_fd=w)
        os.set_inheritable(w, True)
        try:
            pid = _spawn_command(self.argv, env, parent=True)
        except OSError as exc:
            os.close(r)
            logger.error("upgrade failed: cannot start a new parent: %s", exc.strerror)
            return
        finally:
            os.close(w)
            discard(env[INHERIT_ENV])  # the new parent has its own copy
            for listener in self._all_listeners():
                if not listener.closed:
                    os.set_inheritable(listener.fileno(), False)
        logger.info("SIGUSR2: started a new parent, pid %d; serving until it is ready", pid)
        self.upgrade = (pid, r)
        self._acceptor.changed()
        self._loop.add_reader(r, self._upgrade_answer)
        self._children.watch(pid, self._new_parent_exited)

    def _upgrade_answer(self, r: int) -> None:
        assert self.upgrade is not None
        pid, _ = self.upgrade
        try:
            said = os.read(r, 16)
        except OSError:
            said = b""
        self._loop.remove_reader(r)
        os.close(r)
        self.upgrade = (pid, -1)
        self._acceptor.changed()
        if said:
            logger.info("new parent %d is ready: handing over and stopping", pid)
            systemd.notify(f"MAINPID={pid}")
            self._stopper.begin(handover=True)
        else:
            self.upgrade = None
            logger.error("upgrade failed: the new parent %d exited before it was ready", pid)

    def _new_parent_exited(self, status: int) -> None:
        if self.upgrade is not None and not self._stopper.stopping:
            logger.error("upgrade failed: the new parent exited with %s", describe_status(status))

    def _stopping(self, handover: bool) -> None:
        """A stop began: a new parent not yet ready must not outlive us."""
        if handover or self.upgrade is None:
            return
        logger.info("stopping the new parent %d too", self.upgrade[0])
        try:
            os.kill(self.upgrade[0], 15)  # SIGTERM
        except ProcessLookupError:
            pass


def _command_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "FORKSERVER_BOOT"}


def _spawn_command(
    argv: list[str], env: dict[str, str], out: int = -1, parent: bool = False
) -> int:
    """posix_spawn python -m forkserver *argv* (not subprocess, which would
    import threading into the parent: see log.py); returns the pid."""
    actions = [(os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)] if out >= 0 else []
    # Handled signals stay blocked until the new process has its handlers
    # (signals.py unblocks them): a default action must not kill it meanwhile.
    return os.posix_spawn(
        sys.executable,
        [sys.executable, "-m", "forkserver", *argv],
        env,
        file_actions=actions,
        setsigmask=list(HANDLED_SIGNALS) if parent else [],
    )
