"""The hook path: socketserver's request cycle, for a Server that overrides its hooks.

A subclass that overrides ``get_request``, ``verify_request``,
``process_request``, ``close_request`` or ``shutdown_request`` gets
socketserver's own cycle, each hook in the process socketserver calls it in::

    parent: get_request() -> verify_request()? -> process_request()
              (False: shutdown_request(); an exception: handle_error(),
               shutdown_request())
            process_request(): fork(), then close_request() in the parent
    child:  finish_request() (an Exception: handle_error()),
            shutdown_request(), os._exit(status)

Whether a listener takes this path is decided once, at start
(``requests.overridden``): a server that overrides none of them never
imports this module, and its connections take accept.py's default path.
"""

from __future__ import annotations

import select
import time

from ..child.start import become

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..listeners import Listener
    from .children import Child
    from .parent import Parent

__all__ = ["Requests", "collect"]


class Requests:
    """The parent's half of the hook path for one server (see the module docstring)."""

    def __init__(self, server: Any, parent: Parent) -> None:
        self._server = server
        self._parent = parent
        # The listener get_request() reads from: the one that is ready.
        self.ready: Listener | None = None

    def callback(self, listener: Listener) -> Callable[[int], None]:
        """The loop's callback for *listener* on the hook path."""

        def on_readable(_fd: int) -> None:
            self.ready = listener
            self.handle_one()

        return on_readable

    def handle_one(self) -> None:
        """One request through the hooks (socketserver's _handle_request_noblock)."""
        server, acceptor = self._server, self._parent.acceptor
        try:
            request, client_address = server.get_request()
        except (BlockingIOError, InterruptedError):
            return  # another process took it, or the peer reset it first
        except OSError as exc:
            if self.ready is not None:  # EMFILE and the like: back off, do not spin
                acceptor.accept_failed(self.ready, exc)
            return
        acceptor.accepted += 1
        if not self._refused(request, client_address):
            self._verify_and_process(request, client_address)
        if acceptor.listening and not acceptor.can_accept():
            acceptor.pause()

    def _verify_and_process(self, request: Any, client_address: Any) -> None:
        server = self._server
        if server.verify_request(request, client_address):
            try:
                server.process_request(request, client_address)
            except Exception:
                server.handle_error(request, client_address)
                server.shutdown_request(request)
            except BaseException:
                server.shutdown_request(request)
                raise
        else:
            server.shutdown_request(request)

    def install(self) -> None:
        """At start: the listeners' callbacks, and the stop's drain (which
        accepts what the backlog holds), go through the hooks."""
        acceptor = self._parent.acceptor
        acceptor.request_path = self.callback
        # Instance attributes, set once: the default path never reads them.
        setattr(acceptor, "take", self.take)  # noqa: B010
        setattr(acceptor.datagrams, "receive", self.receive)  # noqa: B010

    def take(self, fd: int, family: int, peer: Any, service: Any = None) -> None:
        """A connection the stop's drain accepted: verify_request and
        process_request decide, as for any other."""
        import socket

        self._dispatch(socket.socket(family, socket.SOCK_STREAM, 0, fd), peer)

    def receive(self, listener: Listener) -> bool:
        """A datagram the stop's drain reads; False when none was waiting."""
        try:
            data, peer = listener.sock.recvfrom(self._server.max_packet_size)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # an ICMP error for an earlier reply
        self._parent.acceptor.accepted += 1
        self._dispatch((data, listener.sock), peer)
        return True

    def _dispatch(self, request: Any, client_address: Any) -> None:
        parent = self._parent
        acceptor, full = parent.acceptor, len(parent.children) >= parent.settings.max_children
        if not full or isinstance(request, tuple) or parent.settings.when_full == "refuse":
            if not self._refused(request, client_address):
                self._verify_and_process(request, client_address)
            return
        # The drain at max_children: verified now, served as children exit
        # (by the default child path: the loop must not block in a stop).
        if self._server.verify_request(request, client_address):
            family = _family(request)
            acceptor.queued.append((request.detach(), family, client_address, None))
            parent.forker.changed()
        else:
            self._server.shutdown_request(request)

    def _refused(self, request: Any, client_address: Any) -> bool:
        """Admission rules (allow, deny, per-source limits) and when_full =
        "refuse", before verify_request, as on the default path."""
        parent = self._parent
        acceptor, admission = parent.acceptor, parent.admission
        full = len(parent.children) >= parent.settings.max_children
        if not admission.enabled and not full:
            return False
        family = _family(request)
        reason = admission.check(family, client_address, acceptor.busy_children())
        if reason is None and not full:
            return False
        reason = reason or "full"
        if isinstance(request, tuple):
            acceptor.refusals.drop_datagram(family, client_address, reason)
        else:
            acceptor.refusals.refuse(request.detach(), family, client_address, reason)
        return True

    def fork(self, request: Any, client_address: Any) -> None:
        """The default process_request: fork a child that runs finish_request
        and shutdown_request; close_request here, in the parent."""
        parent, server = self._parent, self._server
        forker, acceptor = parent.forker, parent.acceptor
        family = _family(request)
        closes = forker.closes()
        try:
            pid = forker.fork()
        except OSError as exc:
            acceptor.fork_failed_backing_off(exc, "the request goes to handle_error")
            raise  # to handle_error, then shutdown_request, as in socketserver
        if pid == 0:
            if isinstance(request, tuple):
                # A datagram's socket is a listener, which the child closes
                # with the parent's fds: the handler answers on its own copy.
                request = (request[0], request[1].dup())
            limits = parent.limits if parent.limits.any else None
            become(
                closes, forker.signals, limits, family, client_address,
                finish_in_child, server, request, client_address, limits,
            )  # fmt: skip
        child = parent.children.add(pid, family, client_address, time.monotonic())
        if acceptor.per_child_work:
            acceptor.serving_starts(child)
            parent.admission.opened(child.source)
        server.close_request(request)

    def handle_request(self, timeout: float | None) -> None:
        """Wait up to *timeout* (None: for ever) for one request and serve it,
        or call handle_timeout() (socketserver's handle_request)."""
        server, parent = self._server, self._parent
        listeners = [lis for lis in parent.acceptor.listeners or server.listeners if not lis.closed]
        # socketserver waits on fileno(): an override decides what is waited on.
        fds = [server.fileno()] if len(listeners) == 1 else [lis.fileno() for lis in listeners]
        while len(parent.children) >= parent.settings.max_children:
            if not collect(parent, blocking=True, at_most=1):
                break  # no pidfd to wait on (out of descriptors): serve over the limit
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = poller.poll(None if wait is None else wait * 1000)
            if ready:
                fd = ready[0][0]
                self.ready = next((lis for lis in listeners if lis.fileno() == fd), listeners[0])
                self.handle_one()
                return
            if deadline is not None and time.monotonic() >= deadline:
                server.handle_timeout()
                return


