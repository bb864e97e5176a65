"""What the benchmark scripts share: running bench.load, saving results, the machine.

``run_load`` runs ``python -m bench.load --json`` as a separate process (in its
own session, killed by process group afterwards), so the generator's CPU and
memory never mix with the script's, and the command-line tool users run is the
one measured.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from .servers import ROOT, bench_env, kill_group

RESULTS_DIR = ROOT / "bench" / "results"


class LoadError(RuntimeError):
    """bench.load failed to run (not: some connections failed, which it reports)."""


def _busy_seconds() -> tuple[float, float]:
    """(non-idle, total) CPU seconds of the whole machine since boot, all cores."""
    t = psutil.cpu_times()
    fields = t._asdict()
    # guest time is already counted in user time
    total = sum(v for k, v in fields.items() if k not in ("guest", "guest_nice"))
    idle = fields["idle"] + fields.get("iowait", 0.0)
    return total - idle, total


def run_load(address: tuple[str, int], *args: str, time_limit: float) -> dict[str, Any]:
    """Run bench.load against *address* with extra flags *args*; its JSON report.

    The report gains ``machine``, as from :func:`run_generator`.
    """
    argv = [sys.executable, "-m", "bench.load", "--host", address[0], "--port", str(address[1])]
    return run_generator([*argv, "--json", "--quiet", *args], time_limit=time_limit)


def run_generator(argv: list[str], time_limit: float) -> dict[str, Any]:
    """Run a load generator that prints one JSON report (bench.load, bench/peers/churn.c).

    It runs in its own session and is killed by process group afterwards.
    The report gains ``machine``: wall seconds of the run (start to exit), and
    the CPU seconds the whole machine spent not idle meanwhile (the
    generator, the server, and anything else running).  Exit status 0 or 1
    (some connections failed) is a report; anything else raises LoadError.
    """
    name = argv[2] if argv[1:2] == ["-m"] else Path(argv[0]).name
    busy0, total0 = _busy_seconds()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=bench_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=time_limit)
    except subprocess.TimeoutExpired as exc:
        raise LoadError(f"{name} did not finish in {time_limit:g} s: {argv}") from exc
    finally:
        kill_group(proc.pid)  # its workers, should any be left
        proc.wait()
    busy1, total1 = _busy_seconds()
    wall = time.monotonic() - t0
    if proc.returncode not in (0, 1):
        raise LoadError(f"{name} exited {proc.returncode}: {' '.join(argv)}\n{err}")
    report: dict[str, Any] = json.loads(out)
    report["machine"] = {
        "wall_s": wall,
        "busy_cpu_s": busy1 - busy0,
        "busy_fraction": (busy1 - busy0) / (total1 - total0) if total1 > total0 else None,
    }
    return report


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def timestamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def write_results(name: str, data: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    """Write *data* as ``<name>-<timestamp>.json`` and ``<name>-latest.json``.

    Also notes the load average at the end, next to the one at the start.
    """
    data.setdefault("machine", {})["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1, sort_keys=False) + "\n"
    path = out_dir / f"{name}-{data.get('timestamp', timestamp())}.json"
    path.write_text(text)
    (out_dir / f"{name}-latest.json").write_text(text)
    return path


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "forkserver"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + (" + uncommitted changes in forkserver/" if dirty else "")


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it already was."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "forkserver_commit": _git_commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def metadata(script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """The header every result file starts with: command, date, machine."""
    args = list(sys.argv[1:] if argv is None else argv)
    return {
        "script": script,
        "command": " ".join(["python", "-m", script, *args]),
        "timestamp": timestamp(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine(),
    }


def int_list(text: str) -> list[int]:
    """``"1,8,32"`` -> [1, 8, 32] (for argparse)."""
    return [int(x) for x in text.split(",") if x.strip()]


def mb(n: float) -> float:
    return round(n / 2**20, 1)
