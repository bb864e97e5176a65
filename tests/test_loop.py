"""forkserver/parent/loop.py: the deadline heap and the timers on it.

The loop keeps its heap with two functions of its own (heapq's C half would
be one more shared library for every fork to copy): they must order entries
exactly as heapq does.  Timers run in deadline order, ties in the order they
were set; a cancelled timer never runs, and cancelling many keeps the heap
as small as the live timers.
"""

from __future__ import annotations

import functools
import heapq
import random
import time

import pytest

from forkserver.parent.loop import Loop, Timer, heap_pop, heap_push


@pytest.mark.timeout(30)
def test_heap_push_and_pop_order_entries_as_heapq_does() -> None:
    rng = random.Random(11)
    for trial in range(500):
        ours: list[tuple[float, int, Timer]] = []
        theirs: list[tuple[float, int, Timer]] = []
        for seq in range(rng.randrange(80)):
            if theirs and rng.random() < 0.4:
                assert heap_pop(ours) == heapq.heappop(theirs), trial
            else:
                when = rng.choice([0.5, 1.0, rng.random()])  # ties break on seq
                entry = (when, seq, Timer(when, None))
                heap_push(ours, entry)
                heapq.heappush(theirs, entry)
            assert ours == theirs, trial  # the same layout, not only the same order
        while theirs:
            assert heap_pop(ours) == heapq.heappop(theirs)
        assert ours == []


@pytest.mark.timeout(30)
def test_timers_run_by_deadline_ties_in_order_and_cancelled_ones_never() -> None:
    loop = Loop()
    ran: list[str] = []
    now = time.monotonic()
    try:
        for name, ago in [("c", 1.0), ("a", 3.0), ("b1", 2.0), ("b2", 2.0), ("x", 2.5)]:
            timer = loop.call_at(now - ago, functools.partial(ran.append, name))
            if name == "x":
                loop.cancel(timer)
        loop.call_at(now, loop.stop)  # due last of all
        loop.call_later(3600, functools.partial(ran.append, "later"))  # not due: left on the heap
        loop.run()
    finally:
        loop.close()
    assert ran == ["a", "b1", "b2", "c"]


@pytest.mark.timeout(30)
def test_cancelling_most_timers_compacts_the_heap_to_the_live_ones() -> None:
    loop = Loop()
    try:
        far = time.monotonic() + 3600
        offsets = list(range(300))
        random.Random(5).shuffle(offsets)  # out of order: the compaction must re-heap
        timers = [loop.call_at(far + i, functools.partial(print, i)) for i in offsets]
        for timer in timers[:250]:
            loop.cancel(timer)
        live = [entry[2] for entry in loop._timers if entry[2].callback is not None]
        assert {id(timer) for timer in live} == {id(timer) for timer in timers[250:]}
        # Compaction keeps cancelled entries to at most 64, or to no more than the live ones.
        assert len(loop._timers) <= len(live) + max(64, len(live))
        whens = [heap_pop(loop._timers)[0] for _ in range(len(loop._timers))]
        assert whens == sorted(whens)  # still a heap after the compaction
    finally:
        loop.close()