def finish_in_child(server: Any, request: Any, client_address: Any, limits: Any) -> int:
    """The child's half (socketserver's ForkingMixIn): finish_request, then
    shutdown_request; handle_error gets an Exception only.  Returns the exit status."""
    status = 1
    started = time.monotonic() if limits is not None and limits.access_log else 0.0
    try:
        if limits is not None and not isinstance(request, tuple):
            limits.apply_to_connection(request)
        server.finish_request(request, client_address)
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception:
        server.handle_error(request, client_address)
    finally:
        counts = _counts(request) if started else None
        server.shutdown_request(request)
    if started:
        from ..child.stream import served

        family = _family(request)
        served(family, client_address, time.monotonic() - started, counts or (None, None), status)
    return status


def _counts(request: Any) -> tuple[int, int | None] | None:
    """Bytes in and out, for the access line: a datagram's size, or TCP_INFO's."""
    if isinstance(request, tuple):
        return len(request[0]), None
    from ..child.tcp_info import byte_counts

    return byte_counts(request)


def collect(parent: Parent, blocking: bool, at_most: int = 0) -> int:
    """Reap the children that have exited (socketserver's collect_children),
    outside the loop: through their pidfds, so never a process we did not
    start.  *blocking* waits until every child has exited (or *at_most* of
    them).  Returns how many were reaped."""
    children = parent.children
    # Outside the loop no listener is watched: what the loop does after a
    # reap (listen again, serve what waits) is for serve_forever() to start.
    on_exit, children.on_exit = children.on_exit, _nothing
    try:
        return children.collect(blocking, at_most)
    finally:
        children.on_exit = on_exit


def _nothing(child: Child) -> None:
    pass


def _family(request: Any) -> int:
    sock = request[1] if isinstance(request, tuple) else request
    return int(sock.family)
