"""Memory per connection: an idle child's USS, and the parent's RSS over many connections.

    python -m bench.memory                              # 100,000 connections: ~2 min
    python -m bench.memory --connections 2000 --idle 3

Idle child: for each server (forkserver, and for reference socketserver and
tcpserver's ``cat`` when installed), ``--idle`` clients connect, do one 64-byte
echo round and stay open; then each child's USS (memory no other process
shares: what the child really costs), PSS and RSS are read with psutil's
``memory_full_info()``.

Parent growth (forkserver): after ``--warmup`` connections, the parent's RSS,
USS and open descriptors are read; then ``--connections`` churn connections run
in ``--chunks`` batches, and the same figures are read after each batch, once
every child has been reaped.  A leak shows as steady growth from batch to batch.
Results: ``bench/results/memory-<time>.json`` and ``memory-latest.json``.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psutil

from .common import RESULTS_DIR, LoadError, mb, metadata, run_load, write_results
from .servers import RunningServer, ServerError, forkserver_spec, peer_specs, serve

KIB = 1024


def _open_idle(address: tuple[str, int], stack: ExitStack) -> None:
    sock = stack.enter_context(socket.create_connection(address, timeout=10))
    sock.sendall(b"x" * 64)
    got = b""
    while len(got) < 64:
        chunk = sock.recv(64 - len(got))
        if not chunk:
            raise ConnectionError("server closed an idle connection")
        got += chunk


def idle_children(server: RunningServer, count: int) -> dict[str, Any]:
    """USS/PSS/RSS of *count* children each holding one open, idle connection."""
    with ExitStack() as stack:
        for _ in range(count):
            _open_idle(server.address, stack)
        deadline = time.monotonic() + 10
        children = server.children()
        while len(children) < count and time.monotonic() < deadline:
            time.sleep(0.02)  # the connections are open: their children exist or are forking
            children = server.children()
        infos = []
        for child in children:
            try:
                infos.append(child.memory_full_info())
            except psutil.NoSuchProcess:
                continue
    if not infos:
        raise ServerError(f"{server.spec.name}: no child found for {count} idle connections")
    uss = [i.uss for i in infos]
    return {
        "children": len(infos),
        "uss_kib_median": statistics.median(uss) / KIB,
        "uss_kib_max": max(uss) / KIB,
        "pss_kib_median": statistics.median(i.pss for i in infos) / KIB,
        "rss_kib_median": statistics.median(i.rss for i in infos) / KIB,
        "parent_rss_mb": mb(server.rss()),
    }


def _parent_state(server: RunningServer) -> dict[str, Any]:
    proc = psutil.Process(server.pid)
    info = proc.memory_full_info()
    return {"rss_kib": info.rss / KIB, "uss_kib": info.uss / KIB, "fds": proc.num_fds()}


def parent_growth(args: argparse.Namespace) -> dict[str, Any]:
    """The forkserver parent's RSS, USS and fds after warm-up and after each batch."""
    batch = max(args.connections // args.chunks, 1)
    spec = forkserver_spec(args.max_children, args.backlog)
    with serve(spec) as server:
        if args.warmup:
            _churn(server, args.warmup, args.concurrency)
        server.settle()
        start = _parent_state(server)
        batches = []
        done = 0
        t0 = time.monotonic()
        while done < args.connections:
            n = min(batch, args.connections - done)
            report = _churn(server, n, args.concurrency)
            done += n
            settled = server.settle(5.0)
            state = _parent_state(server)
            state.update(
                connections=done,
                errors_total=report["errors_total"],
                conn_per_s=report["conn_per_s"],
                settled=settled,
            )
            batches.append(state)
            print(
                f"  {done:>8,} connections: parent RSS {state['rss_kib']:,.0f} KiB, "
                f"fds {state['fds']}",
                file=sys.stderr,
                flush=True,
            )
    end = batches[-1] if batches else start
    return {
        "warmup_connections": args.warmup,
        "connections": done,
        "seconds": time.monotonic() - t0,
        "after_warmup": start,
        "batches": batches,
        "rss_growth_kib": end["rss_kib"] - start["rss_kib"],
        "uss_growth_kib": end["uss_kib"] - start["uss_kib"],
        "fds_growth": end["fds"] - start["fds"],
        "errors_total": sum(b["errors_total"] for b in batches),
    }


def _churn(server: RunningServer, connections: int, concurrency: int) -> dict[str, Any]:
    return run_load(
        server.address,
        "--connections",
        str(connections),
        "--concurrency",
        str(concurrency),
        time_limit=600,
    )


def table(result: dict[str, Any]) -> str:
    lines = [f"{'server':<13} {'idle child USS KiB':>18} {'max':>7} {'PSS':>7} {'RSS':>7}"]
    for name, row in result["idle_child"].items():
        if "failed" in row:
            lines.append(f"{name:<13} failed: {row['failed']}")
            continue
        lines.append(
            f"{name:<13} {row['uss_kib_median']:>18,.0f} {row['uss_kib_max']:>7,.0f} "
            f"{row['pss_kib_median']:>7,.0f} {row['rss_kib_median']:>7,.0f}"
        )
    g = result.get("parent_growth")
    if g and "failed" in g:
        lines.append(f"parent growth failed: {g['failed']}")
    elif g:
        a = g["after_warmup"]
        lines.append(
            f"forkserver parent over {g['connections']:,} connections (after "
            f"{g['warmup_connections']:,} warm-up): RSS {a['rss_kib']:,.0f} KiB "
            f"{g['rss_growth_kib']:+,.0f} KiB, USS {g['uss_growth_kib']:+,.0f} KiB, "
            f"fds {a['fds']} {g['fds_growth']:+d}, errors {g['errors_total']}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.memory", description=__doc__.split("\n", 1)[0])
    p.add_argument("--servers", default="forkserver,socketserver,tcpserver", help="idle-child run")
    p.add_argument("--idle", type=int, default=5, help="idle connections per server (5)")
    p.add_argument("--connections", type=int, default=100_000, help="for parent growth (100000)")
    p.add_argument("--chunks", type=int, default=4, help="batches, RSS read after each (4)")
    p.add_argument("--warmup", type=int, default=1000, help="connections before the baseline")
    p.add_argument("--concurrency", type=int, default=8, help="clients during growth (8)")
    p.add_argument("--max-children", type=int, default=256)
    p.add_argument("--backlog", type=int, default=128)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    result = metadata("bench.memory", argv)
    result["settings"] = {
        k: getattr(args, k)
        for k in ("servers", "idle", "connections", "chunks", "warmup", "concurrency")
    } | {"max_children": args.max_children, "backlog": args.backlog}
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    result["idle_child"] = {}
    for spec in peer_specs(names, args.max_children, args.backlog):
        print(f"idle children: {spec.name}", file=sys.stderr, flush=True)
        try:
            with serve(spec) as server:
                result["idle_child"][spec.name] = idle_children(server, args.idle)
        except (ServerError, OSError) as exc:
            result["idle_child"][spec.name] = {"failed": str(exc)}
    if args.connections > 0:
        print(f"parent growth over {args.connections:,} connections", file=sys.stderr, flush=True)
        try:
            result["parent_growth"] = parent_growth(args)
        except (ServerError, LoadError) as exc:
            result["parent_growth"] = {"failed": str(exc)}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.idle < 1 or args.chunks < 1 or args.connections < 0 or args.warmup < 0:
        print("bench.memory: --idle and --chunks >= 1, counts >= 0", file=sys.stderr)
        return 2
    try:
        result = run(args, argv)
    except ValueError as exc:
        print(f"bench.memory: {exc}", file=sys.stderr)
        return 2
    path = write_results("memory", result, args.out)
    print(table(result))
    print(f"results: {path}")
    failed = "failed" in result.get("parent_growth", {}) or any(
        "failed" in r for r in result["idle_child"].values()
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
