"""systemd: socket activation with the real systemd-socket-activate, sd_notify, pidfile."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from forkserver import systemd
from forkserver.testing.process import ServerProcess
from tests.helpers.clients import connect, recv_to_eof
from tests.helpers.processes import group_members
from tests.helpers.servers import ROOT, config, wait_until

ACTIVATE = shutil.which("systemd-socket-activate")
needs_activate = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate not installed (Debian package systemd)"
)


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    return sock


@needs_activate
@pytest.mark.timeout(60)
@pytest.mark.parametrize("spares", [0, 2])
def test_socket_activation_serves_notifies_and_leaves_systemds_socket(
    tmp_path: Path, spares: int
) -> None:
    path, note, pid_path = tmp_path / "s.sock", tmp_path / "notify", tmp_path / "server.pid"
    notify = _notify_socket(note)
    assert ACTIVATE is not None
    argv = [ACTIVATE, "-l", str(path), "--fdname=echo", "-E", f"NOTIFY_SOCKET={note}"]
    argv += ["-E", f"PYTHONPATH={ROOT}", sys.executable, "-m", "forkserver"]
    argv += ["--handler", "forkserver.examples.echo:EchoHandler", "--pidfile", str(pid_path)]
    argv += ["--spare-children", str(spares)]
    proc = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path
    )
    try:
        wait_until(path.exists, 10, "systemd-socket-activate to listen")
        # The first connection starts the service (and waits in the backlog meanwhile).
        with connect(str(path), timeout=20) as client:
            client.sendall(b"activated\n")
            client.shutdown(socket.SHUT_WR)
            assert recv_to_eof(client) == b"activated\n"
        assert notify.recv(200) == f"READY=1\nMAINPID={proc.pid}".encode()
        assert pid_path.read_text() == f"{proc.pid}\n"
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(200) == b"STOPPING=1"
        assert proc.wait(20) == 0
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert f"using socket unix:{path} (echo) passed by systemd" in log
        assert path.exists(), "the socket file is systemd's: forkserver must not remove it"
        assert not pid_path.exists()
    finally:
        notify.close()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
    assert not group_members(proc.pid)


def test_listen_fds_ignores_sockets_meant_for_another_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ  # and children do not see them either


def test_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_pidfile_of_a_live_server_refuses_a_second_start(start_server, tmp_path: Path) -> None:
    pid_path = tmp_path / "server.pid"
    server = start_server(config(pidfile=str(pid_path)))
    assert pid_path.read_text() == f"{server.pid}\n"
    second = subprocess.run(
        [sys.executable, "-m", "forkserver", "--handler", "forkserver.examples.echo:EchoHandler",
         "--port", "0", "--pidfile", str(pid_path)],
        check=False, capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert second.returncode == 1
    assert second.stderr == f"forkserver: {pid_path}: already running as pid {server.pid}\n"
    assert server.stop() == 0
    assert not pid_path.exists()


def test_stale_pidfile_is_replaced(start_server, tmp_path: Path) -> None:
    pid_path = tmp_path / "server.pid"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    pid_path.write_text(f"{dead.pid}\n")  # a process that no longer exists
    server = start_server(config(pidfile=str(pid_path)))
    assert pid_path.read_text() == f"{server.pid}\n"
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_reload_notifies_reloading_then_ready(start_server, tmp_path: Path) -> None:
    note = tmp_path / "notify"
    notify = _notify_socket(note)
    try:
        server = start_server(config(), env={"NOTIFY_SOCKET": str(note)})
        assert notify.recv(200) == f"READY=1\nMAINPID={server.pid}".encode()
        server.signal(signal.SIGHUP)
        assert notify.recv(200) == b"RELOADING=1"
        # Re-executed in place: the same pid says it is ready again.
        assert notify.recv(200) == f"READY=1\nMAINPID={server.pid}".encode()
        assert server.stop() == 0
        assert notify.recv(200) == b"STOPPING=1"
    finally:
        notify.close()


ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (Debian package systemd)"
)
@pytest.mark.timeout(60)
def test_shipped_units_verify_and_reload_with_sighup(tmp_path: Path) -> None:
    """conf/forkserver.{socket,service} as systemd itself reads them: no
    error nor warning, with ExecStart pointed at this checkout's command."""
    assert ANALYZE is not None
    command = Path(sys.prefix) / "bin" / "forkserver"
    for name in ("forkserver.socket", "forkserver.service"):
        text = (ROOT / "conf" / name).read_text()
        text = text.replace("/opt/forkserver/.venv/bin/forkserver", str(command))
        (tmp_path / name).write_text(text.replace("/opt/forkserver", str(ROOT)))
    service = (tmp_path / "forkserver.service").read_text()
    assert "\nExecReload=/bin/kill -HUP $MAINPID\n" in service
    assert f"\nExecStart={command} --config {ROOT}/conf/echo.toml\n" in service
    result = subprocess.run(
        [ANALYZE, "verify", "forkserver.socket", "forkserver.service"],
        check=False, capture_output=True, text=True, timeout=50, cwd=tmp_path,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_activate
@pytest.mark.timeout(60)
def test_reload_under_socket_activation_keeps_serving_on_systemds_socket_alone(
    tmp_path: Path,
) -> None:
    """A reload (systemctl reload: SIGHUP) re-runs the command line: it must
    serve on the socket systemd passed, not also bind the config's address."""
    path, conf = tmp_path / "s.sock", tmp_path / "echo.toml"
    conf.write_text(config(port=0))  # an address the unit does not have
    assert ACTIVATE is not None
    argv = [ACTIVATE, "-l", str(path), "-E", f"PYTHONPATH={ROOT}", sys.executable]
    server = ServerProcess([*argv, "-m", "forkserver", "--config", str(conf)], cwd=tmp_path)
    try:
        wait_until(path.exists, 10, "systemd-socket-activate to listen")
        with connect(str(path), timeout=20) as client:  # starts the service
            client.sendall(b"before\n")
            client.shutdown(socket.SHUT_WR)
            assert recv_to_eof(client) == b"before\n"
        server.wait_for_log("forkserver ready")
        start = len(server.lines)
        server.signal(signal.SIGHUP)
        server.wait_for_log("forkserver ready", start=start)
        with connect(str(path), timeout=20) as client:
            client.sendall(b"after\n")
            client.shutdown(socket.SHUT_WR)
            assert recv_to_eof(client) == b"after\n"
        reloaded = "\n".join(server.lines[start:])
        assert re.findall(r"listening on (\S+)", reloaded) == [f"unix:{path}"], reloaded
        assert " ERROR " not in server.log, server.log
        assert server.stop(30) == 0
    finally:
        server.kill_group()
