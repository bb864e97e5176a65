"""Seconds-long smoke runs of every bench script, so none rots.

Each script runs as a real process in its own session, with tiny settings.
Asserted: exit status, well-formed output (the JSON fields a reader relies on,
no failed connection), and that no process it started outlives it (every
process it starts inherits a unique environment tag, looked for afterwards).
Never timings: benchmarks measure, tests do not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.bench import run_bench
from tests.helpers.clients import echo_roundtrip
from tests.helpers.servers import ROOT, StartServer, config

REPORT_HEADINGS = (
    "## Machine",
    "## Issue 3 targets",
    "## forkserver vs",
    "## Fork cost",
    "## Memory",
    "## Scale",
    "## Bulk",
)
LATENCY_KEYS = {"min", "p50", "p90", "p99", "p99.9", "max", "mean"}


def _load_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["tool"] == "bench.load"
    assert set(report["latency_ms"]) == LATENCY_KEYS
    assert {"user_s", "system_s", "cores_used", "fraction_of_machine"} <= set(
        report["generator_cpu"]
    )
    assert report["elapsed_s"] > 0
    return report


def _has_cc() -> bool:
    return any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the script smokes write results (the report smoke renders them)."""
    return tmp_path_factory.mktemp("bench-results")


@pytest.mark.timeout(60)
def test_load_churn_and_keepalive(start_server: StartServer) -> None:
    server = start_server(config())
    port = str(server.tcp_address[1])

    result = run_bench("bench/load.py", "--port", port, "-c", "4", "-d", "1", "--json")
    assert result.returncode == 0, result.stderr
    churn = _load_json(result)
    assert churn["connections"] > 0
    assert churn["requests"] == churn["connections"]
    assert churn["errors_total"] == 0, churn["errors"]
    assert churn["latency_ms"]["p50"] > 0
    assert churn["latency_of"] == "connection"

    result = run_bench(
        "-m", "bench.load", "--port", port, "--mode", "keepalive", "--rounds", "5", "-d", "1",
        "--payload", "1000", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    keep = _load_json(result)
    assert keep["connections"] > 0
    assert keep["requests"] >= keep["connections"]
    assert keep["errors_total"] == 0, keep["errors"]
    assert keep["latency_of"] == "round"


@pytest.mark.timeout(60)
def test_load_counts_connections_and_unix(start_server: StartServer, tmp_path: Path) -> None:
    path = tmp_path / "echo.sock"
    start_server(config(host=[], unix=[str(path)]))
    result = run_bench(
        "-m", "bench.load", "--unix", str(path), "--connections", "200", "-c", "8",
        "--payload", "100000", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = _load_json(result)
    assert report["connections"] == 200
    assert report["errors_total"] == 0, report["errors"]
    assert report["target"] == f"unix:{path}"

    result = run_bench(
        "bench/load.py", "--unix", str(path), "--mode", "keepalive", "--connections", "50",
        "--rounds", "4", "-c", "8", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = _load_json(result)
    assert (report["connections"], report["requests"]) == (50, 200)


@pytest.mark.timeout(60)
def test_load_reports_errors_by_kind(start_server: StartServer) -> None:
    # Not an echo: PidEcho answers with its pid first, so --verify must object.
    server = start_server(config("tests.helpers.services:PidEcho"))
    port = str(server.tcp_address[1])
    result = run_bench("-m", "bench.load", "--port", port, "-c", "2", "-n", "20", "--json")
    assert result.returncode == 1
    report = _load_json(result)
    assert report["connections"] == 0
    assert report["errors_total"] == 20
    assert set(report["errors"]) <= {"mismatch", "long_reply"}

    with socket.socket() as sock:  # a port nobody listens on (for this instant)
        sock.bind(("127.0.0.1", 0))
        free = str(sock.getsockname()[1])
    result = run_bench("-m", "bench.load", "--port", free, "-c", "2", "-n", "10")
    assert result.returncode == 1
    assert "refused 10" in result.stdout

    result = run_bench("-m", "bench.load", "--port", port, "--mode", "bogus")
    assert result.returncode == 2


HTTP_GET = r"GET /x HTTP/1.0\r\n\r\n"


@pytest.mark.timeout(60)
def test_load_send_and_expect(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(config("forkserver.examples.http:HTTPHandler"))
    port = str(server.tcp_address[1])
    base = ("-m", "bench.load", "--port", port, "-c", "2", "-n", "20", "--json")

    result = run_bench(*base, "--send", HTTP_GET, "--expect", "HTTP/1.0 200 OK\\r\\n")
    assert result.returncode == 0, result.stderr
    report = _load_json(result)
    assert (report["connections"], report["errors_total"]) == (20, 0), report["errors"]
    assert report["first_unexpected_reply"] is None
    assert report["config"]["send"] == "GET /x HTTP/1.0\\r\\n\\r\\n"

    request = tmp_path / "request.http"
    request.write_bytes(b"HEAD /y HTTP/1.0\r\n\r\n")
    result = run_bench(
        *base, "--send-file", str(request), "--expect", r"re:(?s)^HTTP/1\.0 200 .*\r\n\r\n$"
    )
    assert result.returncode == 0, result.stderr
    assert _load_json(result)["connections"] == 20

    # A request the service refuses: every reply is a 501, so every connection fails.
    result = run_bench(*base, "--send", "BREW / HTTP/1.0\\r\\n\\r\\n", "--expect", "HTTP/1.0 200")
    assert result.returncode == 1
    report = _load_json(result)
    assert report["connections"] == 0
    assert report["errors"] == {"unexpected_reply": 20}
    shown = report["first_unexpected_reply"]
    assert shown.startswith("HTTP/1.0 501 Not Implemented\\r\\nServer: ")
    assert len(shown) < 250  # truncated

    result = run_bench(*base[:-1], "--send", "\\u20ac", "--expect", "x")  # not a byte
    assert result.returncode == 2
    assert "bad escape" in result.stderr


@pytest.mark.timeout(60)
def test_load_line_framed_keepalive(start_server: StartServer) -> None:
    port = str(start_server(config("tests.helpers.services:LineEcho")).tcp_address[1])
    keep = ["-m", "bench.load", "--port", port, "--mode", "keepalive", "--framing", "line"]
    keep += ["--rounds", "5", "-c", "2", "-n", "10", "--json"]

    result = run_bench(*keep, "--send", "PING 1\\r\\n", "--expect", "PING 1\\r\\n")
    assert result.returncode == 0, result.stderr
    report = _load_json(result)
    assert (report["connections"], report["requests"]) == (10, 50)
    assert report["errors_total"] == 0, report["errors"]

    result = run_bench(*keep, "--payload", "100")  # random printable line, echo checked
    assert result.returncode == 0, result.stderr
    assert _load_json(result)["requests"] == 50

    # A line service that answers something else than expected: the first round fails.
    result = run_bench(*keep, "--send", "PING\\n", "--expect", "PONG")
    assert result.returncode == 1
    report = _load_json(result)
    assert report["errors"] == {"unexpected_reply": 10}
    assert report["first_unexpected_reply"] == "PING\\n"


@pytest.mark.timeout(30)
def test_load_duration_is_kept(start_server: StartServer) -> None:
    # Replies, then holds the connection open for 60 s: no EOF to wait for.
    port = str(
        start_server(
            config("tests.helpers.services:greet_then_sleep", graceful_timeout=1)
        ).tcp_address[1]
    )
    t0 = time.monotonic()
    result = run_bench("-m", "bench.load", "--port", port, "-c", "2", "-d", "1", "--no-verify",
                       "--json")  # fmt: skip
    took = time.monotonic() - t0
    assert result.returncode == 1  # nothing completed
    report = _load_json(result)
    assert report["connections"] == 0
    assert report["errors_total"] == 0, report["errors"]
    assert report["unfinished"] == 2
    assert took < 1 + 1 + 2.5, f"asked for 1 s, took {took:.1f} s"  # grace 1 s, start-up


@pytest.mark.timeout(30)
def test_lean_floor_echoes_and_reaps_when_idle() -> None:
    from bench.servers import python_floor_spec, serve

    with serve(python_floor_spec(backlog=16)) as server:
        assert server.spec.argv[1:3] == ["-S", "-I"]
        for i in range(5):
            payload = os.urandom(1000 * i)
            assert echo_roundtrip(server.address, payload) == payload
        # The last children exit after the last accept: reaped without a new one.
        assert server.settle(timeout=5), server.children()
        assert server.faults() > 0


@pytest.mark.timeout(60)
def test_churn_client() -> None:
    from bench.build import PEERS, built, cache_dir
    from bench.common import run_generator
    from bench.servers import c_floor_spec, serve

    if not _has_cc():
        pytest.skip("no C compiler")
    churn = built(PEERS / "churn.c")
    assert churn is not None
    assert churn.parent == cache_dir() and ROOT not in churn.parents  # nothing tracked
    spec = c_floor_spec(backlog=64)
    assert spec is not None
    with serve(spec) as server:
        argv = [str(churn), "-c", "4", "-d", "0.5", "-p", "300", *map(str, server.address)]
        report = run_generator(argv, time_limit=30)
    assert report["tool"] == "churn"
    assert report["connections"] > 0
    assert report["errors_total"] == 0, report["errors"]
    assert set(report["latency_ms"]) == LATENCY_KEYS
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["generator_cpu"]["total_s"] > 0
    with socket.socket() as sock:  # a port nobody listens on (for this instant)
        sock.bind(("127.0.0.1", 0))
        free = str(sock.getsockname()[1])
    report = run_generator([str(churn), "-c", "1", "-d", "0.2", "127.0.0.1", free], 30)
    assert report["connections"] == 0
    assert set(report["errors"]) == {"refused"}


@pytest.mark.timeout(90)
def test_compare_out_help_and_columns(tmp_path: Path) -> None:
    help_text = run_bench("-m", "bench.compare", "--help").stdout
    for name in ("forkserver", "forkserver-pool", "socketserver", "tcpserver", "python-floor",
                 "python-needs", "python-needs-pool", "python-sigchld", "c-floor"):  # fmt: skip
        assert name in help_text
    tracked = ROOT / "bench" / "results" / "compare-latest.json"
    before = tracked.stat().st_mtime_ns if tracked.exists() else None
    cache = tmp_path / "cache"
    result = run_bench(
        "-m", "bench.compare", "--servers", "forkserver-pool,python-floor", "--rounds", "1",
        "--concurrency", "1", "--duration", "0.5", "--warmup", "0", "--generator", "python",
        env={"XDG_CACHE_HOME": str(cache)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((cache / "forkserver-bench" / "results" / "compare-latest.json").read_text())
    assert data["settings"]["generator"] == "bench.load"
    assert (tracked.stat().st_mtime_ns if tracked.exists() else None) == before
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("conc "))
    rows = lines[start : start + 3]
    assert len({len(line) for line in rows}) == 1, rows  # right-aligned to the same width
    third_ends = {[m.end() for m in re.finditer(r"\S+", line)][2] for line in rows}
    assert len(third_ends) == 1, rows  # conn/s right-aligned under its heading
    if importlib.util.find_spec("matplotlib") is None:
        said = [
            line for line in (result.stdout + result.stderr).splitlines() if "matplotlib" in line
        ]
        assert len(said) == 1, said


@pytest.mark.timeout(120)
def test_compare(out_dir: Path) -> None:
    result = run_bench(
        "-m", "bench.compare", "--rounds", "1", "--concurrency", "1,8", "--duration", "1",
        "--warmup", "0", "--out", str(out_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((out_dir / "compare-latest.json").read_text())
    expected = {"forkserver", "forkserver-pool", "socketserver", "python-floor", "python-sigchld"}
    expected |= {"python-needs", "python-needs-pool"}
    expected |= {"tcpserver"} if shutil.which("tcpserver") else set()
    expected |= {"c-floor"} if _has_cc() else set()
    assert set(data["summary"]) == expected
    assert data["settings"]["generator"] == ("churn.c" if _has_cc() else "bench.load")
    for name in expected:
        for c in ("1", "8"):
            row = data["summary"][name][c]
            assert row["conn_per_s"] > 0
            assert row["errors_total"] == 0
            assert row["p50_ms"] <= row["p99_ms"]
            assert row["faults_per_conn"] > 0  # every fork costs the server page faults
            assert row["load_us_per_conn"] > 0
            assert row["children_us_per_conn"] > 0
        assert data["ratios"][name]["8"]["conn_per_s"] > 0
    assert data["ratios"]["socketserver"]["1"]["conn_per_s"] == 1.0
    assert len(data["runs"]) == 2 * len(expected)
    assert data["machine"]["cores"] == os.cpu_count()
    assert len(list(out_dir.glob("compare-2*.json"))) == 1
    assert "forkserver" in result.stdout and "conn/s" in result.stdout
    # The targets: forkserver and the pool over each reference that ran.
    refs = {"python-floor"} | ({"tcpserver"} & expected)
    pairs = {(t["server"], t["reference"]) for t in data["targets"]}
    servers = ("forkserver", "forkserver-pool")
    # and the context: the needs floors over the lean one, forkserver over them
    context = {("python-needs", "python-floor"), ("forkserver", "python-needs")}
    context |= {("python-needs-pool", "python-floor"), ("forkserver-pool", "python-needs-pool")}
    assert pairs == {(s, r) for s in servers for r in refs} | context
    for t in data["targets"]:
        assert t["conn_per_s_8"] > 0 and t["p50_ms_1"] > 0 and t["faults_per_conn"] > 0
        assert t["conn_per_s_32"] is None  # not measured in this run
    assert "forkserver-pool / python-floor" in result.stdout


@pytest.mark.timeout(120)
def test_accounting(out_dir: Path) -> None:
    result = run_bench(
        "-m", "bench.accounting", "--rounds", "1", "--duration", "0.5",
        "--setups", "default,metrics", "--out", str(out_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((out_dir / "accounting-latest.json").read_text())
    assert {run["setup"] for run in data["runs"]} == {"default", "metrics"}
    for run in data["runs"]:
        assert run["connections"] > 0
        assert run["parent_faults_per_conn"] > 0  # every fork costs the parent faults


def _sandbox_missing() -> str | None:
    from forkserver.sandbox import landlock
    from forkserver.sandbox.seccomp import missing

    return missing() or (None if landlock.abi() else "this kernel has no Landlock")


@pytest.mark.timeout(120)
def test_sandbox_with_the_floors(out_dir: Path) -> None:
    """Every variant kind serves: forkserver with a [sandbox] and the needs
    floor with the same Landlock rule and seccomp filter, each against its own
    baseline."""
    why = _sandbox_missing()
    if why:
        pytest.skip(why)
    result = run_bench(
        "-m", "bench.sandbox", "--variants", "both,floor-both", "--rounds", "1",
        "--duration", "0.5", "--warmup", "0.2", "--concurrency", "1", "--per-child", "0",
        "--out", str(out_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((out_dir / "sandbox-latest.json").read_text())
    assert set(data["summary"]) == {"off", "both", "floor-off", "floor-both"}
    for name, levels in data["summary"].items():
        assert levels["1"]["errors_total"] == 0, name
        assert levels["1"]["conn_per_s"] > 0, name
    # Each ratio is to its own baseline: forkserver's to off, the floor's to floor-off.
    assert data["ratios"]["off"]["1"]["conn_per_s"] == 1.0
    assert data["ratios"]["floor-off"]["1"]["conn_per_s"] == 1.0
    assert data["ratios"]["floor-both"]["1"]["conn_per_s"] == pytest.approx(
        data["summary"]["floor-both"]["1"]["conn_per_s"]
        / data["summary"]["floor-off"]["1"]["conn_per_s"]
    )


_pycache = shutil.ignore_patterns("__pycache__")


@pytest.mark.timeout(90)
def test_compare_against_a_baseline_checkout(tmp_path: Path) -> None:
    """--baseline runs forkserver from another checkout beside this one."""
    out_dir = tmp_path / "results"  # its own: the report's test reads the shared one
    checkout = tmp_path / "old"
    shutil.copytree(ROOT / "forkserver", checkout / "forkserver", ignore=_pycache)
    init = checkout / "forkserver" / "__init__.py"  # leaves a mark when it is the one imported
    init.write_text(
        init.read_text() + "\n__import__('pathlib').Path(__file__).with_name('ran').touch()\n"
    )
    result = run_bench(
        "-m", "bench.compare", "--servers", "forkserver", "--baseline", str(checkout),
        "--rounds", "1", "--concurrency", "1", "--duration", "0.5", "--warmup", "0",
        "--out", str(out_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((out_dir / "compare-latest.json").read_text())
    assert set(data["summary"]) == {"forkserver", "forkserver@base"}
    assert (checkout / "forkserver" / "ran").exists()  # the baseline ran from the checkout
    assert not (ROOT / "forkserver" / "ran").exists()
    assert data["summary"]["forkserver@base"]["1"]["errors_total"] == 0
    assert data["summary"]["forkserver@base"]["1"]["conn_per_s"] > 0
    assert [(t["server"], t["reference"]) for t in data["targets"]] == [
        ("forkserver", "forkserver@base")
    ]
    missing = run_bench("-m", "bench.compare", "--baseline", str(tmp_path / "nowhere"))
    assert missing.returncode != 0
    assert "no forkserver/ there" in missing.stderr


@pytest.mark.timeout(60)
def test_mappings_counts_what_each_module_adds() -> None:
    result = run_bench("-m", "bench.mappings", "--rounds", "2", "--forks", "500", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    # _heapq, _struct, fcntl and resource: four or five mappings each, those
    # this Python did not build into its binary.
    shared = [
        m for m in ("_heapq", "_struct", "fcntl", "resource") if m not in sys.builtin_module_names
    ]
    assert data["mappings"]["with"] - data["mappings"]["without"] >= 4 * len(shared)
    assert data["cpu_us_per_fork"]["without"] > 0
    assert data["us_per_mapping"] is not None


@pytest.mark.timeout(90)
def test_fork_cost(out_dir: Path) -> None:
    result = run_bench(
        "-m", "bench.fork_cost", "--sizes", "0,10", "--concurrency", "1", "--duration", "0.5",
        "--paced-duration", "1", "--rate", "10", "--warmup", "0", "--out", str(out_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((out_dir / "fork_cost-latest.json").read_text())
    small, big = data["sizes"]
    assert (small["ballast_mb"], big["ballast_mb"]) == (0, 10)
    assert big["parent_rss_mb"] - small["parent_rss_mb"] > 8  # the ballast was built
    for row in data["sizes"]:
        assert row["closed_loop"]["1"]["connections"] > 0
        assert row["closed_loop"]["1"]["errors_total"] == 0
        assert row["paced"]["connections"] > 0
        assert row["paced"]["errors_total"] == 0
        assert row["paced_pool"]["connections"] > 0  # the same, with spares
        assert row["paced_pool"]["errors_total"] == 0


@pytest.mark.timeout(60)
def test_memory(out_dir: Path) -> None:
    result = run_bench(
        "-m", "bench.memory", "--servers", "forkserver,socketserver", "--idle", "2",
        "--connections", "300", "--chunks", "2", "--warmup", "50", "--out", str(out_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads((out_dir / "memory-latest.json").read_text())
    for name in ("forkserver", "socketserver"):
        idle = data["idle_child"][name]
        assert idle["children"] == 2
        assert 0 < idle["uss_kib_median"] <= idle["rss_kib_median"]
    growth = data["parent_growth"]
    assert growth["connections"] == 300
    assert [b["connections"] for b in growth["batches"]] == [150, 300]
    assert growth["errors_total"] == 0


@pytest.mark.timeout(60)
def test_scale(out_dir: Path) -> None:
    result = run_bench(
        "-m", "bench.scale", "--held", "50", "--samples", "20", "--window", "0.2",
        "--warmup", "10", "--spares", "4", "--out", str(out_dir), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["modes"] == json.loads((out_dir / "scale-latest.json").read_text())["modes"]
    assert data["settings"]["held"] == 50
    assert set(data["modes"]) == {"forkserver", "forkserver-pool"}
    for row in data["modes"].values():
        assert "failed" not in row, row["failed"]
        held = row["held"]
        assert held["connections"] == 50
        assert held["live_children"] >= 50 + row["spare_children"]
        for part in (row["none"], held):
            lat = part["latency"]
            assert lat["connections"] == 20
            assert lat["errors_total"] == 0, lat["errors"]
            assert 0 < lat["p50_ms"] <= lat["p90_ms"]
            assert part["idle"]["seconds"] >= 0.2
            assert part["idle"]["voluntary_switches"] >= 0
        assert row["p50_ratio"] > 0
        assert row["close"]["children_left"] <= row["spare_children"]  # all held ones reaped


@pytest.mark.timeout(60)
def test_bulk(out_dir: Path) -> None:
    result = run_bench(
        "-m", "bench.bulk", "--mib", "4", "--rounds", "1", "--repeat", "1",
        "--out", str(out_dir), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data["summary"]) == {"forkserver", "forkserver-pool", "bare"}
    assert len(data["runs"]) == 3
    for run in data["runs"]:
        assert run["verified"], run["errors"]
        assert run["bytes"] == 4 * 2**20
        assert run["mib_per_s"] > 0
    assert data["summary"]["bare"]["x_bare"] == 1.0
    assert data["summary"]["forkserver"]["x_bare"] > 0


class _CorruptEcho(threading.Thread):
    """Echoes one connection with the 1000th byte flipped: bench.bulk must notice."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()

    def run(self) -> None:
        conn, _ = self.sock.accept()
        with conn, self.sock:
            seen = 0
            while data := conn.recv(65536):
                if seen <= 1000 < seen + len(data):
                    buf = bytearray(data)
                    buf[1000 - seen] ^= 0xFF
                    data = bytes(buf)
                seen += len(data)
                conn.sendall(data)


@pytest.mark.timeout(30)
def test_bulk_detects_a_wrong_echo() -> None:
    from bench.bulk import Payload, transfer

    server = _CorruptEcho()
    server.start()
    row = transfer(server.address, Payload(2**20), timeout=20)
    server.join(10)
    assert row["bytes"] == 2**20
    assert not row["verified"]
    assert row["errors"] == ["echo differs from what was sent (BLAKE2b)"]


@pytest.mark.timeout(30)
def test_report_renders(out_dir: Path, tmp_path: Path) -> None:
    missing = [
        n
        for n in ("compare", "fork_cost", "memory", "scale", "bulk")
        if not (out_dir / f"{n}-latest.json").exists()
    ]
    if missing:
        pytest.skip(f"needs the results of the other smoke tests: {missing}")
    output = tmp_path / "RESULTS.md"
    result = run_bench(
        "-m", "bench.report", "--no-run", "--out", str(out_dir), "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    text = output.read_text()
    for heading in REPORT_HEADINGS:
        assert heading in text
    assert "python -m bench.compare --rounds 1" in text
    assert "python -m bench.scale --held 50" in text
    assert "64 MiB echoed per connection" not in text  # the smoke ran 4 MiB
    assert "4 MiB echoed per connection ≥ 0.9x bare loop" in text
    assert os.uname().release in text
