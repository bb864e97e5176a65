"""forkserver's echo against socketserver and tcpserver: one run, same machine.

    python -m bench.compare                          # defaults: about 4.5 minutes
    python -m bench.compare --rounds 1 --concurrency 1,8 --duration 2

Servers: forkserver (``python -m forkserver``, ``forkserver.examples.echo``),
stdlib ``socketserver.ForkingTCPServer`` with the same echo loop
(``bench/peers/socketserver_echo.py``), ucspi-tcp ``tcpserver ... cat``
when installed, and the Python floor (``bench/peers/forkecho.py``: accept,
fork, echo, exit, nothing else; no ``max_children``), which shows how close
any Python fork-per-connection server could get; all with the same
``--max-children`` and ``--backlog``, on 127.0.0.1, under the interpreter
running this script.

Each round starts every server in turn (the order reverses every other round,
so warm caches or a drifting machine favour none), warms it up, then runs a
``--payload``-byte churn (``bench.load --mode churn``) at each concurrency.
Reported are medians over the rounds: connections/s, p50 and p99 latency per
connection, ratios against socketserver, and, per connection, the CPU time of
the server's parent and of its children (the parent's own CPU times and those
of the children it reaped).  Results go to ``bench/results/compare-<time>.json``
and ``compare-latest.json``; with matplotlib, also ``compare-conn_per_s.png``
(conn/s against concurrency) and ``compare-latency_cdf.png``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, LoadError, int_list, median, metadata, run_load, write_results
from .servers import RunningServer, ServerError, ServerSpec, peer_specs, serve

BASELINE = "socketserver"
SERVERS = ("forkserver", "forkserver-pool", "socketserver", "tcpserver", "python-floor")


def measure(
    server: RunningServer, concurrency: int, duration: float, payload: int
) -> dict[str, Any]:
    """One churn run against a running server, with the server's CPU per connection."""
    parent0, children0 = server.cpu_seconds()
    report = run_load(
        server.address,
        "--mode",
        "churn",
        "--payload",
        str(payload),
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
        time_limit=duration + 60,
    )
    server.settle()  # so the children's CPU is counted
    parent1, children1 = server.cpu_seconds()
    n = max(report["connections"], 1)
    lat = report["latency_ms"]
    # What ran besides the server and the generator: CPU the machine spent that
    # neither accounts for (the load process's start-up is a few ms of it).
    machine = report["machine"]
    ours = (parent1 - parent0) + (children1 - children0) + report["generator_cpu"]["total_s"]
    other = max(machine["busy_cpu_s"] - ours, 0.0) / machine["wall_s"]
    return {
        "conn_per_s": report["conn_per_s"],
        "connections": report["connections"],
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "max_ms": lat["max"],
        "errors": report["errors"],
        "errors_total": report["errors_total"],
        "parent_us_per_conn": (parent1 - parent0) / n * 1e6,
        "children_us_per_conn": (children1 - children0) / n * 1e6,
        "generator_cores": report["generator_cpu"]["cores_used"],
        "machine_busy": machine["busy_fraction"],
        "other_cores": other,
        "cdf_ms": report["cdf_ms"],
    }


def _round(
    specs: list[ServerSpec], index: int, args: argparse.Namespace, runs: list[dict[str, Any]]
) -> None:
    order = specs if index % 2 == 0 else specs[::-1]
    for spec in order:
        print(f"round {index + 1}: {spec.name}", file=sys.stderr, flush=True)
        try:
            with serve(spec) as server:
                if args.warmup > 0:
                    run_load(
                        server.address,
                        "--concurrency",
                        "8",
                        "--duration",
                        str(args.warmup),
                        time_limit=args.warmup + 60,
                    )
                for c in args.concurrency:
                    row = measure(server, c, args.duration, args.payload)
                    runs.append({"round": index + 1, "server": spec.name, "concurrency": c, **row})
                    print(
                        f"  c={c:<4} {row['conn_per_s']:>9,.0f} conn/s  "
                        f"p50 {row['p50_ms'] or 0:.3f} ms  errors {row['errors_total']}",
                        file=sys.stderr,
                        flush=True,
                    )
        except (ServerError, LoadError) as exc:
            print(f"  {spec.name} failed: {exc}", file=sys.stderr)
            runs.append({"round": index + 1, "server": spec.name, "failed": str(exc)})


