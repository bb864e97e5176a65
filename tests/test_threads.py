"""Serving from a multi-threaded process (forkserver/parent/threads.py).

``serve_forever()`` in a thread, in a real program (tests/helpers/
threaded_server.py) started in its own session, while another of its
threads holds a logging handler's lock or sits inside an import: each child
is forked with that lock held, and must still log, import, serve and exit 0
(the stdlib's at-fork handlers reset those locks in the child).  Logging's
module lock is different: logging's before-fork hook takes it, so a fork
waits for a thread that holds it, and serves once it is let go.  The program
runs with every warning shown (``-W always``): from Python 3.12 each fork
would warn; forkserver says it once, at start, instead.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from typing import Any

import pytest

from forkserver.testing.config import environment
from forkserver.testing.pytest_plugin import ServerFactory, ServerProcess
from tests.helpers.clients import connect, recv_until, send_and_read
from tests.helpers.processes import children_gone
from tests.helpers.servers import ABNORMAL_EXIT, MODES, ROOT

HAZARD = re.compile(r"WARNING forkserver\.parent\.threads: \d+ threads in this process: ")


def start_threaded(forkserver: ServerFactory, hold: str, settings: dict[str, Any]) -> ServerProcess:
    """The program serving from a thread, once its other thread holds *hold*."""
    argv = [sys.executable, "-W", "always", "-m", "tests.helpers.threaded_server", hold]
    server = forkserver.command(
        [*argv, json.dumps(settings)], env=environment(ROOT, {}), cwd=ROOT, stop_timeout=30
    )
    server.wait_for_log(rf"^holding {hold}$")
    return server


def served(server: ServerProcess, payload: bytes) -> tuple[int, bool, bytes]:
    """One connection: the child's pid, whether it saw an import half done,
    and what it echoed."""
    with connect(server.tcp_address) as sock:
        pid, fresh, half_imported = recv_until(sock, b"\n").split()
        assert fresh == b"fresh", "the child could not import a module of its own"
        return int(pid), half_imported == b"True", send_and_read(sock, payload)


def stop_clean(server: ServerProcess, settings: dict[str, Any] | None = None) -> None:
    """Every child exited 0 and was reaped (on its own, but idle spares); the
    program exits 0.  The fixture checks at teardown that nothing is left."""
    if not (settings or {}).get("spare_children"):
        children_gone(server)
    server.signal(signal.SIGUSR1)  # the other thread lets go
    assert server.stop() == 0, server.log
    assert not ABNORMAL_EXIT.search(server.log), server.log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("settings", MODES)
def test_child_forked_while_another_thread_holds_a_logging_lock_serves_and_exits(
    forkserver: ServerFactory, settings: dict[str, Any]
) -> None:
    server = start_threaded(forkserver, "logging-handler", settings)
    # Three in a row: in pool mode the third at least goes to a spare forked
    # while the lock was held (the two first spares were forked before).
    pids = []
    for n in range(3):
        payload = f"connection {n}\n".encode() * 100
        pid, _, echoed = served(server, payload)
        assert echoed == payload
        server.wait_for_log(rf"threaded_server\.child: child {pid} serving$")
        pids.append(pid)
    assert len(set(pids)) == 3
    stop_clean(server, settings)


@pytest.mark.timeout(60)
def test_fork_waits_for_a_thread_holding_the_logging_module_lock_then_serves(
    forkserver: ServerFactory,
) -> None:
    server = start_threaded(forkserver, "logging-module", {})
    with connect(server.tcp_address) as sock:
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # accepted, but fork() waits for the lock
            sock.recv(1)
        sock.settimeout(10)
        server.signal(signal.SIGUSR1)  # let go: the fork goes ahead
        pid = int(recv_until(sock, b"\n").split()[0])
        assert send_and_read(sock, b"late\n") == b"late\n"
    server.wait_for_log(rf"threaded_server\.child: child {pid} serving$")
    stop_clean(server)


@pytest.mark.timeout(60)
def test_child_forked_while_another_thread_is_inside_an_import_serves_and_exits(
    forkserver: ServerFactory,
) -> None:
    server = start_threaded(forkserver, "import", {})
    pid, half_imported, echoed = served(server, b"during an import\n")
    assert half_imported, "the child was not forked during the other thread's import"
    assert echoed == b"during an import\n"
    server.wait_for_log(rf"threaded_server\.child: child {pid} serving$")
    stop_clean(server)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("settings", MODES)
def test_the_hazard_is_logged_once_and_fork_warns_no_more(
    forkserver: ServerFactory, settings: dict[str, Any]
) -> None:
    server = start_threaded(forkserver, "none", settings)
    for n in range(5):
        assert served(server, b"%d\n" % n)[2] == b"%d\n" % n
    stop_clean(server, settings)
    hazard = [line for line in server.lines if HAZARD.search(line)]
    assert len(hazard) == 1, server.log
    if sys.version_info >= (3, 12):
        assert hazard[0].endswith("is off for forkserver's forks")
    assert "is multi-threaded, use of fork()" not in server.log  # Python 3.12+'s warning
    # The line comes before serving starts: before the first listener is named.
    first_listener = next(i for i, line in enumerate(server.lines) if "listening on" in line)
    assert server.lines.index(hazard[0]) < first_listener
