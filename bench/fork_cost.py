"""What a bigger parent costs: conn/s and latency as preloaded memory grows.

    python -m bench.fork_cost                         # sizes 0,100,300,1000 MB: ~1 min
    python -m bench.fork_cost --sizes 0,10 --duration 1 --paced-duration 2

For each size, forkserver serves ``bench.ballast:EchoHandler`` with
``FORKSERVER_BALLAST_MB`` set, so the handler module builds that much data in
the parent at import, before the first fork.  Linux copies the page tables at
fork, so a bigger parent forks slower.  Measured per size: the parent's RSS;
closed-loop 64-byte churn conn/s at each ``--concurrency`` (with the parent's
and children's CPU per connection); and latency, connect to EOF, of
connections arriving at a fixed ``--rate`` (default 10/s, one client at a
time), where nothing queues and each connection sees the fork cost alone.
The slope of that p50 against parent RSS is reported in microseconds per MB.
Results: ``bench/results/fork_cost-<time>.json`` and ``fork_cost-latest.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .ballast import ENV
from .common import RESULTS_DIR, LoadError, int_list, mb, metadata, run_load, write_results
from .compare import Generator, measure
from .servers import ServerError, forkserver_spec, serve

HANDLER = "bench.ballast:EchoHandler"


def paced(address: tuple[str, int], rate: float, duration: float, payload: int) -> dict[str, Any]:
    """Latency of connections opened at a fixed *rate* (open loop, one worker)."""
    report = run_load(
        address,
        "--mode",
        "churn",
        "--payload",
        str(payload),
        "--rate",
        str(rate),
        "--concurrency",
        "4",
        "--procs",
        "1",
        "--duration",
        str(duration),
        time_limit=duration + 60,
    )
    lat = report["latency_ms"]
    return {
        "rate": rate,
        "connections": report["connections"],
        "p50_ms": lat["p50"],
        "p90_ms": lat["p90"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "errors_total": report["errors_total"],
        "start_lag_ms_max": report.get("start_lag_ms_max"),
    }


def measure_size(size: float, args: argparse.Namespace) -> dict[str, Any]:
    spec = forkserver_spec(args.max_children, args.backlog, HANDLER, {ENV: str(size)})
    with serve(spec, ready_timeout=300) as server:
        row: dict[str, Any] = {"ballast_mb": size, "parent_rss_mb": mb(server.rss())}
        if args.warmup > 0:
            run_load(server.address, "--duration", str(args.warmup), time_limit=args.warmup + 60)
        row["closed_loop"] = {
            # bench.load, as this script has always measured (compare uses churn.c)
            str(c): measure(server, Generator(prefer_c=False), c, args.duration, args.payload)
            for c in args.concurrency
        }
        for result in row["closed_loop"].values():
            result.pop("cdf_ms")
        row["paced"] = paced(server.address, args.rate, args.paced_duration, args.payload)
        row["parent_rss_mb_after"] = mb(server.rss())
    if args.spare_children:
        # The same parent with spares forked ahead: fork leaves the path.
        spec = forkserver_spec(
            args.max_children, args.backlog, HANDLER, {ENV: str(size)}, args.spare_children
        )
        with serve(spec, ready_timeout=300) as server:
            if args.warmup > 0:
                run_load(server.address, "--duration", str(args.warmup), time_limit=60)
            row["paced_pool"] = paced(server.address, args.rate, args.paced_duration, args.payload)
    return row


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys against xs, or None with fewer than two distinct xs."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def table(result: dict[str, Any]) -> str:
    s = result["settings"]
    levels = [str(c) for c in s["concurrency"]]
    head = f"{'ballast MB':>10} {'RSS MB':>8} " + " ".join(f"{'conn/s c=' + c:>13}" for c in levels)
    head += f" {'parent us':>10} {'p50 c=' + levels[0]:>8} {'paced p50':>10}"
    head += f" {'p90':>7} {'max':>7} {'err':>4}"
    lines = [
        f"{s['payload']}-byte churn, {s['duration']:g} s per concurrency; paced: {s['rate']:g} "
        f"connections/s for {s['paced_duration']:g} s; latencies in ms",
        head,
    ]
    for row in result["sizes"]:
        if "failed" in row:
            lines.append(f"{row['ballast_mb']:>10g} failed: {row['failed']}")
            continue
        closed, pace = row["closed_loop"], row["paced"]
        first = closed[levels[0]]
        errors = pace["errors_total"] + sum(r["errors_total"] for r in closed.values())
        line = f"{row['ballast_mb']:>10g} {row['parent_rss_mb']:>8.1f} "
        line += " ".join(f"{closed[c]['conn_per_s']:>13,.0f}" for c in levels)
        line += f" {first['parent_us_per_conn']:>10.0f} {first['p50_ms']:>8.3f}"
        line += f" {pace['p50_ms'] or 0:>10.3f} {pace['p90_ms'] or 0:>7.3f}"
        line += f" {pace['max_ms'] or 0:>7.3f} {errors:>4}"
        lines.append(line)
    if result.get("paced_p50_us_per_mb") is not None:
        lines.append(
            f"paced p50 grows by {result['paced_p50_us_per_mb']:.1f} us per MB of parent RSS; "
            f"parent CPU per connection (c={levels[0]}) by "
            f"{result['parent_us_per_conn_per_mb']:.1f} us per MB"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.fork_cost", description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--sizes", type=int_list, default=[0, 100, 300, 1000], help="MB (0,100,300,1000)"
    )
    p.add_argument("--concurrency", type=int_list, default=[1, 8], help="closed-loop levels (1,8)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per level (3)")
    p.add_argument("--rate", type=float, default=10.0, help="paced connections per second (10)")
    p.add_argument("--paced-duration", type=float, default=6.0, help="seconds paced (6)")
    p.add_argument("--payload", type=int, default=64, help="bytes per connection (64)")
    p.add_argument("--max-children", type=int, default=256)
    p.add_argument("--backlog", type=int, default=128)
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of load after start (0.5)")
    p.add_argument(
        "--spare-children",
        type=int,
        default=4,
        help="also measure paced latency with this many spares (4; 0 skips)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    result = metadata("bench.fork_cost", argv)
    result["settings"] = {
        k: getattr(args, k)
        for k in (
            "sizes",
            "concurrency",
            "duration",
            "rate",
            "paced_duration",
            "payload",
            "spare_children",
        )
    } | {"max_children": args.max_children, "backlog": args.backlog, "handler": HANDLER}
    rows = []
    for size in args.sizes:
        print(f"ballast {size} MB", file=sys.stderr, flush=True)
        try:
            rows.append(measure_size(size, args))
        except (ServerError, LoadError) as exc:
            print(f"  failed: {exc}", file=sys.stderr)
            rows.append({"ballast_mb": size, "failed": str(exc)})
    result["sizes"] = rows
    ok = [r for r in rows if "failed" not in r and r["paced"]["p50_ms"] is not None]
    rss = [r["parent_rss_mb"] for r in ok]
    p50 = slope(rss, [r["paced"]["p50_ms"] * 1000 for r in ok])
    first = str(args.concurrency[0])
    cpu = slope(rss, [r["closed_loop"][first]["parent_us_per_conn"] for r in ok])
    result["paced_p50_us_per_mb"] = p50
    result["parent_us_per_conn_per_mb"] = cpu
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.sizes or not args.concurrency or min(args.sizes) < 0:
        print("bench.fork_cost: need --sizes >= 0 and a --concurrency", file=sys.stderr)
        return 2
    result = run(args, argv)
    path = write_results("fork_cost", result, args.out)
    print(table(result))
    print(f"results: {path}")
    return 1 if any("failed" in r for r in result["sizes"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
