"""The parent's event loop: one epoll, a callback per fd, one deadline heap.

Every fd the parent watches (listeners, the signal pipe, each child's pidfd,
the PROXY header reader...) is registered with the callable that handles it,
and the loop calls ``callback(fd)`` when the fd is readable: no type switch
on what kind of fd it is.  Every timer (a paused listener's resume, a stop's
TERM and KILL deadlines, a child's max_lifetime, a PROXY header's deadline)
is an entry on one heap; while the heap is empty, as on the default path,
the loop sleeps in ``epoll_wait`` without a timeout and reads no clock.

The heap is kept by two short functions rather than heapq, whose C half is a
shared library: its five mappings would be copied by every fork and torn
down by every child's exit (~2 us each, so ~10 us per connection, measured:
``python -m bench.mappings``), and importing it with the first timer could
fail just when one is needed, out of descriptors (EMFILE: accept's backoff).
"""

from __future__ import annotations

import select
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Entry = tuple[float, int, "Timer"]  # (when, sequence number, timer)

__all__ = ["Loop", "Timer", "heap_pop", "heap_push"]


class Timer:
    """A callback due at a deadline; cancel() takes it off the loop."""

    __slots__ = ("callback", "when")

    def __init__(self, when: float, callback: Callable[[], None] | None) -> None:
        self.when = when
        self.callback = callback

    def cancel(self) -> None:
        self.callback = None  # left on the heap; skipped when it comes up


class Loop:
    """epoll with a callable per fd and a heap of timers; only the parent's thread runs it."""

    def __init__(self) -> None:
        self._epoll = select.epoll()  # close-on-exec
        self._callbacks: dict[int, Callable[[int], None]] = {}
        # add_reader() and remove_reader() in pieces, for the one caller that
        # runs them for every connection (children.py) and must not pay two
        # Python calls for it (each cost the parent 2 copy-on-write faults
        # per connection: its function and code objects' reference counts).
        self.register = self._epoll.register
        self.unregister = self._epoll.unregister
        self.callbacks = self._callbacks
        self._timers: list[Entry] = []
        self._seq = 0  # ties on the heap break by order of scheduling
        self._cancelled = 0
        self.running = False
        # Run after each batch of callbacks while set: for what must be
        # checked whatever woke the loop (is a stop done?), never on the
        # default path.
        self.after_batch: Callable[[], None] | None = None

    def fileno(self) -> int:
        return self._epoll.fileno()

    def add_reader(self, fd: int, callback: Callable[[int], None], events: int = 0) -> None:
        """Call ``callback(fd)`` whenever *fd* is readable (or *events* happen)."""
        self._epoll.register(fd, events or select.EPOLLIN)
        self._callbacks[fd] = callback

    def remove_reader(self, fd: int) -> None:
        """Stop watching *fd*; call before closing it (epoll forgets closed fds
        only once every duplicate is closed, and children hold duplicates)."""
        if self._callbacks.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def watching(self, fd: int) -> bool:
        return fd in self._callbacks

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Run *callback* once ``time.monotonic()`` reaches *when*."""
        timer = Timer(when, callback)
        self._seq += 1
        heap_push(self._timers, (when, self._seq, timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(time.monotonic() + delay, callback)

    def cancel(self, timer: Timer | None) -> None:
        """Cancel *timer* (None: nothing); the heap is compacted when
        cancelled entries outnumber live ones, so it stays O(live timers)."""
        if timer is None or timer.callback is None:
            return
        timer.cancel()
        self._cancelled += 1
        if self._cancelled > 64 and self._cancelled * 2 > len(self._timers):
            # In place: run() holds a reference to this list.
            self._timers[:] = [entry for entry in self._timers if entry[2].callback is not None]
            self._timers.sort()  # a sorted list is a heap
            self._cancelled = 0

    def run(self) -> None:
        """Dispatch until stop() is called (by a callback)."""
        self.running = True
        if self.after_batch is not None:  # set before the loop started
            self.after_batch()
        poll = self._epoll.poll
        callbacks = self._callbacks
        timers = self._timers
        while self.running:
            if timers:
                self._run_due()
                if self.after_batch is not None:
                    self.after_batch()
                if not self.running:
                    break
                timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else -1.0
            else:
                timeout = -1.0  # the common case: sleep until an fd is ready
            for fd, _ in poll(timeout):
                # "in" and [], not .get(): the method object is one more
                # page touched (so copied) per event after each fork.
                if fd in callbacks:  # else removed by an earlier callback of this batch
                    callbacks[fd](fd)
            if self.after_batch is not None:
                self.after_batch()

    def _run_due(self) -> None:
        """Run the timers that are due, and drop cancelled ones from the top."""
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heap_pop(self._timers)
            callback = timer.callback
            if callback is None:
                self._cancelled = max(0, self._cancelled - 1)
                continue
            timer.callback = None
            callback()
        while self._timers and self._timers[0][2].callback is None:  # cancelled
            heap_pop(self._timers)
            self._cancelled = max(0, self._cancelled - 1)

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self._callbacks.clear()
        self._timers.clear()
        try:
            self._epoll.close()
        except OSError:
            pass  # already closed


def heap_push(heap: list[Entry], entry: Entry) -> None:
    """Add *entry* to *heap* (heapq.heappush: see the module docstring)."""
    heap.append(entry)
    at = len(heap) - 1
    while at:
        parent = (at - 1) >> 1
        if not entry < heap[parent]:
            break
        heap[at] = heap[parent]  # move the later parent down
        at = parent
    heap[at] = entry


def heap_pop(heap: list[Entry]) -> Entry:
    """Remove and return the smallest entry of non-empty *heap* (heapq.heappop)."""
    last = heap.pop()
    if not heap:
        return last
    top = heap[0]
    end, at = len(heap), 0
    while (child := 2 * at + 1) < end:  # sift *last* down from the root
        if child + 1 < end and heap[child + 1] < heap[child]:
            child += 1
        if not heap[child] < last:
            break
        heap[at] = heap[child]
        at = child
    heap[at] = last
    return top