def summarize(runs: list[dict[str, Any]], names: list[str], levels: list[int]) -> dict[str, Any]:
    """Medians over rounds per server and concurrency, plus the median run's CDF."""
    summary: dict[str, Any] = {}
    for name in names:
        per_level: dict[str, Any] = {}
        for c in levels:
            rows = [
                r
                for r in runs
                if r["server"] == name and r.get("concurrency") == c and "failed" not in r
            ]
            if not rows:
                continue
            by_rate = sorted(rows, key=lambda r: r["conn_per_s"])
            per_level[str(c)] = {
                "rounds": len(rows),
                "conn_per_s": median([r["conn_per_s"] for r in rows]),
                "p50_ms": median([r["p50_ms"] for r in rows]),
                "p99_ms": median([r["p99_ms"] for r in rows]),
                "parent_us_per_conn": median([r["parent_us_per_conn"] for r in rows]),
                "children_us_per_conn": median([r["children_us_per_conn"] for r in rows]),
                "generator_cores": median([r["generator_cores"] for r in rows]),
                "machine_busy": median([r["machine_busy"] for r in rows]),
                "other_cores": median([r["other_cores"] for r in rows]),
                "other_cores_max": max(r["other_cores"] for r in rows),
                "errors_total": sum(r["errors_total"] for r in rows),
                "cdf_ms": by_rate[len(by_rate) // 2]["cdf_ms"],
            }
        summary[name] = per_level
    return summary


def ratios(summary: dict[str, Any], baseline: str = BASELINE) -> dict[str, Any]:
    """conn/s and latency of each server divided by the baseline's, per concurrency."""
    base = summary.get(baseline, {})
    out: dict[str, Any] = {}
    for name, levels in summary.items():
        out[name] = {}
        for c, row in levels.items():
            ref = base.get(c)
            if not ref:
                continue
            out[name][c] = {
                key: (row[key] / ref[key] if row[key] and ref[key] else None)
                for key in ("conn_per_s", "p50_ms", "p99_ms")
            }
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    """The summary as a plain-text table."""
    summary, rel = result["summary"], result["ratios"]
    s = result["settings"]
    lines = [
        f"{s['payload']}-byte churn, medians of {s['rounds']} rounds x {s['duration']:g} s; "
        f"max_children {s['max_children']}, backlog {s['backlog']}",
        f"{'conc':>5} {'server':<13} {'conn/s':>9} {'x ss':>6} {'p50 ms':>8} {'x ss':>6} "
        f"{'p99 ms':>8} {'parent us':>10} {'child us':>9} {'load cpu':>8} {'other':>5} {'err':>4}",
    ]
    for c in map(str, s["concurrency"]):
        for name, levels in summary.items():
            row = levels.get(c)
            if row is None:
                continue
            r = rel.get(name, {}).get(c, {})
            lines.append(
                f"{c:>5} {name:<13} {row['conn_per_s']:>9,.0f} "
                f"{_fmt(r.get('conn_per_s'), '.2f'):>6} {_fmt(row['p50_ms'], '.3f'):>8} "
                f"{_fmt(r.get('p50_ms'), '.2f'):>6} {_fmt(row['p99_ms'], '.3f'):>8} "
                f"{_fmt(row['parent_us_per_conn'], '.0f'):>10} "
                f"{_fmt(row['children_us_per_conn'], '.0f'):>9} "
                f"{_fmt(row['generator_cores'], '.2f'):>8} {_fmt(row['other_cores'], '.2f'):>5} "
                f"{row['errors_total']:>4}"
            )
    lines.append(
        "x ss: ratio to socketserver; parent/child us: server CPU per connection; "
        "load cpu: generator cores used; other: cores used by everything else"
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """PNG charts when matplotlib is importable; [] otherwise."""
    try:
        # An optional extra (pip install '.[bench]'), so imported only here.
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
        ticker = importlib.import_module("matplotlib.ticker")
    except ImportError:
        return []
    summary = result["summary"]
    levels = [str(c) for c in result["settings"]["concurrency"]]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in summary.items():
        xs = [int(c) for c in levels if c in rows]
        ax.plot(xs, [rows[str(c)]["conn_per_s"] for c in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(c) for c in levels], labels=levels)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("connections/s (median)")
    ax.set_title(f"{result['settings']['payload']}-byte echo churn")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = out_dir / "compare-conn_per_s.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)

    shown = [levels[0], levels[-1]] if len(levels) > 1 else levels
    fig, axes = plt.subplots(1, len(shown), figsize=(6 * len(shown), 4.5), squeeze=False)
    for ax, c in zip(axes[0], shown, strict=True):
        for name, rows in summary.items():
            if c in rows and rows[c]["cdf_ms"]:
                cdf = rows[c]["cdf_ms"]
                ax.plot([v for _, v in cdf], [q / 100 for q, _ in cdf], label=name)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("latency per connection, ms")
        ax.set_ylabel("fraction of connections")
        ax.set_title(f"latency CDF, {c} concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.legend()
    path = out_dir / "compare-latency_cdf.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    paths.append(path)
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.compare", description=__doc__.split("\n", 1)[0])
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated (all five)")
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 32, 128], help="1,8,32,128")
    p.add_argument("--rounds", type=int, default=3, help="rounds, medians reported (3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (5)")
    p.add_argument("--payload", type=int, default=64, help="bytes per connection (64)")
    p.add_argument("--max-children", type=int, default=256, help="for every server (256)")
    p.add_argument("--backlog", type=int, default=128, help="listen backlog, every server (128)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load after start (1)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG charts")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Every round, then the summary; the result as written to JSON."""
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    specs = peer_specs(names, args.max_children, args.backlog)
    result = metadata("bench.compare", argv)
    result["settings"] = {
        "servers": [s.name for s in specs],
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "duration": args.duration,
        "payload": args.payload,
        "max_children": args.max_children,
        "backlog": args.backlog,
        "warmup": args.warmup,
        "tcpserver_argv": next((s.argv for s in specs if s.name == "tcpserver"), None),
    }
    runs: list[dict[str, Any]] = []
    for index in range(args.rounds):
        _round(specs, index, args, runs)
    result["summary"] = summarize(runs, [s.name for s in specs], args.concurrency)
    result["ratios"] = ratios(result["summary"])
    result["runs"] = runs
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rounds < 1 or not args.concurrency or args.duration <= 0:
        print(
            "bench.compare: need --rounds >= 1, a concurrency and --duration > 0", file=sys.stderr
        )
        return 2
    try:
        result = run(args, argv)
    except ValueError as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 2
    path = write_results("compare", result, args.out)
    print(table(result))
    print(f"results: {path}")
    if not args.no_plot:
        for png in plot(result, args.out):
            print(f"chart: {png}")
    failed = [r for r in result["runs"] if "failed" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
