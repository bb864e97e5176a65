"""forkserver's echo against socketserver, tcpserver and the floors: one run, same machine.

    python -m bench.compare                          # defaults: about 9 minutes
    python -m bench.compare --rounds 1 --concurrency 1,8 --duration 2
    python -m bench.compare --out bench/results      # replace the tracked results
    python -m bench.compare --servers forkserver --baseline ../old   # before and after

Servers (``--servers``, all by default): ``forkserver`` (``python -m
forkserver``, ``forkserver.examples.echo``, forking on accept),
``forkserver-pool`` (the same with spare_children), stdlib ``socketserver``
(``ForkingTCPServer``, ``bench/peers/socketserver_echo.py``), ucspi-tcp
``tcpserver ... cat`` when installed, and five floors, which nobody would
run but which show how far a design could go here: ``python-floor``
(``bench/peers/leanfloor.py`` under ``python -S -I``: raw-fd accept, fork,
``os.read``/``os.write`` echo, exit, reaping in its loop), ``python-needs``
(``bench/peers/needsfloor.py``: the same plus what forkserver promises, written
as cheaply as we know: an epoll loop, signals to a wakeup fd, a pidfd per
child, a socket object and a handler instance in the child), ``python-needs-pool``
(``bench/peers/needspool.py``: the same with 16 spares, each serving one
connection, as ``forkserver-pool``), ``python-sigchld``
(``bench/peers/forkecho.py``: the same with socket objects and a SIGCHLD
handler) and ``c-floor`` (``bench/peers/forkecho.c``, built at run time);
all with the same ``--max-children`` and ``--backlog``, on 127.0.0.1.
``--baseline CHECKOUT`` adds ``forkserver@base``, forkserver forking on accept
from another checkout (``git worktree add ../old v1``): a change's before and
after, measured in one run.

The load is a closed-loop ``--payload``-byte churn (connect, send, half-close,
read to EOF, close) from ``bench/peers/churn.c``, built at run time with the
machine's C compiler, so that the generator costs far less CPU per connection
than the servers; without a compiler, from ``bench.load`` (Python), said in
one line.  Each round starts every server in turn (the order reverses every
other round, so warm caches or a drifting machine favour none), warms it up,
then measures each concurrency.  Reported are medians over the rounds:
connections/s, p50 and p99 latency per connection, ratios against
socketserver; per connection, the CPU of the server's parent and of its
reaped children, the generator's CPU beside it, and the server's minor page
faults (parent + reaped children, /proc/PID/stat minflt + cminflt); and, at
the end, the team's targets as ratios of forkserver (and the pool) to the
Python floor and to tcpserver.  Results go to ``--out`` (default
``~/.cache/forkserver-bench/results``): ``compare-<time>.json`` and
``compare-latest.json``; with matplotlib, also ``compare-conn_per_s.png`` and
``compare-latency_cdf.png``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .build import PEERS, built, cache_dir
from .common import (
    LoadError,
    int_list,
    median,
    metadata,
    run_generator,
    run_load,
    write_results,
)
from .servers import (
    BASELINE_NAME,
    SERVER_NAMES,
    RunningServer,
    ServerError,
    ServerSpec,
    baseline_spec,
    peer_specs,
    serve,
)

BASELINE = "socketserver"
SERVERS = SERVER_NAMES
# The targets: each server's ratio to each reference, in one run.
TARGET_SERVERS = ("forkserver", "forkserver-pool")
TARGET_REFERENCES = ("python-floor", "tcpserver")
# Not targets, the context for them: what the product's contract costs
# (python-needs over the lean floor), and forkserver over that contract.
NEEDS_FLOOR = "python-needs"
NEEDS_POOL = "python-needs-pool"  # the same, with spares
NO_COMPILER = (
    "no C compiler (cc, gcc or clang): load from bench.load (Python), whose CPU per "
    "connection is close to the servers'; compare the load us column with theirs"
)


class Generator:
    """The churn client: bench/peers/churn.c when it can be built here, else bench.load."""

    def __init__(self, prefer_c: bool = True) -> None:
        self.binary = built(PEERS / "churn.c") if prefer_c else None
        self.name = "churn.c" if self.binary else "bench.load"

    def churn(
        self, address: tuple[str, int], concurrency: int, duration: float, payload: int
    ) -> dict[str, Any]:
        """One closed-loop churn run; the report in bench.load's --json shape."""
        limit = duration + 60
        if self.binary is None:
            return run_load(
                address,
                *("--mode", "churn", "--payload", str(payload)),
                *("--concurrency", str(concurrency), "--duration", str(duration)),
                time_limit=limit,
            )
        argv = [str(self.binary), "-c", str(concurrency), "-d", str(duration)]
        argv += ["-p", str(payload), address[0], str(address[1])]
        return run_generator(argv, time_limit=limit)


