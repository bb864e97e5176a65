"""Metrics (forkserver/metrics/) and the status command (forkserver/status.py).

The children a snapshot reports are real processes this module starts (and
ends), so psutil has something true to read; the output is parsed with
prometheus_client's reference parser; the HTTP responder and the status
command talk over real loopback sockets.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from forkserver import metrics, status
from forkserver.child.stream import serve
from forkserver.config import ConfigError, Settings
from forkserver.parent.accounting import Costs
from forkserver.parent.children import Child, ChildTable
from forkserver.parent.loop import Loop
from forkserver.server import Server

pytestmark = pytest.mark.timeout(30)

# Families by name as the parser reports them (it drops a counter's _total).
FAMILIES = {
    "forkserver_connections_accepted": "counter",
    "forkserver_connections_refused": "counter",
    "forkserver_fork_failures": "counter",
    "forkserver_children_exited": "counter",
    "forkserver_children": "gauge",
    "forkserver_max_children": "gauge",
    "forkserver_spare_children": "gauge",
    "forkserver_children_rss_bytes": "gauge",
    "forkserver_children_uss_bytes": "gauge",
    "forkserver_parent_rss_bytes": "gauge",
    "forkserver_parent_start_time_seconds": "gauge",
}
PROCESS_FAMILIES = {
    "forkserver_children_rss_bytes",
    "forkserver_children_uss_bytes",
    "forkserver_parent_rss_bytes",
    "forkserver_parent_start_time_seconds",
}
ODD_REASONS = {'say "no"': 4, "back\\slash\\": 5, "two\nlines": 6}


# -- real children to report on --------------------------------------------------


class Sleepers:
    """Processes started by this test (so their parent is this process)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, n: int) -> list[int]:
        """*n* processes that have said they are up and now only sleep."""
        started = []
        for _ in range(n):
            proc = subprocess.Popen(
                [sys.executable, "-S", "-c", "import time; print(1, flush=True); time.sleep(60)"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
            )
            self.procs.append(proc)
            started.append(proc)
        for proc in started:
            assert proc.stdout is not None and proc.stdout.readline() == b"1\n"
        return [p.pid for p in started]

    def exited_and_reaped(self) -> int:
        proc = subprocess.Popen(["true"])
        proc.wait(10)
        return proc.pid

    def zombie(self) -> int:
        """A child that has exited but is not reaped yet."""
        proc = subprocess.Popen(["true"])
        self.procs.append(proc)
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        return proc.pid

    def end(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
def sleepers() -> Iterator[Sleepers]:
    s = Sleepers()
    yield s
    s.end()
    ours = {p.pid for p in s.procs}
    left = [p for p in psutil.Process().children() if p.pid in ours]
    assert not left, f"processes outlived the test: {left}"


def fake_server(
    busy: list[int],
    idle: Sequence[int] = (),
    refused: dict[str, int] | None = None,
    stopping: bool = False,
) -> SimpleNamespace:
    """What snapshot() reads from a Server, around a real ChildTable."""
    table = ChildTable(Loop(), lambda child: None)
    now = time.monotonic()
    for i, pid in enumerate(busy):
        table.add(pid, socket.AF_INET, ("10.0.0.7", 50000 + i), now - 100 - i)
    for pid in idle:
        table.add(pid, 0, None, now - 1)
    table.exited_ok, table.exited_error, table.exited_signal = 10, 2, 1
    return SimpleNamespace(
        accepted=17,
        fork_failures=2,
        refused={"full": 3, "early_drop": 1} if refused is None else refused,
        children=table,
        _idle=set(idle),
        settings=SimpleNamespace(max_children=64, spare_children=len(idle)),
        stopping=stopping,
    )


def parse(text: str) -> dict[str, Any]:
    """Family name -> parsed family; fails on a sample outside its family."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # A sample whose name matches no # TYPE line comes back as its own
    # untyped family: that would mean the exposition is wrong.
    assert all(f.type not in {"unknown", "untyped"} for f in families.values()), families
    return families


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    (found,) = [s.value for s in families[name].samples if s.labels == labels]
    return float(found)


def memory(pids: list[int]) -> tuple[int, int]:
    """(total rss, total uss) of *pids*, read directly."""
    rss = uss = 0
    for pid in pids:
        full = psutil.Process(pid).memory_full_info()
        rss, uss = rss + full.rss, uss + full.uss
    return rss, uss


# -- the exposition --------------------------------------------------------------


def test_every_metric_parses_with_the_right_value(sleepers: Sleepers) -> None:
    busy, idle = sleepers.start(2), sleepers.start(1)
    snap = metrics.snapshot(fake_server(busy, idle))
    before = memory(busy + idle)
    text = metrics.render_prometheus(snap)
    after = memory(busy + idle)
    families = parse(text)
    assert {name: f.type for name, f in families.items()} == FAMILIES
    assert value(families, "forkserver_connections_accepted") == 17
    assert families["forkserver_connections_accepted"].samples[0].name == (
        "forkserver_connections_accepted_total"
    )
    assert value(families, "forkserver_connections_refused", reason="full") == 3
    assert value(families, "forkserver_connections_refused", reason="early_drop") == 1
    assert value(families, "forkserver_fork_failures") == 2
    for how, n in (("ok", 10), ("error", 2), ("signal", 1)):
        assert value(families, "forkserver_children_exited", how=how) == n
    assert value(families, "forkserver_children", state="busy") == 2
    assert value(families, "forkserver_children", state="idle") == 1
    assert value(families, "forkserver_max_children") == 64
    assert value(families, "forkserver_spare_children") == 1
    rss = value(families, "forkserver_children_rss_bytes")
    uss = value(families, "forkserver_children_uss_bytes")
    assert min(before[0], after[0]) <= rss <= max(before[0], after[0])
    assert min(before[1], after[1]) <= uss <= max(before[1], after[1])
    assert 0 < uss < rss
    me = psutil.Process()
    parent_rss = value(families, "forkserver_parent_rss_bytes")
    assert 0.5 < parent_rss / me.memory_info().rss < 2
    assert value(families, "forkserver_parent_start_time_seconds") == pytest.approx(
        me.create_time()
    )
    for line in text.splitlines():  # one HELP and one TYPE per family
        if line.startswith("# TYPE forkserver_connections_accepted"):
            assert line == "# TYPE forkserver_connections_accepted_total counter"


def test_without_process_stats_no_psutil_families() -> None:
    families = parse(metrics.render_prometheus(metrics.snapshot(fake_server([])), False))
    assert set(families) == set(FAMILIES) - PROCESS_FAMILIES
    assert value(families, "forkserver_children", state="busy") == 0
    assert value(families, "forkserver_children", state="idle") == 0


def test_children_gone_or_not_ours_are_left_out_of_the_sums(sleepers: Sleepers) -> None:
    (live,) = sleepers.start(1)
    gone, zombie = sleepers.exited_and_reaped(), sleepers.zombie()
    foreign = os.getppid()  # alive, but not a child of ours: a reused pid
    snap = metrics.snapshot(fake_server([live, gone, zombie, foreign]))
    families = parse(metrics.render_prometheus(snap))
    assert value(families, "forkserver_children", state="busy") == 4  # the table says so
    assert value(families, "forkserver_children_rss_bytes") == memory([live])[0]
    assert value(families, "forkserver_children_uss_bytes") == memory([live])[1]
    listed = json.loads(metrics.render_children(snap))["children"]
    assert [c["pid"] for c in listed] == [live]


def test_label_values_and_help_are_escaped() -> None:
    snap = metrics.snapshot(fake_server([], refused=ODD_REASONS))
    text = metrics.render_prometheus(snap, with_process_stats=False)
    assert 'forkserver_connections_refused_total{reason="say \\"no\\""} 4' in text
    assert 'forkserver_connections_refused_total{reason="back\\\\slash\\\\"} 5' in text
    assert 'forkserver_connections_refused_total{reason="two\\nlines"} 6' in text
    families = parse(text)
    got = {s.labels["reason"]: s.value for s in families["forkserver_connections_refused"].samples}
    assert got == ODD_REASONS


def test_connection_costs_are_prometheus_histograms() -> None:
    """Bucket counts are cumulative, a value on a bound falls in that bucket
    (le: less or equal), and a spare that never had a connection is not counted."""
    server = fake_server([])
    costs = server.children.costs = Costs()
    now = time.monotonic()
    # (user, sys, max rss KiB, seconds alive)
    for user, system, rss_kib, age in ((0.001, 0.0, 9 << 10, 0.001), (0.5, 0.25, 100 << 10, 3.0)):
        child = Child(os.getpid(), socket.AF_INET, ("10.0.0.1", 1), now - age)
        costs.record(child, resource.struct_rusage((user, system, rss_kib) + (0,) * 13), now)
    spare = Child(os.getpid(), 0, None, now)
    costs.record(spare, resource.struct_rusage((9.0, 9.0, 1 << 30) + (0,) * 13), now)
    text = metrics.render_prometheus(metrics.snapshot(server), with_process_stats=False)
    families = parse(text)
    for name in ("cpu_seconds", "max_rss_bytes", "duration_seconds"):
        assert families[f"forkserver_connection_{name}"].type == "histogram"
        assert value(families, f"forkserver_connection_{name}", le="+Inf") == 2
    cpu = "forkserver_connection_cpu_seconds"
    assert [value(families, cpu, le=le) for le in ("0.001", "0.5", "1.0")] == [1, 1, 2]
    assert "forkserver_connection_cpu_seconds_sum 0.751\n" in text
    assert "forkserver_connection_cpu_seconds_count 2\n" in text
    rss = "forkserver_connection_max_rss_bytes"
    assert value(families, rss, le=repr(float(8 << 20))) == 0
    assert value(families, rss, le=repr(float(16 << 20))) == 1
    assert value(families, rss, le=repr(float(128 << 20))) == 2
    duration = "forkserver_connection_duration_seconds"
    assert value(families, duration, le="0.0025") == 1
    assert value(families, duration, le="2.5") == 1
    assert value(families, duration, le="5.0") == 2


def test_snapshot_reads_a_real_server(sleepers: Sleepers) -> None:
    """The attribute names snapshot() reads are the real Server's (mypy
    checks the same against the ServerView protocol)."""
    busy, idle = sleepers.start(1)[0], sleepers.start(1)[0]
    server = Server(("127.0.0.1", 0), lambda conn, addr: None, max_children=7, spare_children=1)
    try:
        server._parent.acceptor.accepted, server._parent.acceptor.fork_failures = 5, 1
        server._parent.acceptor.refusals.refused = {"full": 2}
        started = time.monotonic() - 30
        server.children.add(busy, socket.AF_INET6, ("::1", 4000, 0, 0), started)
        server.children.add(idle, 0, None, time.monotonic())
        server._idle.add(idle)
        server.children.exited_signal = 3
        snap = metrics.snapshot(server, parent_pid=1234)
        assert snap["pid"] == 1234
        assert (snap["accepted"], snap["fork_failures"], snap["refused"]) == (5, 1, {"full": 2})
        assert snap["exited"] == {"ok": 0, "error": 0, "signal": 3}
        assert (snap["max_children"], snap["spare_children"]) == (7, 1)
        by_pid = {c["pid"]: c for c in snap["children"]}
        assert by_pid[busy]["peer"] == "[::1]:4000"
        assert by_pid[busy]["state"] == "busy"
        assert 30 <= by_pid[busy]["age"] < 40
        assert (by_pid[idle]["peer"], by_pid[idle]["state"]) == ("", "idle")
        server.refused["full"] = 99  # a snapshot is a copy
        assert snap["refused"] == {"full": 2}
        assert snap["stopping"] is False
        server._parent.stopper.stopping = True  # what Stopper.begin() sets first
        assert metrics.snapshot(server)["stopping"] is True
        server._parent.stopper.stopping = False
    finally:
        server.children.close()  # stop watching: they are the fixture's to end
        server.children._children.clear()
        server.server_close()


def test_importing_metrics_costs_the_parent_nothing() -> None:
    """The package's own modules and nothing else: no psutil, json or typing."""
    code = (
        "import sys, forkserver.server; before = set(sys.modules); import forkserver.metrics; "
        "print(sorted(set(sys.modules) - before))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True
    ).stdout
    own = [
        "forkserver.metrics",
        *(f"forkserver.metrics.{m}" for m in ("http", "prometheus", "snapshot")),
    ]
    assert out.strip() == repr(own)


# -- the HTTP responder ------------------------------------------------------------


def exchange(
    request: bytes, snap: metrics.Snapshot, half_close: bool = True, timeout: float = 5.0
) -> tuple[int, int, dict[str, str], bytes]:
    """Send *request* to serve_metrics over a socketpair; returns (what it
    returned, the status line's code, headers, body) once it closed."""
    ours, theirs = socket.socketpair()
    with ours:
        ours.sendall(request)
        if half_close:
            ours.shutdown(socket.SHUT_WR)
        returned = metrics.serve_metrics(theirs, snap, timeout)
        assert theirs.fileno() == -1, "serve_metrics left the connection open"
        ours.settimeout(5)
        data = b""
        while chunk := ours.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    assert status_line.startswith("HTTP/1.0 "), status_line
    headers = dict(line.split(": ", 1) for line in header_lines)
    assert int(headers["Content-Length"]) == len(body) or request.startswith(b"HEAD")
    return returned, int(status_line.split()[1]), headers, body


def test_get_metrics(sleepers: Sleepers) -> None:
    snap = metrics.snapshot(fake_server(sleepers.start(2)))
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
    returned, code, headers, body = exchange(request, snap, half_close=False)
    assert (returned, code) == (200, 200)
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = parse(body.decode())
    assert value(families, "forkserver_children", state="busy") == 2


def test_head_metrics_and_a_query_string() -> None:
    snap = metrics.snapshot(fake_server([]))
    _, code, headers, body = exchange(b"HEAD /metrics HTTP/1.0\r\n\r\n", snap)
    assert (code, body) == (200, b"")
    assert int(headers["Content-Length"]) > 0
    _, code, _, body = exchange(b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n", snap)
    assert code == 200 and b"forkserver_max_children 64" in body


def test_get_children(sleepers: Sleepers) -> None:
    busy, idle = sleepers.start(2), sleepers.start(1)
    snap = metrics.snapshot(fake_server(busy, idle))
    _, code, headers, body = exchange(b"GET /children HTTP/1.0\r\n\r\n", snap)
    assert (code, headers["Content-Type"]) == (200, "application/json")
    document = json.loads(body)
    assert document["pid"] == os.getpid()
    assert document["parent_rss"] > 0 and document["uptime"] > 0
    assert (document["max_children"], document["spare_children"]) == (64, 1)
    children = {c["pid"]: c for c in document["children"]}
    assert set(children) == set(busy + idle)
    assert [children[p]["state"] for p in busy + idle] == ["busy", "busy", "idle"]
    assert children[busy[0]]["peer"] == "10.0.0.7:50000"
    assert children[idle[0]]["peer"] == ""
    assert children[busy[0]]["age"] >= 100
    for pid, child in children.items():
        full = psutil.Process(pid).memory_full_info()
        assert (child["rss"], child["uss"]) == (full.rss, full.uss)
        assert 0 <= child["cpu"] < 10


@pytest.mark.parametrize(
    ("stopping", "code", "reason", "body"),
    [(False, 200, "OK", b"serving\n"), (True, 503, "Service Unavailable", b"stopping\n")],
)
def test_healthz_says_whether_the_parent_is_stopping(
    stopping: bool, code: int, reason: str, body: bytes
) -> None:
    snap = metrics.snapshot(fake_server([], stopping=stopping))
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.30\r\n\r\n"
    returned, got, headers, got_body = exchange(request, snap, half_close=False)
    assert (returned, got, got_body) == (code, code, body)
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    # HAProxy's option httpchk sends HTTP/1.0 and, with HEAD, reads no body.
    _, got, headers, got_body = exchange(b"HEAD /healthz HTTP/1.0\r\n\r\n", snap)
    assert (got, got_body, int(headers["Content-Length"])) == (code, b"", len(body))
    # The reason phrase is what a human reading a probe failure sees.
    ours, theirs = socket.socketpair()
    with ours:
        ours.sendall(b"GET /healthz?verbose HTTP/1.0\r\n\r\n")
        metrics.serve_metrics(theirs, snap)
        assert ours.recv(100).startswith(f"HTTP/1.0 {code} {reason}\r\n".encode())


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"GET /nope HTTP/1.0\r\n\r\n", 404),
        (b"GET / HTTP/1.0\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n", 405),
        (b"\x00\xff\xfe garbage\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),  # HTTP/0.9
        (b"GET /m\xe9trics HTTP/1.0\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.0", 400),  # EOF before the line ended
        (b"", 400),
        (b"X" * 20000, 400),  # no end of line within MAX_HEAD
    ],
)
def test_bad_requests_get_an_error_and_the_connection_closed(
    request_bytes: bytes, code: int
) -> None:
    snap = metrics.snapshot(fake_server([]))
    returned, got, headers, body = exchange(request_bytes, snap)
    assert (returned, got) == (code, code)
    assert body.startswith(str(code).encode())
    if code == 405:
        assert headers["Allow"] == "GET, HEAD"


