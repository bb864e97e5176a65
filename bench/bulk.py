"""Bulk: one connection echoing 64 MiB, forkserver against a bare recv/sendall loop.

    python -m bench.bulk                        # 3 rounds x 5 cycles x 3 servers: ~30 s
    python -m bench.bulk --mib 4 --rounds 1 --repeat 1

Servers, all under the interpreter running this script, on 127.0.0.1:
forkserver's echo (``forkserver.examples.echo``) forking on accept,
the same with a pool of ``--spares`` pre-forked children, and
``bench/peers/bare_echo.py``: one process doing ``accept()`` then
``while data := conn.recv(65536): conn.sendall(data)``, the same loop with
no fork and no framework.  Each round starts the three servers afresh and
does one unmeasured transfer to each, then ``--repeat`` cycles of one
measured transfer per server, each on a new connection, the order reversing
every cycle: a machine whose speed drifts favours none, and each cycle gives
a paired ratio to the bare loop.

A transfer: connect; one thread ``sendall``s ``--mib`` MiB of random bytes
(a memoryview over a buffer made beforehand) then half-closes, while this
thread ``recv_into``s the echo into a preallocated buffer, which it then
checks against what was sent (length, BLAKE2b digest, EOF right after), so a
fast wrong answer fails.  Throughput is the size over the time from
``connect()`` to the last byte back: the fork, or the hand-off to a spare, is
part of a connection's cost.  Nothing is hashed or allocated while the clock
runs.  The client's own CPU (both threads) is reported in cores, so a reader
can judge whether it was the bottleneck; so is the server's (its parent and
reaped children; psutil's 10 ms ticks make it coarse).  Medians over every
measured transfer; the median over cycles of each forkserver mode's ratio to
the bare loop is issue 3's target (at least 0.9).  Results: ``bench/results/bulk-<time>.json``
and ``bulk-latest.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, median, metadata, write_results
from .servers import HOST, ROOT, RunningServer, ServerError, ServerSpec, forkserver_spec, serve

MIB = 2**20
BASELINE = "bare"
SERVERS = ("forkserver", "forkserver-pool", BASELINE)
SETTLE_LIMIT = 5.0  # s: most to wait for the serving child to be reaped


def bare_spec(backlog: int) -> ServerSpec:
    """``bench/peers/bare_echo.py``, which prints its port."""
    script = str(ROOT / "bench" / "peers" / "bare_echo.py")
    argv = [sys.executable, script, "--host", HOST, "--port", "0", "--backlog", str(backlog)]
    return ServerSpec(BASELINE, argv, r"^(\d+)$", r"^\d+$")


def specs(names: list[str], spares: int, backlog: int) -> list[ServerSpec]:
    out = []
    for name in names:
        if name == "forkserver":
            out.append(forkserver_spec(16, backlog))
        elif name == "forkserver-pool":
            out.append(forkserver_spec(16 + spares, backlog, spare_children=spares))
        elif name == BASELINE:
            out.append(bare_spec(backlog))
        else:
            raise ValueError(f"unknown server {name!r}: {', '.join(SERVERS)}")
    return out


class Payload:
    """What is sent (random, with its digest) and a preallocated buffer for the echo."""

    def __init__(self, nbytes: int) -> None:
        self.size = nbytes
        self.data = os.urandom(nbytes)  # random: no pattern an echo could get right by luck
        self.digest = hashlib.blake2b(self.data).hexdigest()
        self.received = bytearray(nbytes)

    def clear(self) -> None:
        """Zero the receive buffer, so nothing from the last transfer can pass for an echo.

        Also faults its pages in before the clock starts."""
        buf = (ctypes.c_char * self.size).from_buffer(self.received)
        ctypes.memset(buf, 0, self.size)
        del buf  # the bytearray cannot be resized while exported


def _send(sock: socket.socket, data: memoryview, errors: list[str]) -> None:
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        errors.append(f"send: {exc}")


def _abort(sock: socket.socket, timed_out: list[bool]) -> None:
    timed_out.append(True)
    try:
        sock.shutdown(socket.SHUT_RDWR)  # unblocks both threads
    except OSError:
        pass


def transfer(address: tuple[str, int], payload: Payload, timeout: float) -> dict[str, Any]:
    """Echo *payload* once over a new connection; throughput and verdict.

    Blocking sockets without a timeout (a timeout would add a poll() per
    call); a watchdog timer shuts the socket down after *timeout* seconds.
    """
    payload.clear()
    view = memoryview(payload.received)
    errors: list[str] = []
    timed_out: list[bool] = []
    got = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    sock = socket.create_connection(address)
    t_connected = t_last = time.perf_counter()
    watchdog = threading.Timer(timeout, _abort, (sock, timed_out))
    watchdog.start()
    sender = threading.Thread(target=_send, args=(sock, memoryview(payload.data), errors))
    sender.start()
    try:
        while got < payload.size:
            n = sock.recv_into(view[got:])
            if n == 0:
                break
            got += n
        t_last = time.perf_counter()
        if got == payload.size and sock.recv(1):
            errors.append("more bytes than were sent")
    except OSError as exc:
        errors.append(f"recv: {exc}")
    finally:
        watchdog.cancel()
        sender.join(timeout)
        sock.close()
        view.release()
    cpu = time.process_time() - cpu0
    if timed_out:
        errors.append(f"timed out after {timeout:g} s")
    if got != payload.size:
        errors.append(f"received {got} of {payload.size} bytes")
    elif hashlib.blake2b(payload.received).hexdigest() != payload.digest:
        errors.append("echo differs from what was sent (BLAKE2b)")
    elapsed = t_last - t0
    return {
        "bytes": got,
        "seconds": elapsed,
        "mib_per_s": got / MIB / elapsed if elapsed > 0 else None,
        "connect_ms": (t_connected - t0) * 1e3,
        "client_cores": cpu / elapsed if elapsed > 0 else None,
        "verified": not errors,
        "errors": errors,
    }


def _wait_reaped(server: RunningServer, spares: int) -> None:
    """Until the child that served the last transfer is reaped (bounded, polling)."""
    deadline = time.monotonic() + SETTLE_LIMIT
    while len(server.children()) > spares and time.monotonic() < deadline:
        time.sleep(0.01)


def measure(server: RunningServer, spares: int, payload: Payload, timeout: float) -> dict[str, Any]:
    """One measured transfer, with the server's CPU for it."""
    parent0, children0 = server.cpu_seconds()
    row = transfer(server.address, payload, timeout)
    _wait_reaped(server, spares)
    parent1, children1 = server.cpu_seconds()
    cpu = (parent1 - parent0) + (children1 - children0)
    row["server_cpu_s"] = cpu
    row["server_cores"] = cpu / row["seconds"] if row["seconds"] > 0 else None
    return row


