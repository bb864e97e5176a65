"""bench.compare under each Python of the test matrix: what upgrading Python does.

    make test-all                # once: builds .nox/tests-3-XX, the venvs used here
    python -m bench.versions --rounds 2 --duration 2 --concurrency 1,8

For each version (``--pythons``, default the matrix's 3.11, 3.12, 3.13) it
runs ``python -m bench.compare`` with that version's interpreter, from the
venv ``make test-all`` left in ``.nox/`` (forkserver installed in it), on
fork-on-accept, the pool, socketserver and the lean Python floor: one
compare run per version, versions one after another.  A version without a
venv is named and left out.  The results go to
``bench/results/versions-latest.json``, and the section "Per Python version"
of bench/RESULTS.md is replaced (or added) between its markers, leaving the
rest of the file as it is; ``bench.report`` renders the same section.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, metadata, write_results
from .report import COMPARE_HEAD, _table, compare_rows
from .servers import ROOT, bench_env

PYTHONS = "3.11,3.12,3.13"
SERVERS = "forkserver,forkserver-pool,socketserver,python-floor"
BEGIN, END = "<!-- versions:begin -->", "<!-- versions:end -->"
OUTPUT = ROOT / "bench" / "RESULTS.md"


def interpreter(version: str) -> Path | None:
    """The matrix venv's python for *version* ("3.12"), if make test-all built it."""
    path = ROOT / ".nox" / f"tests-{version.replace('.', '-')}" / "bin" / "python"
    return path if path.exists() else None


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> dict[str, Any]:
    data = metadata("bench.versions", argv)
    data["settings"] = {
        "servers": SERVERS,
        "rounds": args.rounds,
        "duration": args.duration,
        "concurrency": args.concurrency,
    }
    data["versions"] = {}
    data["missing"] = []
    for version in args.pythons.split(","):
        python = interpreter(version)
        if python is None:
            print(f"bench.versions: no .nox venv for Python {version}: left out", file=sys.stderr)
            data["missing"].append(version)
            continue
        with tempfile.TemporaryDirectory(prefix="bench-versions-") as out:
            compare = ["-m", "bench.compare", "--servers", SERVERS, "--rounds", str(args.rounds)]
            compare += ["--duration", str(args.duration), "--concurrency", args.concurrency]
            print(f"$ {python} {' '.join(compare)}", file=sys.stderr, flush=True)
            cmd = [str(python), *compare, "--out", out, "--no-plot"]
            code = subprocess.run(cmd, cwd=ROOT, env=bench_env(), check=False).returncode
            latest = Path(out) / "compare-latest.json"
            if code not in (0, 1) or not latest.exists():
                raise SystemExit(f"bench.versions: bench.compare on {version} exited {code}")
            data["versions"][version] = json.loads(latest.read_text())
    return data


def section(data: dict[str, Any]) -> list[str]:
    """The "Per Python version" section of RESULTS.md, markers included."""
    s = data["settings"]
    out = [
        BEGIN,
        "## Per Python version",
        "",
        f"`{data['command']}` ({data['date']}): for each Python, `python -m bench.compare "
        f"--servers {s['servers']} --rounds {s['rounds']} --duration {s['duration']} "
        f"--concurrency {s['concurrency']}` under that Python (the venv `make test-all` "
        "builds in `.nox/`), one version after another.  Short settings on a shared "
        "2-core machine: compare ratios within a version (x ss: to socketserver on the "
        "same Python, same run); columns as in the table above.",
        "",
    ]
    rows = []
    loads = []
    for run_data in data["versions"].values():
        python = run_data["machine"]["python"].split()[-1]
        rows += [[python, *row] for row in compare_rows(run_data)]
        m = run_data["machine"]
        end = (m.get("load_average_at_end") or [None])[0]
        loads.append(f"{python}: {m['load_average_at_start'][0]:g} → {end}")
    out += _table(["Python", *COMPARE_HEAD], rows, text_columns=3)
    out += ["", f"Load average (1 min), start → end of each run: {'; '.join(loads)}."]
    if data["missing"]:
        out += ["", f"Not measured (no interpreter found): Python {', '.join(data['missing'])}."]
    return [*out, END]


def splice(text: str, lines: list[str]) -> str:
    """*text* with the section between the markers replaced, or appended."""
    block = "\n".join(lines)
    if BEGIN in text and END in text:
        return text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.versions", description=__doc__.split("\n", 1)[0])
    p.add_argument("--pythons", default=PYTHONS, help=f"versions ({PYTHONS})")
    p.add_argument("--rounds", type=int, default=2, help="bench.compare --rounds (2)")
    p.add_argument("--duration", type=float, default=2.0, help="bench.compare --duration (2)")
    p.add_argument("--concurrency", default="1,8", help="bench.compare --concurrency (1,8)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--output", type=Path, default=OUTPUT, help="markdown file (bench/RESULTS.md)")
    args = p.parse_args(argv)
    data = run(args, argv)
    if not data["versions"]:
        raise SystemExit("bench.versions: no Python measured; run `make test-all` first")
    write_results("versions", data, args.out)
    args.output.write_text(splice(args.output.read_text(), section(data)))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
