"""exec services: a program serves the connection on stdin/stdout (tcpserver, inetd)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.clients import connect, echo_roundtrip, recv_to_eof
from tests.helpers.servers import ROOT, StartServer, config


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spares", [0, 2])
def test_cat_echoes_exactly(start_server: StartServer, spares: int) -> None:
    server = start_server(config("exec:cat", spare_children=spares))
    payload = os.urandom(300_000)
    assert echo_roundtrip(server.tcp_address, payload) == payload
    assert server.stop() == 0
    assert "exit status" not in server.log


@pytest.mark.timeout(60)
def test_the_program_gets_the_ucspi_environment(start_server: StartServer) -> None:
    server = start_server(config(f"exec:{shutil.which('env')}"))
    with connect(server.tcp_address) as sock:
        local_port = sock.getsockname()[1]
        sock.shutdown(1)
        env = dict(
            line.split("=", 1) for line in recv_to_eof(sock).decode().splitlines() if "=" in line
        )
    assert env["PROTO"] == "TCP"
    assert (env["TCPREMOTEIP"], env["TCPREMOTEPORT"]) == ("127.0.0.1", str(local_port))
    host, port = server.tcp_address
    assert (env["TCPLOCALIP"], env["TCPLOCALPORT"]) == (host, str(port))
    assert "FORKSERVER_BOOT" not in env and "FORKSERVER_INHERIT" not in env
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_words_are_split_without_a_shell_and_the_exit_status_is_logged(
    start_server: StartServer,
) -> None:
    printf = shutil.which("printf")
    server = start_server(config(f"exec:{printf} '%s|' 'a b' '$HOME' ';false'"))
    with connect(server.tcp_address) as sock:
        assert recv_to_eof(sock) == b"a b|$HOME|;false|"  # no shell: nothing expanded
    assert server.stop() == 0
    failing = start_server(config(f"exec:{shutil.which('false')}"))
    with connect(failing.tcp_address) as sock:
        assert recv_to_eof(sock) == b""
    failing.wait_for_log(r"child \d+ for 127\.0\.0\.1:\d+ exit status 1")
    assert failing.stop() == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("exec:", '"exec:" names no program'),
        ("exec:/no/such/program", "no executable '/no/such/program'"),
        ("exec:no-such-program-xyz", "no executable 'no-such-program-xyz'"),
        ("exec:cat 'unbalanced", "No closing quotation"),
    ],
)
def test_a_bad_exec_handler_is_a_config_error(tmp_path: Path, spec: str, says: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config(spec))
    result = subprocess.run(
        [sys.executable, "-m", "forkserver", "--config", str(path)],
        capture_output=True, text=True, timeout=20, check=False, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2
    assert says in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
