"""Log output: JSON lines, the access log, a log file reopened on SIGUSR1."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import (
    StartServer,
    config,
    connect,
    echo_roundtrip,
    recv_to_eof,
    recv_until,
    wait_until,
)

# forkserver's own line writer (the echo module does not import logging), and
# stdlib logging (tests.services imports it): both must give the same output.
HANDLERS = ["forkserver.examples.echo:EchoHandler", "tests.services:echo_function"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("handler", HANDLERS)
def test_json_lines_with_access_log(start_server: StartServer, handler: str) -> None:
    server = start_server(config(handler, log_format="json", access_log=True, deny=["10.0.0.0/8"]))
    assert echo_roundtrip(server.tcp_address, b"x" * 100) == b"x" * 100
    line = server.wait_for_log(r'"logger": "forkserver.access"')
    record = json.loads(line)
    assert record["level"] == "INFO" and record["status"] == "exit status 0"
    assert (record["bytes_in"], record["bytes_out"]) == (100, 100)
    assert record["peer"].startswith("127.0.0.1:") and record["duration"] >= 0
    assert record["pid"] != server.pid  # written by the child that served it
    assert server.stop() == 0
    for text in server.lines:  # every line the server wrote is one JSON object
        parsed = json.loads(text)
        assert {"time", "level", "logger", "pid", "message"} <= parsed.keys()


@pytest.mark.timeout(60)
def test_access_log_records_refusals_and_killed_children(start_server: StartServer) -> None:
    server = start_server(
        config("tests.services:PidEcho", access_log=True, per_source_limit=1, spare_children=1)
    )
    held = connect(server.tcp_address)
    pid = int(recv_until(held, b"\n"))
    with connect(server.tcp_address) as refused:
        assert recv_to_eof(refused) == b""
    server.wait_for_log(r"forkserver\.access: 127\.0\.0\.1:\d+ refused per_source_limit$")
    psutil.Process(pid).kill()
    local = held.getsockname()[1]
    server.wait_for_log(
        rf"forkserver\.access: 127\.0\.0\.1:{local} pid {pid} \S+s killed by SIGKILL"
    )
    held.close()
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_log_file_is_reopened_on_sigusr1(start_server: StartServer, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    # The fixture reads readiness from stderr, which now goes to the file.
    server = start_server(config(log_file=str(log_path)), ready=False)
    wait_until(lambda: log_path.exists() and "forkserver ready" in log_path.read_text(), 20)
    port = int(log_path.read_text().split("listening on 127.0.0.1:")[1].split()[0])
    assert echo_roundtrip(("127.0.0.1", port), b"before") == b"before"
    log_path.rename(tmp_path / "server.log.1")  # what logrotate does
    server.signal(signal.SIGUSR1)
    wait_until(lambda: log_path.exists() and "reopened" in log_path.read_text(), 20)
    assert server.stop() == 0
    assert "stopped: all children have exited" in log_path.read_text()
    assert "stopped" not in (tmp_path / "server.log.1").read_text()
    assert server.log == ""  # nothing went to the old stderr once the file was open