def test_a_silent_client_gets_408_after_the_timeout() -> None:
    snap = metrics.snapshot(fake_server([]))
    t0 = time.monotonic()
    returned, code, _, _ = exchange(b"GET /metr", snap, half_close=False, timeout=0.3)
    assert (returned, code) == (408, 408)
    assert 0.3 <= time.monotonic() - t0 < 3


def test_a_client_that_left_is_not_an_error() -> None:
    snap = metrics.snapshot(fake_server([]))
    ours, theirs = socket.socketpair()
    ours.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
    ours.close()
    assert metrics.serve_metrics(theirs, snap) == 0
    assert theirs.fileno() == -1


def test_scrape_child_answers_from_its_copy_of_the_parent(sleepers: Sleepers) -> None:
    """The integration pattern: the parent accepts and forks; the child takes
    the snapshot, answers, and leaves with os._exit; the parent's later
    changes are not in the answer."""
    (busy,) = sleepers.start(1)
    server = fake_server([busy])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=5)
        conn, _ = listener.accept()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                client.close()
                listener.close()
                snap = metrics.snapshot(server, parent_pid=os.getppid())
                code = 0 if metrics.serve_metrics(conn, snap) == 200 else 3
            finally:
                os._exit(code)
        try:
            conn.close()  # the parent keeps no copy: the client must see EOF
            server.accepted = 1000
            server.children.add(os.getpid(), socket.AF_INET, ("1.2.3.4", 5), 0.0)
            with client:
                client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := client.recv(65536):
                    data += chunk
            _, status_code = os.waitpid(pid, 0)
            pid = 0
        finally:
            if pid:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status_code) == 0
    assert data.startswith(b"HTTP/1.0 200 OK\r\n")
    families = parse(data.partition(b"\r\n\r\n")[2].decode())
    assert value(families, "forkserver_connections_accepted") == 17
    assert value(families, "forkserver_children", state="busy") == 1
    assert value(families, "forkserver_children_rss_bytes") == memory([busy])[0]
    # The child measured the test process as the parent, by its pid.
    assert value(families, "forkserver_parent_start_time_seconds") == pytest.approx(
        psutil.Process().create_time()
    )


