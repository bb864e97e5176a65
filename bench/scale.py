"""Scale: thousands of open connections, each with its own child; new ones stay fast.

    python -m bench.scale                          # 5,000 held, both modes: 2-3 minutes
    python -m bench.scale --held 500 --samples 50 --window 1 --spares 0

For each mode (fork on accept, ``--spare-children 0``; then a pool of
``--spares`` pre-forked children), forkserver's echo runs with
``max_children`` above ``--held`` and a ``--backlog`` that holds a batch of
connects.  Measured, in this order:

1. with no connection held: the parent's CPU over an idle ``--window``, then
   the latency (connect to EOF) of ``--samples`` fresh 64-byte churn
   connections, one at a time (``bench.load --concurrency 1``, a separate
   process);
2. ``--held`` connections are opened from this process, in batches, and each
   does one echo round, so each is being served; then psutil must find at
   least that many live children of the server;
3. the same idle window and the same fresh-connection latency, with them held;
4. the held connections are closed and the time until every child is reaped
   is noted.

The ratio of the two p50 latencies is issue 3's target (at most 2x).  The
parent's idle cost is read from /proc: CPU seconds (psutil, 10 ms ticks), run
time in ns (``/proc/PID/task/*/schedstat``) and voluntary context switches;
a parent blocked in epoll_wait with no timer shows zeros.  The parent's CPU
per fresh connection (run time / connections) shows what the held children
cost it (``waitpid`` walks the list of children, for one).

This process raises its RLIMIT_NOFILE soft limit to the hard limit to hold
the client sockets; if the hard limit, RLIMIT_NPROC, pid_max or free memory
cannot take ``--held`` connections, fewer are held and the result says so.
Results: ``bench/results/scale-<time>.json`` and ``scale-latest.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import socket
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil

from .common import RESULTS_DIR, LoadError, _busy_seconds, mb, metadata, run_load, write_results
from .servers import RunningServer, ServerError, forkserver_spec, serve

FD_MARGIN = 64  # descriptors this process needs besides the held sockets
PROC_MARGIN = 500  # processes left to everything else when capping --held by limits
CHILD_MEMORY = 2 * 2**20  # generous bytes per idle child (USS ~0.5 MiB, page tables)
PING = b"scale-ping\n"  # what each held connection echoes once
SETTLE_PAUSE = 0.5  # s: after the parent's last job, before an idle window starts
WAIT_LIMIT = 120.0  # s: most any wait for children to appear or go


class Limits:
    """How many connections this machine lets us hold, and why fewer if so."""

    def __init__(self, requested: int) -> None:
        self.requested = requested
        self.notes: list[str] = []
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        self.nofile = soft
        held = requested
        if soft != resource.RLIM_INFINITY and soft - FD_MARGIN < held:
            held = max(soft - FD_MARGIN, 0)
            self.notes.append(f"RLIMIT_NOFILE hard limit is {hard}: raise it (ulimit -Hn)")
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        if nproc != resource.RLIM_INFINITY and nproc - PROC_MARGIN < held:
            held = max(nproc - PROC_MARGIN, 0)
            self.notes.append(f"RLIMIT_NPROC is {nproc} (ulimit -u)")
        pid_room = _pid_max() - len(psutil.pids()) - PROC_MARGIN
        if pid_room < held:
            held = max(pid_room, 0)
            self.notes.append(f"kernel.pid_max is {_pid_max()}")
        memory_room = psutil.virtual_memory().available // CHILD_MEMORY
        if memory_room < held:
            held = int(memory_room)
            self.notes.append(
                f"{mb(psutil.virtual_memory().available):,.0f} MB available, "
                f"~{CHILD_MEMORY // 2**20} MiB per child"
            )
        self.held = held

    def as_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "held": self.held,
            "rlimit_nofile": self.nofile,
            "reduced_because": self.notes,
        }


def _pid_max() -> int:
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 32768


def _somaxconn() -> int | None:
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _runtime_ns(pid: int) -> int | None:
    """Nanoseconds *pid*'s threads have run on a CPU (schedstat), or None."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total