def _round(
    index: int,
    servers: list[ServerSpec],
    payload: Payload,
    args: argparse.Namespace,
    runs: list[dict[str, Any]],
) -> None:
    """Start every server, warm each up, then ``--repeat`` cycles of one transfer each.

    Transfers to the servers alternate within a cycle (the order reverses
    every other cycle), so a machine whose speed drifts favours none of them
    and each cycle gives a paired ratio."""
    started: list[tuple[ServerSpec, RunningServer]] = []
    with ExitStack() as stack:
        for spec in servers:
            try:
                started.append((spec, stack.enter_context(serve(spec))))
            except ServerError as exc:
                print(f"round {index + 1}: {spec.name} failed: {exc}", file=sys.stderr)
                runs.append({"round": index + 1, "server": spec.name, "failed": str(exc)})
        for spec, server in started:
            transfer(server.address, payload, args.timeout)  # warm-up, not measured
            _wait_reaped(server, _spares(spec, args))
        for cycle in range(args.repeat):
            order = started if (index * args.repeat + cycle) % 2 == 0 else started[::-1]
            for spec, server in order:
                try:
                    row = measure(server, _spares(spec, args), payload, args.timeout)
                except OSError as exc:
                    row = {"verified": False, "errors": [f"connect: {exc}"]}
                runs.append({"round": index + 1, "cycle": cycle + 1, "server": spec.name, **row})
                print(
                    f"round {index + 1}.{cycle + 1}: {spec.name:<16} "
                    f"{row.get('mib_per_s') or 0:>8,.0f} MiB/s"
                    + (f"  {'; '.join(row['errors'])}" if row["errors"] else ""),
                    file=sys.stderr,
                    flush=True,
                )


