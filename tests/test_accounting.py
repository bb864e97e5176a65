"""What each connection cost: CPU, peak RSS and lifetime in the access log,
in /metrics histograms and in `forkserver status`; deaths by signal in words.

The handler burns a known CPU time (measured by its own process_time) and
touches a known amount of memory, so the figures have bounds to meet.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
from typing import Any

import psutil
import pytest

from forkserver.parent import accounting
from forkserver.parent.accounting import Deaths
from tests.helpers.clients import connect, read_pid_greeting, recv_to_eof
from tests.helpers.metrics import metrics_url, scrape
from tests.helpers.servers import MODES, ROOT, ServerProcess, StartServer, config, wait_until

COSTLY = "tests.helpers.services:costly"
BURN = 0.3  # CPU seconds the handler spins for
MIB = 64  # MiB it allocates and touches
REQUEST = f"{BURN} {MIB}\n".encode()
# CPU a child may use beyond BURN: fork's faults, the 64 MiB's page faults,
# its line; measured here at 0.03 to 0.05 s.  CPU time, not wall: a busy
# machine does not inflate it.
CPU_SLACK = 0.5
# KiB of peak RSS beyond the parent's RSS and the 64 MiB (the interpreter's
# own allocations while serving).
RSS_SLACK = 32 << 10


def cost_line(server: ServerProcess, port: int, pid: int) -> tuple[float, float, float, int]:
    """Served a costly request: (duration, cpu user, cpu sys, max rss KiB) of its access line."""
    line = server.wait_for_log(rf"forkserver\.access: 127\.0\.0\.1:{port} pid {pid} ")
    m = re.search(
        rf"pid {pid} (\d+\.\d+)s in {len(REQUEST)} out \d+ exit status 0; "
        r"cpu (\d+\.\d+)s user (\d+\.\d+)s sys, max rss (\d+) KiB$",
        line,
    )
    assert m is not None, line
    return float(m[1]), float(m[2]), float(m[3]), int(m[4])


def cost_record(server: ServerProcess, pid: int) -> tuple[float, float, float, int]:
    line = server.wait_for_log(rf'"logger": "forkserver\.access".*"pid": {pid}\b')
    record = json.loads(line)
    assert record["status"] == "exit status 0" and record["bytes_in"] == len(REQUEST)
    assert record["max_rss"] % 1024 == 0  # bytes, from KiB
    return record["duration"], record["cpu_user"], record["cpu_system"], record["max_rss"] >> 10


def ask_costly(server: ServerProcess) -> tuple[socket.socket, int, int]:
    """A connection whose child has burnt BURN s and holds MIB MiB: (sock, local port, pid)."""
    sock = connect(server.tcp_address, timeout=30)
    sock.sendall(REQUEST)
    return sock, sock.getsockname()[1], read_pid_greeting(sock)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_access_log_and_metrics_show_cpu_and_rss_of_a_costly_handler(
    start_server: StartServer, log_format: str, mode: dict[str, Any]
) -> None:
    server = start_server(
        config(COSTLY, access_log=True, metrics="127.0.0.1:0", log_format=log_format, **mode)
    )
    base = metrics_url(server)
    parent_rss_kib = psutil.Process(server.pid).memory_info().rss >> 10
    sock, port, pid = ask_costly(server)
    with sock:
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b""
    if log_format == "text":
        duration, user, system, max_rss = cost_line(server, port, pid)
    else:
        duration, user, system, max_rss = cost_record(server, pid)
    assert BURN <= user + system < BURN + CPU_SLACK
    assert duration >= BURN  # the handler's spin alone takes that long, in wall time too
    assert MIB << 10 <= max_rss < (MIB << 10) + parent_rss_kib + RSS_SLACK

    # The parent's histograms, from wait4 at the reap (a little later than the line).
    count = ("forkserver_connection_cpu_seconds_count", ())
    wait_until(lambda: scrape(base).get(count) == 1, what="the child reaped")
    m = scrape(base)

    def bucket(name: str, le: str) -> float:
        return m[(f"forkserver_connection_{name}_bucket", (("le", le),))]

    cpu = m[("forkserver_connection_cpu_seconds_sum", ())]
    assert user + system <= cpu < user + system + 0.1
    assert (bucket("cpu_seconds", "0.25"), bucket("cpu_seconds", "1.0")) == (0, 1)
    assert bucket("cpu_seconds", "+Inf") == 1
    rss = m[("forkserver_connection_max_rss_bytes_sum", ())]
    assert max_rss << 10 <= rss < (max_rss << 10) + (8 << 20)
    assert m[("forkserver_connection_max_rss_bytes_count", ())] == 1
    assert bucket("max_rss_bytes", repr(float(MIB << 20))) == 0  # above 64 MiB
    assert bucket("max_rss_bytes", repr(float(1 << 30))) == 1
    assert m[("forkserver_connection_duration_seconds_count", ())] == 1
    assert m[("forkserver_connection_duration_seconds_sum", ())] >= duration
    assert bucket("duration_seconds", "0.25") == 0
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_status_shows_a_running_childs_cpu_and_rss(start_server: StartServer) -> None:
    server = start_server(config(COSTLY, metrics="127.0.0.1:0"))
    base = metrics_url(server)
    sock, port, pid = ask_costly(server)
    with sock:
        status = subprocess.run(
            [sys.executable, "-m", "forkserver", "status", "--url", base],
            capture_output=True, text=True, timeout=30, check=False, cwd=ROOT,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        row = next(line for line in status.stdout.splitlines() if line.startswith(f"{pid} "))
        # PID PEER AGE STATE RSS USS CPU
        m = re.fullmatch(
            rf"{pid}\s+127\.0\.0\.1:{port}\s+\S+\s+busy\s+([\d.]+) MiB\s+\S+ \S+\s+([\d.]+)s", row
        )
        assert m is not None, status.stdout
        assert float(m[1]) >= MIB
        assert BURN <= float(m[2]) < BURN + CPU_SLACK
    assert server.stop() == 0


# -- deaths by signal, in words --------------------------------------------------------

KILLED = [
    (signal.SIGSEGV, r"a segmentation fault \(a crash in native code\)"),
    (signal.SIGSYS, r"the seccomp filter \(a forbidden system call\)"),
    (signal.SIGKILL, r"not sent by forkserver: another process or the OOM killer"),
    (signal.SIGTERM, r"not sent by forkserver: another process"),
]
CORE = r"(?: \(core dumped\))?"
USAGE = r"; cpu \d+\.\d{3}s user \d+\.\d{3}s sys, max rss \d+ KiB$"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("signum", "reason"), KILLED, ids=[s.name for s, _ in KILLED])
def test_a_child_killed_by_a_signal_is_logged_with_the_reason(
    start_server: StartServer, signum: signal.Signals, reason: str
) -> None:
    server = start_server(
        config("tests.helpers.services:greet_then_sleep", access_log=True, limit_core_mb=0)
    )
    with connect(server.tcp_address) as sock:
        port, pid = sock.getsockname()[1], read_pid_greeting(sock)
        os.kill(pid, signum)
        assert recv_to_eof(sock) == b""
    peer = rf"127\.0\.0\.1:{port}"
    server.wait_for_log(
        rf"child {pid} for {peer} killed by {signum.name}{CORE} after \S+s: {reason}$"
    )
    server.wait_for_log(
        rf"forkserver\.access: {peer} pid {pid} \S+s killed by {signum.name}{CORE}: "
        rf"{reason}{USAGE}"
    )
    assert server.stop() == 0


@pytest.mark.timeout(90)
def test_a_child_over_limit_cpu_is_logged_as_such(start_server: StartServer) -> None:
    server = start_server(
        config(
            "tests.helpers.services:burn_cpu",
            limit_cpu=1,
            limit_core_mb=0,
            access_log=True,
            log_format="json",
        )
    )
    with connect(server.tcp_address, timeout=10) as sock:
        pid = read_pid_greeting(sock)
        # One CPU second; on a busy machine that can take many wall seconds.
        line = server.wait_for_log(rf'"logger": "forkserver\.access".*"pid": {pid}\b', 80)
        assert recv_to_eof(sock) == b""
    record: dict[str, Any] = json.loads(line)
    assert record["status"] == "killed by SIGXCPU", record["message"]
    assert record["reason"] == "the CPU time limit, limit_cpu = 1s"
    # The kernel checks the limit against tick-sampled CPU time; wait4's is precise.
    assert record["cpu_user"] + record["cpu_system"] > 0.5
    assert "bytes_in" not in record  # only the child knows them
    warning = json.loads(server.wait_for_log(rf"child {pid} for .* killed by "))
    assert warning["message"].endswith(": the CPU time limit, limit_cpu = 1s"), warning
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_a_child_past_max_lifetime_is_logged_as_such(start_server: StartServer) -> None:
    server = start_server(
        config("tests.helpers.services:greet_then_sleep", access_log=True, max_lifetime=0.5)
    )
    with connect(server.tcp_address) as sock:
        port, pid = sock.getsockname()[1], read_pid_greeting(sock)
        assert recv_to_eof(sock) == b""
    peer = rf"127\.0\.0\.1:{port}"
    server.wait_for_log(
        rf"child {pid} for {peer} killed by SIGTERM after \S+s: max_lifetime = 0\.5s ran out$"
    )
    server.wait_for_log(rf"pid {pid} \S+s killed by SIGTERM: max_lifetime = 0\.5s ran out{USAGE}")
    assert server.stop() == 0


# -- the words, from real wait statuses -------------------------------------------------


def killed_status(signum: int) -> int:
    """The raw wait status of a real process killed by *signum*."""
    ready, say_ready = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only waits to be killed
        faulthandler.disable()  # pytest's: it would print a traceback for SIGSEGV
        if signum != signal.SIGKILL:
            signal.signal(signum, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.write(say_ready, b"1")
        while True:
            signal.pause()
    os.close(say_ready)
    try:
        assert os.read(ready, 1) == b"1"
    finally:
        os.close(ready)
    os.kill(pid, signum)
    return os.waitpid(pid, 0)[1]


WORDS = [
    (signal.SIGXCPU, "", 2, "the CPU time limit, limit_cpu = 2s"),
    (signal.SIGSYS, "", -1, "the seccomp filter (a forbidden system call)"),
    (signal.SIGABRT, "", -1, "abort() (a failed check in native code)"),
    (signal.SIGTERM, "the server's stop", -1, "the server's stop"),
    (signal.SIGKILL, "max_lifetime = 3s ran out", -1, "max_lifetime = 3s ran out"),
    # What forkserver sent is not the cause of another signal.
    (signal.SIGSEGV, "the server's stop", -1, "a segmentation fault (a crash in native code)"),
    (signal.SIGUSR1, "", -1, ""),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("signum", "sent", "limit_cpu", "words"),
    WORDS,
    ids=[s.name + ("-sent" if sent else "") for s, sent, _, _ in WORDS],
)
def test_deaths_in_words(signum: int, sent: str, limit_cpu: int, words: str) -> None:
    assert Deaths(limit_cpu).why(killed_status(signum), sent) == words


@pytest.mark.timeout(30)
def test_an_unexplained_sigkill_is_the_oom_killers_when_its_count_rose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The one thing not made real: an OOM kill of the machine's.
    kills = iter([5, 5, 6])
    monkeypatch.setattr(accounting, "_oom_kills", lambda: next(kills))
    deaths = Deaths()
    status = killed_status(signal.SIGKILL)
    assert deaths.why(status) == "not sent by forkserver: another process or the OOM killer"
    assert deaths.why(status) == "the kernel's OOM killer, most likely (its oom_kill count rose)"
    assert deaths.why(0) == ""  # it exited