def measure(
    server: RunningServer, load: Generator, concurrency: int, duration: float, payload: int
) -> dict[str, Any]:
    """One churn run against a running server, with the server's and the load's costs."""
    parent0, children0 = server.cpu_seconds()
    faults0 = server.faults()
    report = load.churn(server.address, concurrency, duration, payload)
    server.settle()  # so the children's CPU and faults are counted
    parent1, children1 = server.cpu_seconds()
    faults1 = server.faults()
    n = max(report["connections"], 1)
    lat = report["latency_ms"]
    generator = report["generator_cpu"]["total_s"]
    # What ran besides the server and the generator: CPU the machine spent that
    # neither accounts for (the load process's start-up is a few ms of it).
    machine = report["machine"]
    ours = (parent1 - parent0) + (children1 - children0) + generator
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
        "load_us_per_conn": generator / n * 1e6,
        "faults_per_conn": (faults1 - faults0) / n,
        "generator_cores": report["generator_cpu"]["cores_used"],
        "machine_busy": machine["busy_fraction"],
        "other_cores": other,
        "cdf_ms": report["cdf_ms"],
    }


def _round(
    specs: list[ServerSpec],
    index: int,
    args: argparse.Namespace,
    load: Generator,
    runs: list[dict[str, Any]],
) -> None:
    order = specs if index % 2 == 0 else specs[::-1]
    for spec in order:
        print(f"round {index + 1}: {spec.name}", file=sys.stderr, flush=True)
        try:
            with serve(spec) as server:
                if args.warmup > 0:
                    load.churn(server.address, 8, args.warmup, args.payload)
                for c in args.concurrency:
                    row = measure(server, load, c, args.duration, args.payload)
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
                "load_us_per_conn": median([r["load_us_per_conn"] for r in rows]),
                "faults_per_conn": median([r["faults_per_conn"] for r in rows]),
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