def test_serve_metrics_as_the_run_function_of_child_serve() -> None:
    """The wiring the parent uses: child.stream.serve() (what a scrape
    child runs) with serve_metrics as its handler; serve_metrics
    closes the connection, and serve()'s own close after it is harmless."""
    snap = metrics.snapshot(fake_server([]))
    errors: list[object] = []

    def run(conn: socket.socket, peer: object) -> None:
        metrics.serve_metrics(conn, snap)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=5)
        conn, peer = listener.accept()
        with client:
            client.sendall(b"GET /children HTTP/1.0\r\n\r\n")
            returned = serve(
                conn.detach(),
                socket.AF_INET,
                peer,
                run,
                lambda c, a: errors.append(a),
            )
            data = b""
            while chunk := client.recv(65536):
                data += chunk
    assert (returned, errors) == (0, [])
    assert data.startswith(b"HTTP/1.0 200 OK\r\n")
    assert json.loads(data.partition(b"\r\n\r\n")[2])["children"] == []


# -- the address setting -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        (":9100", ("", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("127.0.0.1", None),
        ("::1:9100", None),
        ("127.0.0.1:65536", None),
        ("127.0.0.1:-1", None),
        ("127.0.0.1:\uff19\uff11", None),  # fullwidth digits: isdigit(), not ASCII
        ("127.0.0.1:", None),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int] | None) -> None:
    """The address parser, and the metrics setting's check (config/values.py)
    that rejects what it cannot parse."""
    if expected is None:
        with pytest.raises(ValueError, match=r"HOST:PORT|brackets"):
            metrics.parse_address(text)
        with pytest.raises(ConfigError) as caught:
            Settings(metrics=text)
        assert str(caught.value) == (
            f'server.metrics: "{text}" is not "HOST:PORT" (like "127.0.0.1:9100" or "[::1]:9100")'
        )
    else:
        assert metrics.parse_address(text) == expected
        assert Settings(metrics=text).metrics == text
    assert Settings(metrics="").metrics == ""  # no metrics listener


