"""SIGHUP reload and SIGUSR2 upgrade, under continuous load."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from tests.conftest import StartServer, config, connect, recv_until, wait_until, write_module

HANDLER = """
def handler(conn, addr):
    conn.sendall(b"{version}\\n")
    while data := conn.recv(100):
        conn.sendall(b"{version}:" + data)
"""


def _write_handler(directory: Path, version: str) -> None:
    write_module(directory / "versioned.py", HANDLER.format(version=version))


def _greeting(address: tuple[str, int]) -> bytes:
    with connect(address) as sock:
        return recv_until(sock, b"\n")


@contextmanager
def _load(address: tuple[str, int]) -> Iterator[dict[str, list[object]]]:
    """Clients connecting in a loop until the block ends; failures recorded."""
    result: dict[str, list[object]] = {"ok": [], "failed": []}
    stop = threading.Event()

    def run() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            try:
                with connect(address, timeout=10) as sock:
                    line = recv_until(sock, b"\n")
                    result["ok"].append(line)
            except (OSError, AssertionError) as exc:
                result["failed"].append(exc)

    workers = [threading.Thread(target=run) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        yield result
    finally:
        stop.set()
        for w in workers:
            w.join(30)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("spares", [0, 2])
def test_sighup_reload_switches_code_keeps_in_flight_and_loses_nothing(
    start_server: StartServer, tmp_path: Path, spares: int
) -> None:
    _write_handler(tmp_path, "v1")
    server = start_server(config("versioned:handler", spare_children=spares))
    address = server.tcp_address
    held = connect(address)
    assert recv_until(held, b"\n") == b"v1\n"
    _write_handler(tmp_path, "v2")
    with _load(address) as load:
        wait_until(lambda: len(load["ok"]) > 20, 20, "load before the reload")
        mark = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for_log(r"reloading: the new config is valid", 30, start=mark)
        server.wait_for_log("forkserver ready", 30, start=mark)
        wait_until(lambda: b"v2\n" in load["ok"][-5:], 20, "new code serving the load")
    assert load["failed"] == [], load["failed"][:3]
    assert server.proc.poll() is None and _greeting(address) == b"v2\n"  # same pid, same port
    # The connection in flight was not touched: still the old code.
    held.sendall(b"x")
    assert recv_until(held, b"x") == b"v1:x"
    held.close()
    assert "exit status" not in server.log and "killed by" not in server.log
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_invalid_config_on_reload_is_refused_and_the_old_one_serves(
    start_server: StartServer, tmp_path: Path
) -> None:
    _write_handler(tmp_path, "v1")
    server = start_server(config("versioned:handler"))
    path = next(tmp_path.glob("server*.toml"))
    path.write_text(path.read_text() + "max_chilren = 3\n")
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    line = server.wait_for_log("reload refused", 30, start=mark)
    assert 'unknown key server.max_chilren (did you mean "max_children"?)' in line
    assert _greeting(server.tcp_address) == b"v1\n"
    # A handler that no longer imports is refused the same way.
    path.write_text(config("versioned:handler"))
    write_module(tmp_path / "versioned.py", "raise RuntimeError('broken on purpose')\n")
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    line = server.wait_for_log("reload refused", 30, start=mark)
    assert "RuntimeError: broken on purpose" in line
    assert _greeting(server.tcp_address) == b"v1\n"
    assert server.stop() == 0


@pytest.mark.timeout(90)
def test_reload_keeps_unchanged_listeners_and_applies_new_ones(
    start_server: StartServer, tmp_path: Path
) -> None:
    _write_handler(tmp_path, "v1")
    old_sock, new_sock = tmp_path / "old.sock", tmp_path / "new.sock"
    server = start_server(config("versioned:handler", unix=str(old_sock)))
    tcp = server.tcp_address
    path = next(tmp_path.glob("server*.toml"))
    path.write_text(config("versioned:handler", unix=str(new_sock)))
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    server.wait_for_log("forkserver ready", 30, start=mark)
    assert _greeting(tcp) == b"v1\n"  # port 0 in the config: the same listener, kept
    assert not old_sock.exists()
    with connect(str(new_sock)) as sock:
        assert recv_until(sock, b"\n") == b"v1\n"
    assert server.stop() == 0
    assert not new_sock.exists()


@pytest.mark.timeout(90)
def test_sigusr2_upgrade_under_load_loses_no_connection(
    start_server: StartServer, tmp_path: Path
) -> None:
    _write_handler(tmp_path, "v1")
    pid_path = tmp_path / "server.pid"
    server = start_server(config("versioned:handler", pidfile=str(pid_path)))
    address = server.tcp_address
    _write_handler(tmp_path, "v2")
    with _load(address) as load:
        wait_until(lambda: len(load["ok"]) > 20, 20, "load before the upgrade")
        server.signal(signal.SIGUSR2)
        line = server.wait_for_log(r"new parent \d+ is ready: handing over", 30)
        new_pid = int(line.split("new parent ")[1].split()[0])
        # The old parent drains and exits cleanly; the new one serves the load.
        assert server.wait(30) == 0
        count = len(load["ok"])
        wait_until(lambda: len(load["ok"]) > count + 20, 20, "load after the upgrade")
    assert load["failed"] == [], load["failed"][:3]
    assert load["ok"][-1] == b"v2\n"
    assert psutil.pid_exists(new_pid)
    assert pid_path.read_text() == f"{new_pid}\n"
    os.kill(new_pid, signal.SIGTERM)
    wait_until(lambda: not psutil.pid_exists(new_pid), 30, "the new parent to stop")
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=2).close()


@pytest.mark.timeout(60)
def test_stop_during_a_reload_check_is_graceful(start_server: StartServer, tmp_path: Path) -> None:
    _write_handler(tmp_path, "v1")
    server = start_server(config("versioned:handler", graceful_timeout=20))
    held = connect(server.tcp_address)
    assert recv_until(held, b"\n") == b"v1\n"
    server.signal(signal.SIGHUP)
    server.signal(signal.SIGTERM)  # while the config check runs
    server.wait_for_log("stopping")
    held.sendall(b"x")  # the connection in flight still finishes
    assert recv_until(held, b"x") == b"v1:x"
    held.close()
    assert server.wait(30) == 0
    assert "Traceback" not in server.log


@pytest.mark.timeout(60)
def test_stop_during_an_upgrade_stops_the_new_parent_too(
    start_server: StartServer, tmp_path: Path
) -> None:
    _write_handler(tmp_path, "v1")
    server = start_server(config("versioned:handler"))
    server.signal(signal.SIGUSR2)
    line = server.wait_for_log(r"started a new parent, pid \d+")
    new_pid = int(line.split("pid ")[-1].split(";")[0])
    server.signal(signal.SIGTERM)  # before the new parent is ready
    assert server.wait(30) == 0
    wait_until(lambda: not psutil.pid_exists(new_pid) or
               psutil.Process(new_pid).status() == psutil.STATUS_ZOMBIE,
               20, "the new parent to stop as well")  # fmt: skip


@pytest.mark.timeout(60)
def test_failed_upgrade_leaves_the_old_parent_and_its_socket_file(
    start_server: StartServer, tmp_path: Path
) -> None:
    _write_handler(tmp_path, "v1")
    path = tmp_path / "s.sock"
    server = start_server(config("versioned:handler", unix=str(path)))
    write_module(tmp_path / "versioned.py", "raise RuntimeError('broken upgrade')\n")
    server.signal(signal.SIGUSR2)
    server.wait_for_log("upgrade failed", 30)
    assert path.exists(), "the failed new parent removed the old one's socket file"
    with connect(str(path)) as sock:
        assert recv_until(sock, b"\n") == b"v1\n"
    assert server.stop() == 0
