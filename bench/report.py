"""Regenerate bench/RESULTS.md: run compare, fork_cost, memory, scale and bulk; write it.

    python -m bench.report            # default settings of each script: ~10 minutes
    python -m bench.report --quick    # reduced settings (said so in the file): ~2.5 minutes
    python -m bench.report --no-run   # re-render from bench/results/*-latest.json

Each script runs as its own process (``python -m bench.compare ...``), writes
its JSON under ``bench/results/``, and the markdown is rendered from those
files only: every figure in RESULTS.md comes from a result file, with the
command that produced it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR
from .compare import NEEDS_FLOOR, NEEDS_POOL
from .servers import BASELINE_NAME, ROOT, bench_env

OTHER_LOAD_WARNING = 0.2  # cores used by other processes worth a warning
OUTPUT = ROOT / "bench" / "RESULTS.md"
SCRIPTS = ("compare", "fork_cost", "memory", "scale", "bulk")
QUICK = {
    "compare": ["--rounds", "1", "--duration", "2"],
    "fork_cost": ["--duration", "1.5", "--paced-duration", "4"],
    "memory": ["--connections", "20000"],
    "scale": ["--held", "1000", "--samples", "100", "--window", "2"],
    "bulk": ["--rounds", "1"],
}
IDLE_CPU_LIMIT = 0.01  # parent CPU seconds per 5 s idle window that count as "none"


def _run_scripts(quick: bool, out: Path) -> None:
    for name in SCRIPTS:
        # Always named: bench.compare's own default is outside the repository.
        argv = [sys.executable, "-m", f"bench.{name}", "--out", str(out)]
        if quick:
            argv += QUICK[name]
        print("$ " + " ".join(argv[1:]), file=sys.stderr, flush=True)
        # The scripts kill their own servers; they run in our session so Ctrl-C reaches them.
        code = subprocess.run(argv, cwd=ROOT, env=bench_env(), check=False).returncode
        if code not in (0, 1):
            raise SystemExit(f"bench.report: bench.{name} exited {code}")


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}-latest.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _f(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _table(head: list[str], rows: list[list[str]], text_columns: int = 1) -> list[str]:
    """A markdown table; the first *text_columns* left-aligned, numbers right-aligned."""
    align = ["---" if i < text_columns else "---:" for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


COMPARE_HEAD = ["clients", "server", "conn/s", "x ss", "p50 ms", "x ss", "p99 ms"]
COMPARE_HEAD += ["parent µs/conn", "child µs/conn", "load µs/conn", "faults/conn"]
COMPARE_HEAD += ["generator cores", "other cores", "errors"]


def compare_rows(data: dict[str, Any]) -> list[list[str]]:
    """bench.compare's results, one row per concurrency and server (COMPARE_HEAD)."""
    s = data["settings"]
    rows = []
    for c in map(str, s["concurrency"]):
        for name, levels in data["summary"].items():
            row = levels.get(c)
            if row is None:
                continue
            rel = data["ratios"].get(name, {}).get(c, {})
            rows.append(
                [
                    c,
                    name,
                    f"{row['conn_per_s']:,.0f}",
                    _f(rel.get("conn_per_s")),
                    _f(row["p50_ms"], ".3f"),
                    _f(rel.get("p50_ms")),
                    _f(row["p99_ms"], ".3f"),
                    _f(row["parent_us_per_conn"], ".0f"),
                    _f(row["children_us_per_conn"], ".0f"),
                    _f(row.get("load_us_per_conn"), ".0f"),
                    _f(row.get("faults_per_conn"), ".0f"),
                    _f(row["generator_cores"]),
                    _f(row.get("other_cores")),
                    str(row["errors_total"]),
                ]
            )
    return rows