def _kdamonds() -> list[psutil.Process]:
    """The kernel's DAMON threads, if any run (see ``ParentMeter``)."""
    found = []
    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith("kdamond"):
            found.append(p)
    return found


def _cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


class ParentMeter:
    """Readings of the server parent's own CPU and context switches (not its children's).

    Also what the rest of the machine did meanwhile: busy cores overall, and
    the CPU of DAMON's ``kdamond`` threads where the kernel runs them (some
    VMs do, to find cold memory): DAMON's physical-address checks walk every
    mapping of a page, and a page of the parent's is mapped by every child,
    so with thousands of children it costs far more, and it takes the locks
    that fork and exit need.
    """

    def __init__(self, server: RunningServer) -> None:
        self.pid = server.pid
        self.proc = psutil.Process(server.pid)
        self.kdamonds = _kdamonds()

    def read(self) -> dict[str, Any]:
        t = self.proc.cpu_times()
        ctx = self.proc.num_ctx_switches()
        busy, _ = _busy_seconds()
        return {
            "t": time.monotonic(),
            "cpu_s": t.user + t.system,
            "runtime_ns": _runtime_ns(self.pid),
            "voluntary": ctx.voluntary,
            "involuntary": ctx.involuntary,
            "machine_busy_s": busy,
            "kdamond_s": _cpu_of(self.kdamonds) if self.kdamonds else None,
        }

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        runtime = (
            (b["runtime_ns"] - a["runtime_ns"]) / 1e6
            if a["runtime_ns"] is not None and b["runtime_ns"] is not None
            else None
        )
        wall = b["t"] - a["t"]
        return {
            "seconds": wall,
            "cpu_s": round(b["cpu_s"] - a["cpu_s"], 3),
            "runtime_ms": runtime,
            "voluntary_switches": b["voluntary"] - a["voluntary"],
            "involuntary_switches": b["involuntary"] - a["involuntary"],
            "machine_busy_cores": (b["machine_busy_s"] - a["machine_busy_s"]) / wall
            if wall > 0
            else None,
            "kdamond_cores": (b["kdamond_s"] - a["kdamond_s"]) / wall
            if wall > 0 and a["kdamond_s"] is not None
            else None,
        }


def _live_children(server: RunningServer) -> int:
    """The server's children that have not exited (zombies not counted)."""
    n = 0
    for child in server.children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                n += 1
        except psutil.NoSuchProcess:
            continue
    return n


def wait_children(server: RunningServer, want: int, at_least: bool) -> tuple[int, float]:
    """Wait (bounded, polling) until the server has >= (or <=) *want* children.

    Returns (children seen last, seconds waited).  Polls: nothing outside the
    server signals a fork or a reap.
    """
    t0 = time.monotonic()
    deadline = t0 + WAIT_LIMIT
    while True:
        n = len(server.children())
        if (n >= want) if at_least else (n <= want):
            return n, time.monotonic() - t0
        if time.monotonic() >= deadline:
            return n, time.monotonic() - t0
        time.sleep(0.05)


def idle_window(meter: ParentMeter, seconds: float) -> dict[str, Any]:
    """The parent's CPU and context switches over *seconds* with nothing to do."""
    time.sleep(SETTLE_PAUSE)  # its last fork or reap is over
    a = meter.read()
    time.sleep(seconds)
    return ParentMeter.delta(a, meter.read())


