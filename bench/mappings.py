"""What a shared library in the parent costs each fork: its mappings.

    python -m bench.mappings                          # _heapq,_struct,fcntl,resource
    python -m bench.mappings --modules _json,_bisect --rounds 9 --forks 2000

fork() copies every mapping (VMA) of the parent and a child's exit tears each
one down, whether or not the child touches it.  An extension module is a
shared library of five mappings, so each one the serving parent imports is
paid once per connection.  This measures it: a fresh interpreter (``-S -I``)
imports *--modules* or not, then times ``--forks`` cycles of fork, _exit and
waitpid, CPU of parent and children together.  The two kinds of process
alternate for *--rounds* rounds; the medians are compared, per cycle and per
added mapping.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections.abc import Sequence

# Run in a fresh interpreter: imports *modules*, then times the fork cycles.
_PROBE = """
import gc, importlib, os, sys
modules, forks = sys.argv[1], int(sys.argv[2])
for name in filter(None, modules.split(",")):
    importlib.import_module(name)
gc.freeze()
with open("/proc/self/maps") as maps:
    vmas = sum(1 for _ in maps)
before = os.times()
for _ in range(forks):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
after = os.times()
cpu = sum(after[:4]) - sum(before[:4])
print(vmas, cpu / forks * 1e6)
"""


def probe(modules: str, forks: int) -> tuple[int, float]:
    """(mappings, µs of CPU per fork cycle) of a fresh interpreter that imported *modules*."""
    out = subprocess.run(
        [sys.executable, "-S", "-I", "-c", _PROBE, modules, str(forks)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout.split()
    return int(out[0]), float(out[1])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.mappings", description=__doc__.split("\n", 1)[0])
    p.add_argument("--modules", default="_heapq,_struct,fcntl,resource")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--forks", type=int, default=2000, help="fork cycles per process (2000)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    runs: dict[str, list[tuple[int, float]]] = {"without": [], "with": []}
    for i in range(args.rounds):
        order = ["without", "with"] if i % 2 == 0 else ["with", "without"]
        for kind in order:
            runs[kind].append(probe(args.modules if kind == "with" else "", args.forks))
    vmas = {kind: statistics.median(v for v, _ in got) for kind, got in runs.items()}
    cpu = {kind: statistics.median(c for _, c in got) for kind, got in runs.items()}
    added = vmas["with"] - vmas["without"]
    result = {
        "modules": args.modules,
        "rounds": args.rounds,
        "forks": args.forks,
        "mappings": vmas,
        "cpu_us_per_fork": cpu,
        "us_per_mapping": (cpu["with"] - cpu["without"]) / added if added else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"fork + _exit + waitpid, CPU per cycle, medians of {args.rounds} rounds:")
    for kind in ("without", "with"):
        print(f"  {kind:8s} {args.modules if kind == 'with' else '':40s}"
              f" {vmas[kind]:5.0f} mappings {cpu[kind]:7.1f} us")  # fmt: skip
    if added:
        print(f"  {result['us_per_mapping']:.2f} us per added mapping ({added:.0f} added)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