def _compare(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    out = [
        "## forkserver vs socketserver vs tcpserver",
        "",
        f"`{data['command']}` ({data['date']})",
        "",
        f"{s['payload']}-byte echo churn (connect, send, half-close, read to EOF, close); "
        f"median of {s['rounds']} round(s) of {s['duration']:g} s per server and concurrency, "
        f"server order alternating; max_children {s['max_children']} and backlog "
        f"{s['backlog']} for every server; load from {s.get('generator', 'bench.load')}.  "
        "x ss: ratio to socketserver.  Parent/child µs: the server's CPU per connection "
        "(parent, and its reaped children); load µs: the generator's.  Faults: the server's "
        "minor page faults per connection (parent + reaped children).  Generator: cores "
        "the load generator used.  Other: cores used meanwhile by everything else on the "
        "machine (non-idle CPU time not accounted for by the server or the generator).  "
        "python-floor: `bench/peers/leanfloor.py` (`python -S -I`, raw-fd accept, "
        "`os.read`/`os.write`, reaping in its loop); python-sigchld: `bench/peers/forkecho.py` "
        "(socket objects, a SIGCHLD handler); c-floor: `bench/peers/forkecho.c`.",
        "",
    ]
    if s.get("tcpserver_argv"):
        out += [f"tcpserver ran as `{' '.join(s['tcpserver_argv'])}`.", ""]
    rows = compare_rows(data)
    out += _table(COMPARE_HEAD, rows, text_columns=2)
    if data.get("targets"):
        out += [
            "",
            "Targets as ratios in this run (conn/s: higher is better; p50 and page faults "
            "per connection: lower is better):",
            "",
        ]
        rows = [
            [
                f"{t['server']} / {t['reference']}",
                *(
                    _f(t[k])
                    for k in ("conn_per_s_8", "conn_per_s_32", "p50_ms_1", "faults_per_conn")
                ),
            ]
            for t in data["targets"]
        ]
        head = ["ratio", "conn/s, 8 clients", "conn/s, 32 clients", "p50, 1 client"]
        out += _table([*head, "faults/conn"], rows)
    failed = [r for r in data["runs"] if "failed" in r]
    for r in failed:
        out += ["", f"Round {r['round']}, {r['server']} failed: {r['failed'].splitlines()[0]}"]
    return out


def _fork_cost(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    levels = [str(c) for c in s["concurrency"]]
    out = [
        "## Fork cost against parent size",
        "",
        f"`{data['command']}` ({data['date']})",
        "",
        f"forkserver serving `{s['handler']}`, whose import builds the ballast in the parent. "
        f"Closed loop: {s['payload']}-byte churn for {s['duration']:g} s per concurrency.  "
        f"Paced: {s['rate']:g} connections/s for {s['paced_duration']:g} s, latency from "
        "connect to EOF.",
        "",
    ]
    head = ["ballast MB", "parent RSS MB"] + [f"conn/s, {c} clients" for c in levels]
    head += [f"parent µs/conn ({levels[0]})", f"p50 ms ({levels[0]})", "paced p50 ms"]
    head += ["paced p90 ms", "paced max ms", "paced p50 ms, pool", "errors"]
    rows = []
    for row in data["sizes"]:
        if "failed" in row:
            rows.append([f"{row['ballast_mb']:g}", "failed", *[""] * (len(head) - 2)])
            continue
        closed, pace = row["closed_loop"], row["paced"]
        errors = pace["errors_total"] + sum(r["errors_total"] for r in closed.values())
        rows.append(
            [
                f"{row['ballast_mb']:g}",
                f"{row['parent_rss_mb']:,.0f}",
                *[f"{closed[c]['conn_per_s']:,.0f}" for c in levels],
                _f(closed[levels[0]]["parent_us_per_conn"], ".0f"),
                _f(closed[levels[0]]["p50_ms"], ".3f"),
                _f(pace["p50_ms"], ".3f"),
                _f(pace["p90_ms"], ".3f"),
                _f(pace["max_ms"], ".3f"),
                _f(row.get("paced_pool", {}).get("p50_ms"), ".3f"),
                str(errors),
            ]
        )
    out += _table(head, rows)
    if data.get("paced_p50_us_per_mb") is not None:
        out += [
            "",
            f"Least-squares slope against parent RSS: paced p50 "
            f"{data['paced_p50_us_per_mb']:+.1f} µs per MB; parent CPU per connection "
            f"{data['parent_us_per_conn_per_mb']:+.1f} µs per MB.",
        ]
    return out


def _memory(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    out = [
        "## Memory",
        "",
        f"`{data['command']}` ({data['date']})",
        "",
        f"Idle child: {s['idle']} clients per server each do one 64-byte echo round and stay "
        "open; USS is memory only that child holds (psutil `memory_full_info`).",
        "",
    ]
    rows = []
    for name, row in data["idle_child"].items():
        if "failed" in row:
            rows.append([name, "failed", "", "", ""])
            continue
        rows.append(
            [
                name,
                f"{row['uss_kib_median']:,.0f}",
                f"{row['uss_kib_max']:,.0f}",
                f"{row['pss_kib_median']:,.0f}",
                f"{row['rss_kib_median']:,.0f}",
            ]
        )
    out += _table(["server", "USS KiB (median)", "USS KiB (max)", "PSS KiB", "RSS KiB"], rows)
    g = data.get("parent_growth")
    if g and "failed" not in g:
        out += [
            "",
            f"forkserver parent over {g['connections']:,} churn connections ({s['concurrency']} "
            f"clients), after {g['warmup_connections']:,} warm-up connections:",
            "",
        ]
        rows = [
            [
                "after warm-up",
                f"{g['after_warmup']['rss_kib']:,.0f}",
                f"{g['after_warmup']['uss_kib']:,.0f}",
                str(g["after_warmup"]["fds"]),
                "0",
            ]
        ]
        for b in g["batches"]:
            rows.append(
                [
                    f"{b['connections']:,}",
                    f"{b['rss_kib']:,.0f}",
                    f"{b['uss_kib']:,.0f}",
                    str(b["fds"]),
                    str(b["errors_total"]),
                ]
            )
        out += _table(["connections", "RSS KiB", "USS KiB", "open fds", "errors"], rows)
        out += [
            "",
            f"RSS growth: {g['rss_growth_kib']:+,.0f} KiB; USS {g['uss_growth_kib']:+,.0f} KiB.",
        ]
    elif g:
        out += ["", f"Parent growth run failed: {g['failed'].splitlines()[0]}"]
    return out


def _scale(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    out = [
        "## Scale: thousands of connections held",
        "",
        f"`{data['command']}` ({data['date']})",
        "",
        f"forkserver's echo with max_children above the {s['held']:,} connections held "
        f"(each opened from one process and echoing once, so each has its own live child), "
        f"forking on accept and with {s['spares']} spares.  Latency: {s['samples']} fresh "
        f"{s['payload']}-byte churn connections, one at a time, connect to EOF, with none "
        "held and with them held.  Parent µs/conn: the parent's CPU per fresh connection "
        "(schedstat).  Idle: the parent's own CPU (psutil, 10 ms ticks), run time "
        f"(schedstat) and voluntary context switches over {s['window']:g} s with nothing "
        "to do.  Busy: cores the whole machine used during the fresh connections; kdamond: "
        "of which DAMON's kernel thread, where it runs.",
        "",
    ]
    if s["held"] < s["held_requested"]:
        reasons = "; ".join(data["limits"]["reduced_because"])
        out += [f"**Held {s['held']:,}, not {s['held_requested']:,}**: {reasons}.", ""]
    head = ["mode", "held", "p50 ms", "p90 ms", "p99 ms", "p50 x none", "parent µs/conn"]
    head += ["idle CPU s", "idle run ms", "idle switches", "busy cores", "kdamond cores", "errors"]
    rows, notes = [], []
    kdamond = False
    for name, row in data["modes"].items():
        if "failed" in row:
            rows.append([name, "failed", *[""] * (len(head) - 2)])
            notes.append(f"{name} failed: {row['failed'].splitlines()[0]}")
            continue
        for part in (row["none"], row["held"]):
            lat, idle = part["latency"], part["idle"]
            kdamond = kdamond or lat.get("kdamond_cores") is not None
            rows.append(
                [
                    name,
                    f"{part.get('connections', 0):,}",
                    _f(lat["p50_ms"], ".3f"),
                    _f(lat["p90_ms"], ".3f"),
                    _f(lat["p99_ms"], ".3f"),
                    _f(row["p50_ratio"] if part is row["held"] else 1.0),
                    _f(lat["parent_us_per_conn"], ".0f"),
                    _f(idle["cpu_s"], ".2f"),
                    _f(idle["runtime_ms"], ".3f"),
                    str(idle["voluntary_switches"]),
                    _f(lat.get("machine_busy_cores")),
                    _f(lat.get("kdamond_cores")),
                    str(lat["errors_total"]),
                ]
            )
        h = row["held"]
        notes.append(
            f"{name}: {h['connections']:,} connections opened in {h['open_s']:.1f} s "
            f"({_f(h['parent_us_per_open'], '.0f')} µs of parent CPU each), "
            f"{h['live_children']:,} live children, parent RSS {h['parent_rss_mb']:g} MB and "
            f"{h['parent_fds']} fds while they were held, {_f(h.get('memory_mb'), ',.0f')} MB "
            "of the machine's memory in use for them; all closed and reaped in "
            f"{row['close']['drain_s']:.1f} s."
        )
    out += _table(head, rows)
    out += ["", *[f"- {n}" for n in notes]]
    if kdamond:
        out += [
            "",
            "This machine runs DAMON (`kdamond`): its checks of a physical page walk every "
            "process that maps it, and the parent's pages are mapped by every child, so its "
            "cost, and its holding of the locks that fork and exit take, grow with the "
            "children held (see bench/README.md).",
        ]
    return out


def _bulk(data: dict[str, Any]) -> list[str]:
    s = data["settings"]
    out = [
        f"## Bulk: {s['mib']} MiB per connection",
        "",
        f"`{data['command']}` ({data['date']})",
        "",
        f"One client sends {s['mib']} MiB of random bytes (one thread, `sendall`) while "
        "reading the echo (`recv_into` a preallocated buffer), then checks it (length, "
        "BLAKE2b, EOF).  MiB/s: size over the time from `connect()` to the last byte back.  "
        "bare: `bench/peers/bare_echo.py`, one process running `while data := "
        "conn.recv(65536): conn.sendall(data)` (no fork).  Medians over "
        f"{s['rounds']} round(s) x {s['repeat']} cycles, each cycle one transfer per server "
        "in alternating order; x bare: median over cycles of the ratio to bare in the same "
        "cycle.  Client and server cores: CPU over the transfer time (server: parent plus "
        "reaped children, 10 ms ticks).",
        "",
    ]
    head = ["server", "MiB/s", "x bare", "x bare (of medians)", "min", "max", "connect ms"]
    head += ["client cores", "server cores", "failed"]
    rows = []
    for name, row in data["summary"].items():
        bad = sum(1 for r in data["runs"] if r["server"] == name and not r.get("verified"))
        if not row["transfers"]:
            rows.append([name, "failed", *[""] * (len(head) - 3), str(bad)])
            continue
        rows.append(
            [
                name,
                f"{row['mib_per_s']:,.0f}",
                _f(row.get("x_bare")),
                _f(row.get("x_bare_of_medians")),
                f"{row['mib_per_s_min']:,.0f}",
                f"{row['mib_per_s_max']:,.0f}",
                _f(row["connect_ms"]),
                _f(row["client_cores"]),
                _f(row["server_cores"]),
                str(bad),
            ]
        )
    return out + _table(head, rows)


def _targets(
    compare: dict[str, Any] | None,
    fork: dict[str, Any] | None,
    memory: dict[str, Any] | None,
    scale: dict[str, Any] | None = None,
    bulk: dict[str, Any] | None = None,
) -> list[str]:
    """Issue 3's targets against these figures (ratios, so the machine matters less)."""
    rows: list[list[str]] = []

    def check(
        what: str, value: float | None, limit: float, fmt: str, higher: bool, strict: bool = False
    ) -> None:
        if value is None:
            rows.append([what, "-", "not measured"])
            return
        if higher:
            ok = value > limit if strict else value >= limit
        else:
            ok = value < limit if strict else value <= limit
        rows.append([what, format(value, fmt), "met" if ok else "**not met**"])

    if compare:
        for name in ("forkserver", "forkserver-pool"):
            rel = compare["ratios"].get(name)
            if rel is None:
                continue
            for c in ("8", "32"):
                check(
                    f"{name}: conn/s ≥ 2.5x socketserver, {c} clients",
                    rel.get(c, {}).get("conn_per_s"),
                    2.5,
                    ".2f",
                    True,
                )
            check(
                f"{name}: p50 ≤ 0.6x socketserver, 1 client",
                rel.get("1", {}).get("p50_ms"),
                0.6,
                ".2f",
                False,
            )
        floor = compare["ratios"].get("python-floor")
        if floor:
            # No target: what the least possible Python server reaches here.
            at = " / ".join(f"{floor.get(c, {}).get('conn_per_s', 0):.2f}" for c in ("8", "32"))
            what = "python-floor (leanfloor.py): conn/s x socketserver, 8 / 32 clients"
            rows.append([what, at, "the ceiling for Python"])
    if fork:
        big = [r for r in fork["sizes"] if "failed" not in r and r["ballast_mb"] >= 1000]
        # The target is for fork off the connection's path (the pool); forking
        # on accept is listed for what the pool saves.
        on_accept = big[-1]["paced"]["p50_ms"] if big else None
        rows.append(
            [
                "forkserver, forking on accept: paced (10/s) p50 with 1 GB preloaded (ms)",
                "-" if on_accept is None else format(on_accept, ".3f"),
                "for reference",
            ]
        )
        pool = big[-1].get("paced_pool", {}) if big else {}
        check(
            f"forkserver-pool ({fork['settings'].get('spare_children')} spares): paced (10/s) "
            "p50 ≤ 2 ms with 1 GB preloaded (ms)",
            pool.get("p50_ms"),
            2.0,
            ".3f",
            False,
        )
    if memory:
        fs = memory["idle_child"].get("forkserver", {})
        check("idle child USS ≤ 1 MiB (KiB)", fs.get("uss_kib_max"), 1024, ",.0f", False)
        g = memory.get("parent_growth") or {}
        n = g.get("connections", 0)
        check(
            f"parent RSS growth < 1 MiB over {n:,} connections (KiB)",
            g.get("rss_growth_kib"),
            1024,
            "+,.0f",
            False,
        )
    if scale:
        held, window = scale["settings"]["held"], scale["settings"]["window"]
        for name, row in scale["modes"].items():
            failed = "failed" in row
            check(
                f"{name}: new connection p50 with {held:,} held ≤ 2x with none",
                None if failed else row["p50_ratio"],
                2.0,
                ".2f",
                False,
            )
            check(
                f"{name}: parent CPU while idle, none and {held:,} held (s per {window:g} s)",
                None if failed else max(row["none"]["idle"]["cpu_s"], row["held"]["idle"]["cpu_s"]),
                IDLE_CPU_LIMIT * window / 5,
                ".2f",
                False,
                strict=True,
            )
    if bulk:
        mib = bulk["settings"]["mib"]
        for name in ("forkserver", "forkserver-pool"):
            if name in bulk["summary"]:
                check(
                    f"{name}: {mib} MiB echoed per connection ≥ 0.9x bare loop",
                    bulk["summary"][name].get("x_bare"),
                    0.9,
                    ".2f",
                    True,
                )
    if not rows:
        return []
    return ["## Issue 3 targets", "", *_table(["target", "measured", ""], rows, text_columns=3)]


def _other_load(compare: dict[str, Any] | None) -> tuple[float, float] | None:
    """(median, max) cores used by other processes during the compare runs."""
    if not compare:
        return None
    values = [r["other_cores"] for r in compare["runs"] if r.get("other_cores") is not None]
    if not values:
        return None
    return statistics.median(values), max(values)


# Issue 11's targets, as ratios to a reference measured in the same run:
# (key in compare's "targets", what, limit, higher is better).
FLOOR_TARGETS = (
    ("conn_per_s_8", "conn/s at 8 clients", 0.75, True),
    ("conn_per_s_32", "conn/s at 32 clients", 0.75, True),
    ("p50_ms_1", "p50 at 1 client", None, False),
    ("faults_per_conn", "page faults per connection (parent + children)", 1.5, False),
)
P50_LIMITS = {"forkserver": 1.3, "forkserver-pool": 1.0}  # x the lean floor's p50


def _floor_targets(compare: dict[str, Any] | None) -> list[str]:
    """Issue 11's targets: forkserver and its pool against the lean Python
    floor and tcpserver, from bench.compare's own ratios."""
    if not compare or not compare.get("targets"):
        return []
    rows: list[list[str]] = []
    for t in compare["targets"]:
        server, ref = t["server"], t["reference"]
        for key, what, floor_limit, higher in FLOOR_TARGETS:
            value = t.get(key)
            if {NEEDS_FLOOR, NEEDS_POOL} & {server, ref} or ref == BASELINE_NAME:  # context
                shown = "-" if value is None else f"{value:.2f}"
                rows.append([f"{server} / {ref}: {what}", shown, "(context)"])
                continue
            if ref == "tcpserver" and key not in ("conn_per_s_8", "conn_per_s_32"):
                continue  # against tcpserver only "ahead of it" counts
            if ref == "tcpserver":
                limit = 1.0
            elif floor_limit is None:  # p50: its own limit per server
                limit = P50_LIMITS.get(server, 1.0)
            else:
                limit = floor_limit
            if value is None:
                rows.append([f"{server} / {ref}: {what}", "-", "not measured"])
                continue
            ok = value >= limit if higher else value <= limit
            sign = ">=" if higher else "<="
            rows.append(
                [f"{server} / {ref}: {what} {sign} {limit:g}x", f"{value:.2f}",
                 "met" if ok else "**not met**"]
            )  # fmt: skip
    return ["## Issue 11 targets (ratios to the lean floor and tcpserver, one run)", "",
            "python-needs (bench/peers/needsfloor.py) is the lean floor plus what forkserver "
            "promises, as cheaply as we know: its rows are context, not targets.", "",
            *_table(["target", "measured", ""], rows, text_columns=3)]  # fmt: skip


def render(out: Path, command: str, quick: bool) -> str:
    """RESULTS.md text from the ``*-latest.json`` files in *out*."""
    from .versions import section as per_version  # it uses this module's tables

    compare, fork, memory, scale, bulk = (_load(out, name) for name in SCRIPTS)
    first = next((d for d in (compare, fork, memory, scale, bulk) if d), None)
    if first is None:
        raise SystemExit(f"bench.report: no *-latest.json in {out}; run without --no-run")
    m = first["machine"]
    lines = [
        "# forkserver benchmark results",
        "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M:%S %z')}; do not edit: "
        "rerun the command (see bench/README.md).",
        "",
    ]
    if quick:
        lines += [
            "**Reduced settings** (`--quick`): "
            + "; ".join(f"bench.{k} {' '.join(v)}" for k, v in QUICK.items())
            + ".  The default run (`python -m bench.report`) takes longer and is steadier.",
            "",
        ]
    lines += [
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; {m['memory_gib']} GiB RAM",
        f"- Kernel: Linux {m['kernel']}",
        f"- Python: {m['python']}",
        f"- forkserver: {m['forkserver_commit'] or 'unknown commit'}",
    ]
    for name, data in zip(SCRIPTS, (compare, fork, memory, scale, bulk), strict=True):
        if data:
            start = data["machine"]["load_average_at_start"][0]
            end = (data["machine"].get("load_average_at_end") or [None])[0]
            lines.append(
                f"- Load average (1 min) during bench.{name}: {start:g} at the start"
                + (f", {end:g} at the end" if end is not None else "")
            )
    lines.append("")
    other = _other_load(compare)
    if other is not None and other[1] > OTHER_LOAD_WARNING:
        lines += [
            f"**The machine was not quiet**: while bench.compare measured, other processes used "
            f"{other[0]:.2f} cores (median over the runs; up to {other[1]:.2f}) of "
            f"{m['cores']}.  Absolute figures are lower and noisier than on an idle machine; "
            "ratios, from servers measured alternately in the same run, hold up better.",
            "",
        ]
    lines += [
        "All traffic is on 127.0.0.1: the load generator (bench.compare: `bench/peers/churn.c`; "
        "the others: `bench/load.py`) shares the cores "
        "with the server under test, so absolute figures are lower than on separate machines; "
        "compare ratios, measured in one run.",
        "",
    ]
    sections = [
        _floor_targets(compare),
        _targets(compare, fork, memory, scale, bulk),
        _compare(compare) if compare else [],
        _fork_cost(fork) if fork else [],
        _memory(memory) if memory else [],
        _scale(scale) if scale else [],
        _bulk(bulk) if bulk else [],
        per_version(versions) if (versions := _load(out, "versions")) else [],
    ]
    for section in sections:
        if section:
            lines += [*section, ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.report", description=__doc__.split("\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="reduced settings (noted in the file)")
    p.add_argument("--no-run", action="store_true", help="render from existing results only")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    p.add_argument("--output", type=Path, default=OUTPUT, help="markdown file (bench/RESULTS.md)")
    args = p.parse_args(argv)
    if not args.no_run:
        _run_scripts(args.quick, args.out)
    command = "python -m bench.report" + (" --quick" if args.quick else "")
    if args.no_run:
        command += " (rendered with --no-run)"
    args.output.write_text(render(args.out, command, args.quick))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
