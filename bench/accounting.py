"""What accounting costs the parent: CPU and page faults per connection, per setup.

    python -m bench.accounting                          # 3 rounds, ~1 min
    python -m bench.accounting --before /tmp/old-tree   # against another checkout

For each setup (the default; ``access_log = true``; a metrics listener), the
echo server takes 3 s of one-client 64-byte churn (``bench.load``), and the
parent's own CPU time and minor page faults are read from /proc/PID/stat
around the run: the parent's share of a connection, which the reap with
``wait4`` and the histograms add to.  With ``--before DIR`` each round also
runs the forkserver of DIR (a ``git archive`` of an older commit, say), so
the two are measured alternately under the same load.  Faults are the
steady figure on a busy machine; CPU per connection is noisy.
Results: ``bench/results/accounting-<time>.json`` and ``accounting-latest.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, median, metadata, run_load, write_results
from .servers import ROOT, ServerSpec, serve

SETUPS = {
    "default": "",
    "access_log": "access_log = true\n",
    "metrics": 'metrics = "127.0.0.1:0"\n',
}
CONFIG = """[server]
host = "127.0.0.1"
port = 0
handler = "forkserver.examples.echo:EchoHandler"
max_children = 64
"""


def parent_stat(pid: int) -> tuple[float, int]:
    """The parent's own (CPU seconds, minor faults), from /proc/PID/stat."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, int(fields[7])


def run_one(tree: Path, setup: str, duration: float, conf_dir: Path) -> dict[str, Any]:
    """One server from *tree* with *setup*, one churn run: per-connection figures."""
    conf = conf_dir / f"{setup}.toml"
    conf.write_text(CONFIG + SETUPS[setup])
    argv = [sys.executable, "-m", "forkserver", "--config", str(conf)]
    # This tree's forkserver, run from there (python -m puts the working
    # directory first on sys.path), not the repository's.
    spec = ServerSpec(
        setup, argv, r"listening on 127\.0\.0\.1:(\d+)", r"forkserver ready",
        env={"PYTHONPATH": str(tree)}, cwd=tree,
    )  # fmt: skip
    with serve(spec) as server:
        cpu0, faults0 = parent_stat(server.pid)
        report = run_load(
            server.address, "--concurrency", "1", "--duration", str(duration),
            "--payload", "64", time_limit=duration + 60,
        )  # fmt: skip
        server.settle()  # every child reaped: its reap counted
        cpu1, faults1 = parent_stat(server.pid)
    n = max(report["connections"], 1)
    return {
        "connections": report["connections"],
        "conn_per_s": report["conn_per_s"],
        "p50_ms": report["latency_ms"]["p50"],
        "parent_us_per_conn": (cpu1 - cpu0) / n * 1e6,
        "parent_faults_per_conn": (faults1 - faults0) / n,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.accounting", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of load per run")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated")
    parser.add_argument("--before", type=Path, help="another checkout to measure alternately")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help="results directory (default bench/results)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown:
        print(f"bench.accounting: unknown setup {unknown[0]!r} (known: {', '.join(SETUPS)})")
        return 2
    trees = {"after": ROOT}
    if args.before is not None:
        trees = {"before": args.before.resolve(), **trees}
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-accounting-") as tmp:
        for setup in setups:
            for r in range(args.rounds):
                for label, tree in trees.items():
                    run = {"setup": setup, "tree": label, "round": r}
                    run.update(run_one(tree, setup, args.duration, Path(tmp)))
                    runs.append(run)
                    print(
                        f"{setup:10s} {label:6s} round {r}: {run['connections']} conns, "
                        f"parent {run['parent_us_per_conn']:.0f} us/conn, "
                        f"{run['parent_faults_per_conn']:.1f} faults/conn",
                        flush=True,
                    )
    summary = {
        f"{setup}/{label}": {
            key: median([r[key] for r in runs if (r["setup"], r["tree"]) == (setup, label)])
            for key in ("parent_us_per_conn", "parent_faults_per_conn", "conn_per_s", "p50_ms")
        }
        for setup in setups
        for label in trees
    }
    for name, figures in summary.items():
        print(
            f"median {name:18s} parent {figures['parent_us_per_conn']:.0f} us/conn, "
            f"{figures['parent_faults_per_conn']:.1f} faults/conn"
        )
    data = {**metadata("accounting", argv), "runs": runs, "summary": summary}
    print(f"saved {write_results('accounting', data, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