def fresh_latency(
    server: RunningServer, meter: ParentMeter, samples: int, payload: int
) -> dict[str, Any]:
    """Latency of *samples* churn connections, one at a time, and the parent's CPU for them."""
    a = meter.read()
    report = run_load(
        server.address,
        "--mode",
        "churn",
        "--payload",
        str(payload),
        "--concurrency",
        "1",
        "--connections",
        str(samples),
        "--duration",
        str(max(60, samples)),
        time_limit=max(60, samples) + 60,
    )
    parent = ParentMeter.delta(a, meter.read())
    lat = report["latency_ms"]
    n = max(report["connections"], 1)
    return {
        "connections": report["connections"],
        "p50_ms": lat["p50"],
        "p90_ms": lat["p90"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "conn_per_s": report["conn_per_s"],
        "errors_total": report["errors_total"],
        "errors": report["errors"],
        "parent_us_per_conn": (
            parent["runtime_ms"] * 1e3 / n if parent["runtime_ms"] is not None else None
        ),
        "machine_busy_cores": parent["machine_busy_cores"],
        "kdamond_cores": parent["kdamond_cores"],
    }


def _await_echoes(batch: list[socket.socket], deadline: float) -> None:
    """Read PING back on every socket of *batch*; raise ServerError otherwise."""
    with selectors.DefaultSelector() as sel:
        got: dict[int, bytes] = {}
        for sock in batch:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, sock)
            got[sock.fileno()] = b""
        while got:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerError(f"{len(got)} held connections got no echo in time")
            for key, _ in sel.select(min(left, 1.0)):
                conn: socket.socket = key.data
                try:
                    data = conn.recv(len(PING))
                except BlockingIOError:
                    continue
                if not data:
                    raise ServerError("the server closed a held connection")
                fd = conn.fileno()
                got[fd] += data
                if len(got[fd]) >= len(PING):
                    if got[fd] != PING:
                        raise ServerError(f"a held connection echoed {got[fd]!r}, not {PING!r}")
                    del got[fd]
                    sel.unregister(conn)


def hold(server: RunningServer, count: int, batch: int, stack: ExitStack) -> list[socket.socket]:
    """Open *count* connections, each echoing PING once; they stay open in *stack*.

    Batches no bigger than the backlog: a connect completes in the kernel
    before the parent accepts it, so a bigger burst would overflow the
    listen queue and turn into SYN retries (1 s each).
    """
    socks: list[socket.socket] = []
    deadline = time.monotonic() + WAIT_LIMIT
    while len(socks) < count:
        if time.monotonic() >= deadline:
            raise ServerError(f"only {len(socks)} of {count} connections opened in time")
        chunk: list[socket.socket] = []
        for _ in range(min(batch, count - len(socks))):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.settimeout(10)
            sock.connect(server.address)
            sock.sendall(PING)
            chunk.append(sock)
        socks += chunk
        _await_echoes(chunk, deadline)
    return socks


