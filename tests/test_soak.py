"""The soak's short version: seconds of mixed load, child kills and signal storms.

``bench/soak.py`` runs as a real process (``run_bench``: its own session,
nothing it started may outlive it) against the real server, once per serving
mode; its JSON report is what is asserted.  A run against a handler that
drops and flips bytes shows that the soak does see lost and corrupted bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.bench import run_bench

DURATION = 7.0
MIN_SERVED = 20  # a loaded 2-core machine serves thousands in 7 s; this is "it served"


def soak(tmp_path: Path, duration: float, *args: str) -> tuple[int, dict[str, Any]]:
    result = run_bench(
        "-m", "bench.soak", "--duration", str(duration), "--seed", "4", "--json",
        "--kill-interval", "0.3,1", "--out", str(tmp_path), *args, timeout=duration + 50,
    )  # fmt: skip
    assert result.stdout, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert json.loads((tmp_path / "soak-latest.json").read_text()) == report
    return result.returncode, report


@pytest.mark.timeout(90)
@pytest.mark.parametrize("spares", [0, 4], ids=["fork-on-accept", "pool"])
def test_short_soak(tmp_path: Path, spares: int) -> None:
    code, r = soak(tmp_path, DURATION, "--spare-children", str(spares), "--max-children", "32")
    c, b, f, s, p = r["connections"], r["bytes"], r["faults"], r["server"], r["parent"]
    assert code == 0, r["failures"]
    assert r["ok"] and not r["failures"]
    assert (b["lost"], b["corrupted"]) == (0, 0), r["lost_samples"]
    assert (c["lost"], c["corrupted"]) == (0, 0), r["lost_samples"]
    assert r["zombies"] == {"at_end": 0, "lingering": 0}
    assert c["served"] >= MIN_SERVED
    assert c["attempted"] == sum(
        c[k] for k in ("served", "reset_by_us", "killed_on_purpose", "lost", "corrupted")
    )
    assert all(r["pools"][name]["attempted"] > 0 for name in r["pools"])
    assert r["keepalive_rounds"] > 0 and c["reset_by_us"] > 0
    assert b["echoed"] > 0 and b["sent"] >= b["echoed"]
    assert f["kills"] > 0 and f["kills_logged_by_server"] == f["kills"]
    assert f["signals_total"] > 0
    assert s["serving_at_end"] and s["exit_status"] == 0 and s["left_behind"] == []
    assert p["fds_growth"] == 0, p
    assert r["config"]["spare_children"] == spares


@pytest.mark.timeout(60)
def test_soak_sees_lost_and_corrupted_bytes(tmp_path: Path) -> None:
    code, r = soak(
        tmp_path, 3, "--handler", "tests.helpers.services:FaultyEcho",
        "--pools", "churn=2,keepalive=0,slow=0,reset=0,halfclosed=0",
    )  # fmt: skip
    assert code == 1
    assert r["bytes"]["lost"] > 0 and r["bytes"]["corrupted"] > 0
    assert r["connections"]["lost"] > 0 and r["connections"]["corrupted"] > 0
    assert any(sample["class"] == "corrupted" for sample in r["lost_samples"])
    assert any("bytes lost" in why for why in r["failures"])
    assert r["server"]["exit_status"] == 0  # the soak failed; the server did not