def targets(summary: dict[str, Any], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The team's targets: forkserver (and the pool) over the floor and tcpserver;
    and their context: the needs floor over the lean one, forkserver over the needs floor.

    conn/s at 8 and 32 clients and p50 at 1 client are ratios of the medians
    in the summary; faults per connection, of the medians over every
    measurement of each server (they hardly depend on concurrency).
    """

    def faults(name: str) -> float | None:
        return median(
            [r["faults_per_conn"] for r in runs if r["server"] == name and "failed" not in r]
        )

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def at(name: str, c: str, key: str) -> float | None:
        row = summary.get(name, {}).get(c)
        return None if row is None else row[key]

    pairs = [(name, ref) for name in TARGET_SERVERS for ref in TARGET_REFERENCES]
    pairs += [(NEEDS_FLOOR, "python-floor"), ("forkserver", NEEDS_FLOOR)]
    pairs += [(NEEDS_POOL, "python-floor"), ("forkserver-pool", NEEDS_POOL)]
    pairs += [("forkserver", BASELINE_NAME)]  # with --baseline: after over before
    out = []
    for name, ref in pairs:
        if not summary.get(name) or not summary.get(ref):
            continue
        out.append(
            {
                "server": name,
                "reference": ref,
                "conn_per_s_8": ratio(at(name, "8", "conn_per_s"), at(ref, "8", "conn_per_s")),
                "conn_per_s_32": ratio(at(name, "32", "conn_per_s"), at(ref, "32", "conn_per_s")),
                "p50_ms_1": ratio(at(name, "1", "p50_ms"), at(ref, "1", "p50_ms")),
                "faults_per_conn": ratio(faults(name), faults(ref)),
            }
        )
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def columns(head: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int = 1) -> list[str]:
    """Plain-text table: the first *text_columns* left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    return [
        " ".join(
            cell.ljust(w) if i < text_columns else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [head, *rows]
    ]


def table(result: dict[str, Any]) -> str:
    """The summary, then the targets, as plain-text tables."""
    summary, rel = result["summary"], result["ratios"]
    s = result["settings"]
    head = ["conc", "server", "conn/s", "x ss", "p50 ms", "x ss", "p99 ms", "parent us"]
    head += ["child us", "load us", "faults", "load cpu", "other", "err"]
    rows = []
    for c in map(str, s["concurrency"]):
        for name, levels in summary.items():
            row = levels.get(c)
            if row is None:
                continue
            r = rel.get(name, {}).get(c, {})
            rows.append(
                [
                    c,
                    name,
                    f"{row['conn_per_s']:,.0f}",
                    _fmt(r.get("conn_per_s"), ".2f"),
                    _fmt(row["p50_ms"], ".3f"),
                    _fmt(r.get("p50_ms"), ".2f"),
                    _fmt(row["p99_ms"], ".3f"),
                    _fmt(row["parent_us_per_conn"], ".0f"),
                    _fmt(row["children_us_per_conn"], ".0f"),
                    _fmt(row["load_us_per_conn"], ".0f"),
                    _fmt(row["faults_per_conn"], ".0f"),
                    _fmt(row["generator_cores"], ".2f"),
                    _fmt(row["other_cores"], ".2f"),
                    str(row["errors_total"]),
                ]
            )
    lines = [
        f"{s['payload']}-byte churn from {s['generator']}, medians of {s['rounds']} rounds x "
        f"{s['duration']:g} s; max_children {s['max_children']}, backlog {s['backlog']}",
        *columns(head, rows, text_columns=2),
        "x ss: ratio to socketserver; parent/child us: server CPU per connection; "
        "load us: the generator's CPU per connection; faults: the server's minor page "
        "faults per connection (parent + children); load cpu: generator cores used; "
        "other: cores used by everything else",
    ]
    if result["targets"]:
        head = ["targets (ratios in this run)", "conn/s 8", "conn/s 32", "p50 1", "faults/conn"]
        rows = [
            [
                f"{t['server']} / {t['reference']}",
                *(
                    _fmt(t[k], ".2f")
                    for k in ("conn_per_s_8", "conn_per_s_32", "p50_ms_1", "faults_per_conn")
                ),
            ]
            for t in result["targets"]
        ]
        lines += [
            "",
            *columns(head, rows),
            "conn/s at 8 and 32 clients: higher is better; p50 at 1 client and page faults "
            "per connection: lower is better",
        ]
    return "\n".join(lines)


def plot(result: dict[str, Any], out_dir: Path) -> list[Path] | None:
    """PNG charts; None when matplotlib is not installed."""
    try:
        # An optional extra (pip install '.[bench]'), so imported only here.
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
        ticker = importlib.import_module("matplotlib.ticker")
    except ImportError:
        return None
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
    p = argparse.ArgumentParser(
        prog="bench.compare",
        description=__doc__.split("\n", 1)[0],
        epilog="servers: " + ", ".join(SERVERS),
    )
    p.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated, from: {', '.join(SERVERS)} (default: all)",
    )
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 32, 128], help="1,8,32,128")
    p.add_argument("--rounds", type=int, default=3, help="rounds, medians reported (3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (5)")
    p.add_argument("--payload", type=int, default=64, help="bytes per connection (64)")
    p.add_argument("--max-children", type=int, default=256, help="for every server (256)")
    p.add_argument("--backlog", type=int, default=128, help="listen backlog, every server (128)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load after start (1)")
    p.add_argument(
        "--generator",
        choices=("c", "python"),
        default="c",
        help="c: bench/peers/churn.c, built now (bench.load without a compiler); "
        "python: bench.load (default c)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=cache_dir() / "results",
        help="results directory (default %(default)s; bench/results replaces the tracked "
        "compare-latest.json)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="CHECKOUT",
        help=f"also run {BASELINE_NAME}: forkserver from another checkout (a git worktree of "
        "an earlier commit), to compare before and after in the same run",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG charts")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Every round, then the summary; the result as written to JSON."""
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    specs = peer_specs(names, args.max_children, args.backlog)
    if args.baseline is not None:
        if not (args.baseline / "forkserver" / "__init__.py").is_file():
            raise SystemExit(f"bench.compare: --baseline {args.baseline}: no forkserver/ there")
        specs.append(baseline_spec(args.baseline.resolve(), args.max_children, args.backlog))
    load = Generator(prefer_c=args.generator == "c")
    if args.generator == "c" and load.binary is None:
        print(NO_COMPILER, file=sys.stderr)
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
        "generator": load.name,
        "tcpserver_argv": next((s.argv for s in specs if s.name == "tcpserver"), None),
    }
    runs: list[dict[str, Any]] = []
    for index in range(args.rounds):
        _round(specs, index, args, load, runs)
    result["summary"] = summarize(runs, [s.name for s in specs], args.concurrency)
    result["ratios"] = ratios(result["summary"])
    result["targets"] = targets(result["summary"], runs)
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
        charts = plot(result, args.out)
        if charts is None:
            print("no charts: matplotlib is not installed (pip install -e '.[bench]')")
        for png in charts or []:
            print(f"chart: {png}")
    failed = [r for r in result["runs"] if "failed" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