def measure_mode(spares: int, held: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement for one server mode (spares = 0: fork on accept)."""
    max_children = held + spares + 100
    spec = forkserver_spec(max_children, args.backlog, spare_children=spares)
    row: dict[str, Any] = {"spare_children": spares, "max_children": max_children}
    log = sys.stderr
    with serve(spec) as server:
        meter = ParentMeter(server)
        row["parent_threads"] = meter.proc.num_threads()
        if args.warmup:
            fresh_latency(server, meter, args.warmup, args.payload)
        wait_children(server, spares, at_least=False)
        print(f"  none held: idle window {args.window:g} s", file=log, flush=True)
        none = {"idle": idle_window(meter, args.window)}
        none["latency"] = fresh_latency(server, meter, args.samples, args.payload)
        row["none"] = none
        print(
            f"  none held: p50 {none['latency']['p50_ms']:.3f} ms; opening {held:,} connections",
            file=log,
            flush=True,
        )
        with ExitStack() as stack:
            available = psutil.virtual_memory().available
            a = meter.read()
            hold(server, held, args.batch, stack)
            n, _ = wait_children(server, held + spares, at_least=True)
            opened = ParentMeter.delta(a, meter.read())
            live = _live_children(server)
            state: dict[str, Any] = {
                "connections": held,
                "open_s": opened["seconds"],
                "parent_us_per_open": (
                    opened["runtime_ms"] * 1e3 / held if opened["runtime_ms"] and held else None
                ),
                "children": n,
                "live_children": live,
                "parent_rss_mb": mb(server.rss()),
                "parent_fds": meter.proc.num_fds(),
                # What the children (and the client sockets) took from the machine.
                "memory_mb": mb(available - psutil.virtual_memory().available),
            }
            row["held"] = state
            if live < held:
                raise ServerError(f"{held:,} connections held but only {live:,} live children")
            print(
                f"  {held:,} held ({live:,} live children) in {opened['seconds']:.1f} s: "
                f"idle window {args.window:g} s",
                file=log,
                flush=True,
            )
            state["idle"] = idle_window(meter, args.window)
            state["latency"] = fresh_latency(server, meter, args.samples, args.payload)
            state["live_children_after"] = _live_children(server)
            print(f"  held: p50 {state['latency']['p50_ms']:.3f} ms; closing", file=log, flush=True)
            a = meter.read()
        # ExitStack closed every held socket: each child reads EOF and exits.
        n, waited = wait_children(server, spares, at_least=False)
        closed = ParentMeter.delta(a, meter.read())
        row["close"] = {
            "drain_s": waited,
            "children_left": n,
            "parent_runtime_ms": closed["runtime_ms"],
        }
        # EMFILE, fork failures and the like are logged by the server: keep them.
        row["server_warnings"] = [
            line for line in server.lines if " WARNING " in line or " ERROR " in line
        ][-20:]
    base, loaded = row["none"]["latency"], row["held"]["latency"]
    row["p50_ratio"] = loaded["p50_ms"] / base["p50_ms"] if base["p50_ms"] else None
    row["p90_ratio"] = loaded["p90_ms"] / base["p90_ms"] if base["p90_ms"] else None
    return row


def _mode_name(spares: int) -> str:
    return "forkserver-pool" if spares else "forkserver"


def table(result: dict[str, Any]) -> str:
    """The result as a plain-text table."""
    s = result["settings"]
    lines = []
    if s["held"] < s["held_requested"]:
        lines.append(
            f"held {s['held']:,} instead of {s['held_requested']:,}: "
            + "; ".join(result["limits"]["reduced_because"])
        )
    lines.append(
        f"{s['samples']} fresh {s['payload']}-byte connections, one at a time; "
        f"idle windows of {s['window']:g} s"
    )
    lines.append(
        f"{'mode':<16} {'held':>6} {'p50 ms':>8} {'p90 ms':>8} {'x none':>7} "
        f"{'parent us/conn':>14} {'idle cpu s':>10} {'idle ms run':>11} {'idle vcsw':>9} "
        f"{'busy':>5} {'kdamond':>7} {'errors':>6}"
    )
    for name, row in result["modes"].items():
        if "failed" in row:
            lines.append(f"{name:<16} failed: {row['failed']}")
            continue
        for label, part in (("0", row["none"]), (f"{row['held']['connections']:,}", row["held"])):
            lat, idle = part["latency"], part["idle"]
            ratio = row["p50_ratio"] if part is row["held"] else 1.0
            lines.append(
                f"{name:<16} {label:>6} {lat['p50_ms']:>8.3f} {lat['p90_ms']:>8.3f} "
                f"{ratio:>7.2f} {_f(lat['parent_us_per_conn'], '.0f'):>14} "
                f"{idle['cpu_s']:>10.2f} {_f(idle['runtime_ms'], '.3f'):>11} "
                f"{idle['voluntary_switches']:>9} {_f(lat['machine_busy_cores'], '.2f'):>5} "
                f"{_f(lat['kdamond_cores'], '.2f'):>7} {lat['errors_total']:>6}"
            )
        h = row["held"]
        lines.append(
            f"{'':<16} opened in {h['open_s']:.1f} s ({_f(h['parent_us_per_open'], '.0f')} us "
            f"parent CPU each); {h['live_children']:,} live children; parent RSS "
            f"{h['parent_rss_mb']:g} MB, {h['parent_fds']} fds; machine memory "
            f"{h['memory_mb']:,.0f} MB; closed and reaped in "
            f"{row['close']['drain_s']:.1f} s"
        )
        lines += [f"{'':<16} server: {line}" for line in row["server_warnings"]]
    lines.append(
        "parent us/conn: the parent's CPU per fresh connection; idle: the parent over an idle "
        "window; busy, kdamond: cores used by the whole machine and by DAMON's kdamond "
        "during the fresh connections"
    )
    return "\n".join(lines)


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.scale", description=__doc__.split("\n", 1)[0])
    p.add_argument("--held", type=int, default=5000, help="connections held open (5000)")
    p.add_argument("--samples", type=int, default=200, help="fresh connections measured (200)")
    p.add_argument("--window", type=float, default=5.0, help="idle window, seconds (5)")
    p.add_argument("--spares", type=int, default=8, help="pool mode's spares; 0: no pool run (8)")
    p.add_argument("--warmup", type=int, default=200, help="connections after start (200)")
    p.add_argument("--payload", type=int, default=64, help="bytes per fresh connection (64)")
    p.add_argument("--backlog", type=int, default=1024, help="server listen backlog (1024)")
    p.add_argument("--batch", type=int, default=256, help="connects per burst while holding")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Both modes; the result as written to JSON."""
    limits = Limits(args.held)
    if limits.held < args.held:
        print(
            f"bench.scale: holding {limits.held:,} connections, not {args.held:,}: "
            + "; ".join(limits.notes),
            file=sys.stderr,
        )
    result = metadata("bench.scale", argv)
    cap = _somaxconn()
    result["settings"] = {
        "held_requested": args.held,
        "held": limits.held,
        "samples": args.samples,
        "window": args.window,
        "spares": args.spares,
        "warmup": args.warmup,
        "payload": args.payload,
        "backlog": args.backlog,
        "batch": min(args.batch, args.backlog if cap is None else min(args.backlog, cap)),
        "somaxconn": cap,
    }
    result["limits"] = limits.as_dict()
    result["modes"] = {}
    args.batch = result["settings"]["batch"]
    for spares in [0, args.spares] if args.spares else [0]:
        name = _mode_name(spares)
        print(f"{name} (spare_children {spares})", file=sys.stderr, flush=True)
        try:
            result["modes"][name] = measure_mode(spares, limits.held, args)
        except (ServerError, LoadError, OSError) as exc:
            print(f"  {name} failed: {exc}", file=sys.stderr, flush=True)
            result["modes"][name] = {"failed": f"{type(exc).__name__}: {exc}"}
    return result


def failed(result: dict[str, Any]) -> bool:
    """Whether any mode failed or any fresh connection did."""
    for row in result["modes"].values():
        if "failed" in row:
            return True
        if row["none"]["latency"]["errors_total"] or row["held"]["latency"]["errors_total"]:
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.held < 1 or args.samples < 1 or args.window <= 0 or args.batch < 1:
        print("bench.scale: need --held, --samples, --batch >= 1, --window > 0", file=sys.stderr)
        return 2
    if args.spares < 0 or args.warmup < 0 or args.payload < 1 or args.backlog < 1:
        print("bench.scale: --spares, --warmup >= 0; --payload, --backlog >= 1", file=sys.stderr)
        return 2
    result = run(args, argv)
    path = write_results("scale", result, args.out)
    if args.json:
        print(json.dumps(result))
        print(f"results: {path}", file=sys.stderr)
    else:
        print(table(result))
        print(f"results: {path}")
    return 1 if failed(result) else 0


if __name__ == "__main__":
    raise SystemExit(main())