def _spares(spec: ServerSpec, args: argparse.Namespace) -> int:
    return int(args.spares) if spec.name == "forkserver-pool" else 0


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per server: medians over its verified transfers; ratios to the bare loop.

    ``x_bare``: the median over cycles of (this server's MiB/s / the bare
    loop's in the same cycle), robust to drift; ``x_bare_of_medians``: the
    ratio of the two medians."""
    summary: dict[str, Any] = {}
    for name in names:
        rows = [r for r in runs if r["server"] == name and r.get("verified")]
        if not rows:
            summary[name] = {"transfers": 0}
            continue
        rates = [r["mib_per_s"] for r in rows]
        summary[name] = {
            "transfers": len(rows),
            "mib_per_s": statistics.median(rates),
            "mib_per_s_min": min(rates),
            "mib_per_s_max": max(rates),
            "connect_ms": median([r["connect_ms"] for r in rows]),
            "client_cores": median([r["client_cores"] for r in rows]),
            "server_cores": median([r["server_cores"] for r in rows]),
        }
    base = summary.get(BASELINE, {}).get("mib_per_s")
    bare = {
        (r["round"], r["cycle"]): r["mib_per_s"]
        for r in runs
        if r["server"] == BASELINE and r.get("verified")
    }
    for name, row in summary.items():
        if row.get("mib_per_s") is None:
            continue
        row["x_bare_of_medians"] = row["mib_per_s"] / base if base else None
        paired = [
            r["mib_per_s"] / bare[key]
            for r in runs
            if r["server"] == name
            and r.get("verified")
            and (key := (r["round"], r["cycle"])) in bare
        ]
        row["x_bare"] = statistics.median(paired) if paired else None
    return summary


def table(result: dict[str, Any]) -> str:
    """The summary as a plain-text table."""
    s = result["settings"]
    lines = [
        f"{s['mib']} MiB echoed per connection; medians of {s['rounds']} rounds x "
        f"{s['repeat']} cycles; x bare: median of the ratios in each cycle",
        f"{'server':<16} {'MiB/s':>8} {'x bare':>7} {'min':>8} {'max':>8} {'connect ms':>10} "
        f"{'client cores':>12} {'server cores':>12} {'failed':>6}",
    ]
    for name, row in result["summary"].items():
        bad = sum(1 for r in result["runs"] if r["server"] == name and not r.get("verified"))
        if not row["transfers"]:
            lines.append(f"{name:<16} no verified transfer; failed {bad}")
            continue
        x = row.get("x_bare")
        lines.append(
            f"{name:<16} {row['mib_per_s']:>8,.0f} {'-' if x is None else f'{x:.2f}':>7} "
            f"{row['mib_per_s_min']:>8,.0f} {row['mib_per_s_max']:>8,.0f} "
            f"{row['connect_ms']:>10.2f} {row['client_cores']:>12.2f} "
            f"{row['server_cores']:>12.2f} {bad:>6}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.bulk", description=__doc__.split("\n", 1)[0])
    p.add_argument("--mib", type=int, default=64, help="MiB echoed per connection (64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, server order alternating (3)")
    p.add_argument("--repeat", type=int, default=5, help="cycles per round (5)")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated (all three)")
    p.add_argument("--spares", type=int, default=8, help="spare_children of forkserver-pool (8)")
    p.add_argument("--backlog", type=int, default=16, help="listen backlog (16)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per transfer (60)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Every round, then the summary; the result as written to JSON."""
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    servers = specs(names, args.spares, args.backlog)
    result = metadata("bench.bulk", argv)
    result["settings"] = {
        "mib": args.mib,
        "rounds": args.rounds,
        "repeat": args.repeat,
        "servers": [s.name for s in servers],
        "spares": args.spares,
        "backlog": args.backlog,
    }
    payload = Payload(args.mib * MIB)
    runs: list[dict[str, Any]] = []
    for index in range(args.rounds):
        _round(index, servers, payload, args, runs)
    result["summary"] = summarize(runs, [s.name for s in servers])
    result["runs"] = runs
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.mib < 1 or args.rounds < 1 or args.repeat < 1 or args.timeout <= 0:
        print("bench.bulk: need --mib, --rounds, --repeat >= 1 and --timeout > 0", file=sys.stderr)
        return 2
    if args.spares < 1 or args.backlog < 1:
        print("bench.bulk: --spares and --backlog must be >= 1", file=sys.stderr)
        return 2
    try:
        result = run(args, argv)
    except ValueError as exc:
        print(f"bench.bulk: {exc}", file=sys.stderr)
        return 2
    path = write_results("bulk", result, args.out)
    if args.json:
        print(json.dumps(result))
        print(f"results: {path}", file=sys.stderr)
    else:
        print(table(result))
        print(f"results: {path}")
    bad = [r for r in result["runs"] if not r.get("verified")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
