"""What each connection cost: a reaped child's rusage, its death in words, the histograms.

With the access log or metrics, the parent reaps each child with ``wait4``
(children.py), which hands back the child's resource usage at no extra
system call: CPU user and system
time and peak RSS (``ru_maxrss``, KiB on Linux), its waited-for
descendants included.  From it:

* :func:`describe_status` says how a process ended ("exit status 3",
  "killed by SIGKILL"), and :class:`Deaths` why a child died of a signal:
  the CPU limit, the seccomp filter, max_lifetime, the OOM killer, a crash;
* :class:`Costs` keeps three histograms as bucket counters, updated at each
  reap with a few integer operations (only with a metrics listener); a
  scrape child reads them from its copy of the parent's memory.  They cost
  the parent about 8 copy-on-write faults per connection (104 against 96
  with the updates skipped, bench/accounting.py); one flat array of floats
  instead of lists of ints measured the same, so the lists stay.

A peak RSS counts the pages the child inherited from the parent and
touched, so it starts near the parent's own RSS, not at zero.
"""

from __future__ import annotations

import os
import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from resource import struct_rusage

    from .children import Child

__all__ = ["Costs", "Deaths", "Histogram", "describe_status"]

# Signals whose cause is known from the signal alone.
_REASONS: dict[int, str] = {
    signal.SIGXCPU: "the CPU time limit (limit_cpu)",
    signal.SIGXFSZ: "the file size limit",
    signal.SIGSYS: "the seccomp filter (a forbidden system call)",
    signal.SIGSEGV: "a segmentation fault (a crash in native code)",
    signal.SIGBUS: "a bus error (a crash in native code, or a truncated mapped file)",
    signal.SIGILL: "an illegal instruction (a crash in native code)",
    signal.SIGFPE: "an arithmetic fault in native code",
    signal.SIGABRT: "abort() (a failed check in native code)",
    signal.SIGPIPE: "a write to a closed pipe",
}


def _oom_kills() -> int:
    """The kernel's count of OOM kills (memory cgroups' included); -1 if unknown."""
    try:
        with open("/proc/vmstat", "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def describe_status(status: int) -> str:
    """'exit status 3' or 'killed by SIGKILL' for a raw waitpid status."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    core = " (core dumped)" if os.WCOREDUMP(status) else ""
    return f"killed by {name}{core}"


class Deaths:
    """Explains deaths by SIGKILL and SIGTERM, whose cause the signal does not say."""

    def __init__(self, limit_cpu: int = -1) -> None:
        self.limit_cpu = limit_cpu
        self._oom_kills = _oom_kills()  # read once at start, then only at an unexplained SIGKILL

    def why(self, status: int, sent: str = "") -> str:
        """Why a child reaped with raw wait *status* died of a signal, in
        words; "" when it exited, or when nothing is known.  *sent*: why
        forkserver signalled it, if it did."""
        if not os.WIFSIGNALED(status):
            return ""
        signum = os.WTERMSIG(status)
        if sent and signum in (signal.SIGTERM, signal.SIGKILL):
            return sent  # forkserver sent it: max_lifetime, a stop
        if signum == signal.SIGKILL:
            # Not limit_cpu's: its soft limit sends SIGXCPU (child/limits.py).
            # Nor can wait4's CPU time tell: the kernel checks the limit
            # against tick-sampled time, and children it SIGKILLed at a 1 s
            # hard limit showed 0.67 to 0.97 s of precise CPU time here.
            before, self._oom_kills = self._oom_kills, _oom_kills()
            if 0 <= before < self._oom_kills:
                return "the kernel's OOM killer, most likely (its oom_kill count rose)"
            return "not sent by forkserver: another process or the OOM killer"
        if signum == signal.SIGXCPU and self.limit_cpu >= 0:
            return f"the CPU time limit, limit_cpu = {self.limit_cpu}s"
        if signum in _REASONS:
            return _REASONS[signum]
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            return "not sent by forkserver: another process"
        return ""


class Histogram:
    """Counts per bucket (not yet cumulative) and a sum: a Prometheus histogram kept cheaply."""

    __slots__ = ("_bucket", "bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        from bisect import bisect_left  # only with metrics: the parent stays lean otherwise

        # bisect_left: the first bound >= value, as Prometheus's le ("less or equal").
        self._bucket = bisect_left
        self.bounds = bounds  # upper bounds, ascending; the last bucket is +Inf
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[self._bucket(self.bounds, value)] += 1
        self.sum += value


# Seconds of CPU (user + system) a connection's child used.
CPU_BOUNDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Peak RSS in bytes: from 8 MiB (about a lean parent's RSS, which a child starts with) to 4 GiB.
RSS_BOUNDS = tuple(float(mib << 20) for mib in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
# Seconds from fork (or, for a spare, from taking the connection) to reap.
DURATION_BOUNDS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0, 3600.0,
)  # fmt: skip


class Costs:
    """What the reaped connections cost, as three histograms (only with a metrics listener)."""

    def __init__(self) -> None:
        self.cpu = Histogram(CPU_BOUNDS)
        self.max_rss = Histogram(RSS_BOUNDS)
        self.duration = Histogram(DURATION_BOUNDS)

    def record(self, child: Child, usage: struct_rusage | None, now: float) -> None:
        """*child* was reaped at *now* (monotonic) having used *usage*."""
        if usage is None or child.peer is None:
            return  # auto-reaped (no rusage), or a spare that never had a connection
        self.cpu.observe(usage.ru_utime + usage.ru_stime)
        self.max_rss.observe(usage.ru_maxrss << 10)  # KiB on Linux
        self.duration.observe(now - child.started)
