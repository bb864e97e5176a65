"""Running a bench script as a real process, and proving it left nothing behind.

Every process it starts inherits a unique environment tag, looked for
afterwards: the scripts start servers in sessions of their own, which a
process-group check would miss.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import psutil

from .servers import ROOT

TAG = "FORKSERVER_BENCH_SMOKE"


def _tagged(tag: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(TAG) == tag:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def run_bench(
    *args: str, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python ARGS`` from the repo root; assert nothing it started is left."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(ROOT), TAG: tag, **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    # Killed processes can take a moment to finish exiting.
    deadline = time.monotonic() + 5
    while (left := _tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in left:
        p.kill()
    assert not left, f"processes outlived {args}: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