# -- the status command ------------------------------------------------------------


CANNED = {
    "pid": 4242,
    "uptime": 3725.0,
    "parent_rss": 20 << 20,
    "max_children": 64,
    "spare_children": 1,
    "children": [
        {"pid": 4303, "peer": "", "age": 0.5, "state": "idle", "rss": 8 << 20,
         "uss": 1 << 20, "cpu": 0.01},
        {"pid": 4301, "peer": "10.0.0.7:51234", "age": 75.5, "state": "busy",
         "rss": 10 << 20, "uss": 2202009, "cpu": 0.25},
        {"pid": 4302, "peer": 'unix:/run/a"b\\c\nd', "age": 2.3, "state": "busy",
         "rss": 9 << 20, "uss": None, "cpu": 0.0},
    ],
}  # fmt: skip
CANNED_TABLE = """\
forkserver pid 4242, up 1h02m: 3 children (2 busy, 1 idle, max 64); \
children RSS 27.0 MiB, USS 3.1 MiB, CPU 0.26s; parent RSS 20.0 MiB
 PID  PEER                  AGE  STATE       RSS      USS    CPU
4301  10.0.0.7:51234      1m15s  busy   10.0 MiB  2.1 MiB  0.25s
4302  unix:/run/a"b\\c\\nd   2.3s  busy    9.0 MiB        -  0.00s
4303  -                    0.5s  idle    8.0 MiB  1.0 MiB  0.01s
"""


