"""Where a child's pidfd goes: descriptor numbers, and the open-files limit.

The parent holds a pidfd per live child (children.py).  An accepted
connection takes the lowest free descriptor number, and a handler may give
it to select(), which refuses numbers of 1024 and up; with hundreds of
pidfds below 1024, connections would climb past it.  So a pidfd numbered
LOW or more is moved to FLOOR (1024) or more, and the parent raises its soft
RLIMIT_NOFILE, within the hard limit, to fit max_children of them there.

A pidfd numbered below LOW stays where pidfd_open() put it: moving every
one cost 8 copy-on-write faults per connection in the parent (an fcntl, a
close, and an int object per fd number, which Python caches only below 256:
67.5 against 75.4 faults, 3 x 1,000 one-client connections,
/proc/PID/stat) and a larger descriptor table to copy at each fork.

Neither fcntl nor resource is imported on the default path: each is a shared
library, whose five mappings every fork copies and every child's exit tears
down (~2 us per mapping and connection, measured: ``python -m
bench.mappings``).  The lean parent finds the limit raised already (boot.py
raises it before the re-exec: limits survive exec) and reads it with
os.sysconf; only a hard limit too low for max_children makes it import
resource, to find that out.  fcntl comes with the first pidfd that has to
move.
"""

from __future__ import annotations

import os

__all__ = ["FLOOR", "LOW", "higher", "make_room"]

# Pidfds below this number stay (with fewer than ~250 children alive).
LOW = 256
FLOOR = 1024
RESERVE = 64  # descriptors beyond one pidfd per child: listeners, logs, the handler's own


def make_room(max_children: int) -> int:
    """Raise the soft RLIMIT_NOFILE to fit *max_children* pidfds above FLOOR;
    returns the floor to move them to (0 when the hard limit leaves no room:
    then they stay where they are)."""
    need = FLOOR + max_children + RESERVE
    room = os.sysconf("SC_OPEN_MAX")  # the soft limit; -1: unlimited
    if room < 0 or room >= need:
        return FLOOR
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    return FLOOR if soft == resource.RLIM_INFINITY or soft >= need else 0


def higher(pidfd: int, floor: int) -> int:
    """*pidfd* moved to *floor* or above, if there is room (and a floor)."""
    if pidfd >= floor:
        return pidfd
    try:
        from fcntl import F_DUPFD_CLOEXEC, fcntl  # past ~250 children only: see above

        high = fcntl(pidfd, F_DUPFD_CLOEXEC, floor)
    except (ImportError, OSError):  # ImportError: out of fds to load fcntl
        return pidfd  # no room up there: a low number will do
    os.close(pidfd)
    return high