class CannedServer:
    """An HTTP server on 127.0.0.1:0 answering every GET with one canned reply."""

    def __init__(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.paths: list[str] = []
        canned = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                canned.paths.append(self.path)
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # A short poll: shutdown() at teardown waits for one.
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def canned() -> Iterator[Callable[..., CannedServer]]:
    servers: list[CannedServer] = []

    def start(code: int = 200, body: bytes | None = None, **kw: str) -> CannedServer:
        server = CannedServer(code, json.dumps(CANNED).encode() if body is None else body, **kw)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def run_status(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = status.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_prints_the_table(canned: Callable[..., CannedServer], capsys: Any) -> None:
    server = canned()
    assert run_status(capsys, "--url", server.url) == (0, CANNED_TABLE, "")
    assert server.paths == ["/children"]


@pytest.mark.parametrize(
    "form", ["127.0.0.1:{port}", "http://127.0.0.1:{port}/", "http://127.0.0.1:{port}/metrics"]
)
def test_status_url_forms(canned: Callable[..., CannedServer], capsys: Any, form: str) -> None:
    server = canned()
    code, out, _ = run_status(capsys, "--url", form.format(port=server.port))
    assert (code, out) == (0, CANNED_TABLE)
    assert server.paths == ["/children"]


def test_status_with_no_children(canned: Callable[..., CannedServer], capsys: Any) -> None:
    server = canned(body=json.dumps({"pid": 7, "children": []}).encode())
    code, out, _ = run_status(capsys, "--url", server.url)
    assert (code, out) == (
        0,
        "forkserver pid 7: 0 children (0 busy, 0 idle); children RSS -, USS -, CPU -\n"
        "no live children\n",
    )


def _one_line_failure(code: int, out: str, err: str, *wanted: str) -> None:
    assert (code, out) == (1, "")
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("forkserver status: ") and "Traceback" not in err
    for text in wanted:
        assert text in err, err


def test_status_when_nothing_listens(capsys: Any) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        code, out, err = run_status(capsys, "--url", f"http://127.0.0.1:{port}")
    _one_line_failure(code, out, err, f"cannot reach http://127.0.0.1:{port}/children", "refused")


def test_status_when_the_server_does_not_answer(capsys: Any) -> None:
    with socket.create_server(("127.0.0.1", 0)) as mute:  # connects, never answers
        port = mute.getsockname()[1]
        t0 = time.monotonic()
        code, out, err = run_status(capsys, "--url", f"127.0.0.1:{port}", "--timeout", "0.3")
        assert time.monotonic() - t0 < 3
    _one_line_failure(code, out, err, "timed out")


@pytest.mark.parametrize(
    ("code", "body", "wanted"),
    [
        (404, b"no", "answered 404 Not Found"),
        (200, b"<html>", "not a forkserver child list"),
        (200, b"[1, 2]", "not a forkserver child list"),
        (200, b'{"children": [{"pid": 1}]}', "a child has no peer"),
        (200, b'{"children": [{"pid": "1", "peer": "", "age": 1, "state": "busy", '
         b'"rss": null, "uss": null, "cpu": null}]}', "pid is '1'"),
    ],
)  # fmt: skip
def test_status_with_a_wrong_answer(
    canned: Callable[..., CannedServer], capsys: Any, code: int, body: bytes, wanted: str
) -> None:
    server = canned(code, body)
    _one_line_failure(*run_status(capsys, "--url", server.url), wanted)


def test_status_reads_what_serve_metrics_writes(sleepers: Sleepers, capsys: Any) -> None:
    busy, idle = sleepers.start(2), sleepers.start(1)
    snap = metrics.snapshot(fake_server(busy, idle))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def answer_once() -> None:
            conn, _ = listener.accept()
            metrics.serve_metrics(conn, snap)

        thread = threading.Thread(target=answer_once, daemon=True)
        thread.start()
        code, out, err = run_status(capsys, "--url", f"127.0.0.1:{port}")
        thread.join(5)
    assert (code, err) == (0, "")
    summary, header, *rows = out.splitlines()
    assert summary.startswith(f"forkserver pid {os.getpid()}, up ")
    assert ": 3 children (2 busy, 1 idle, max 64); children RSS " in summary
    assert header.split() == ["PID", "PEER", "AGE", "STATE", "RSS", "USS", "CPU"]
    cells = [row.split() for row in rows]
    # Oldest first: the busy ones (100 s and more), then the spare.
    assert [(int(c[0]), c[1], c[3]) for c in cells] == [
        (busy[1], "10.0.0.7:50001", "busy"),
        (busy[0], "10.0.0.7:50000", "busy"),
        (idle[0], "-", "idle"),
    ]
    assert all(c[5] == "MiB" and c[7] == "MiB" for c in cells), rows


def test_status_usage_errors(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exc:
        status.main([])
    assert exc.value.code == 2
    assert "one of the arguments --url -c/--config is required" in capsys.readouterr().err
    assert run_status(capsys, "--url", "ftp://x:1") == (
        2,
        "",
        'forkserver status: --url: "ftp://x:1" is not http://HOST:PORT\n',
    )


HAS_METRICS_SETTING = "metrics" in {f.name for f in dataclasses.fields(Settings)}


@pytest.mark.skipif(
    not HAS_METRICS_SETTING, reason="Settings has no metrics field yet (to be wired in)"
)
@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", ""])
def test_status_reads_the_address_from_the_config(
    canned: Callable[..., CannedServer], capsys: Any, tmp_path: Path, host: str
) -> None:
    server = canned()
    path = tmp_path / "server.toml"
    path.write_text(
        f'[server]\nhandler = "forkserver.examples.echo:EchoHandler"\n'
        f'metrics = "{host}:{server.port}"\n'
    )
    assert run_status(capsys, "--config", str(path)) == (0, CANNED_TABLE, "")


def test_status_config_errors(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "server.toml"
    path.write_text('[server]\nhandler = "forkserver.examples.echo:EchoHandler"\n')
    code, out, err = run_status(capsys, "--config", str(path))
    assert (code, out) == (2, "")
    assert err == (
        f"forkserver status: {path}: server.metrics is not set: "
        "the server has no metrics listener\n"
    )
    code, out, err = run_status(capsys, "--config", str(tmp_path / "missing.toml"))
    assert (code, out) == (2, "")
    assert err.startswith(f"forkserver status: {tmp_path / 'missing.toml'}: cannot read config")
