"""Log output: JSON lines, the access log, a log file reopened on SIGUSR1."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers.clients import connect, echo_roundtrip, recv_to_eof, recv_until
from tests.helpers.proxy import expected, proxied_at, v1, v2
from tests.helpers.servers import ServerProcess, StartServer, config, wait_until
from tests.helpers.transports import (
    DATAGRAM_ECHO,
    PROXY_REPORT,
    listen,
    server_table,
    stop_clean,
    stop_cleanly,
    tcp_at,
    udp_at,
    udp_client,
    unserved,
)

# What an access line says a connection cost, after how it ended.
COSTS = r"; cpu \d+\.\d{3}s user \d+\.\d{3}s sys, max rss \d+ KiB"

# forkserver's own line writer (the echo module does not import logging), and
# stdlib logging (tests.helpers.services imports it): both must give the same output.
HANDLERS = ["forkserver.examples.echo:EchoHandler", "tests.helpers.services:echo_function"]


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
        config(
            "tests.helpers.services:PidEcho", access_log=True, per_source_limit=1, spare_children=1
        )
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


def access_lines(server: ServerProcess) -> list[str]:
    marker = "forkserver.access: "
    return [line.split(marker, 1)[1] for line in server.lines if marker in line]


@pytest.mark.timeout(30)
def test_access_log_has_a_line_for_a_proxy_header_refusal(start_server: StartServer) -> None:
    server = start_server(
        server_table(access_log=True, deny=["203.0.113.0/24"])
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True)
    )
    address = tcp_at(server, 0)
    with connect(address) as sock:  # refused by deny: "PEER refused deny"
        assert unserved(sock, v1("203.0.113.1", 1)) == b""
    server.wait_for_log(r"access: 203\.0\.113\.1:1 refused deny$")
    with connect(address) as sock:
        port = sock.getsockname()[1]
        assert unserved(sock, b"no header at all\r\n") == b""
    server.wait_for_log(rf"PROXY header from 127\.0\.0\.1:{port}: ")
    server.wait_for_log(rf"access: 127\.0\.0\.1:{port} refused proxy_header$", timeout=2)
    stop_cleanly(server)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("settings", [{}, {"spare_children": 2}], ids=["fork", "pool"])
def test_access_log_names_the_real_client_for_udp_and_proxy(
    start_server: StartServer, settings: dict[str, Any]
) -> None:
    server = start_server(
        server_table(access_log=True, **settings)
        + listen(udp="127.0.0.1:0", handler=DATAGRAM_ECHO)
        + listen(tcp="127.0.0.1:0", handler=PROXY_REPORT, proxy_protocol=True)
    )
    with udp_client() as client:
        port = client.getsockname()[1]
        client.sendto(b"12345", udp_at(server, 0))
        assert client.recv(64) == b"12345"
    assert proxied_at(tcp_at(server, 1), v2("2001:db8::5", 555) + b"abc") == expected(
        "2001:db8::5", 555, b"abc"
    )
    stop_clean(server, settings)
    lines = access_lines(server)
    assert len(lines) == 2, lines
    udp_line = next(line for line in lines if line.startswith("127.0.0.1:"))
    assert re.fullmatch(
        rf"127\.0\.0\.1:{port} pid \d+ \d+\.\d+s in 5 out - exit status 0{COSTS}", udp_line
    )
    proxy_line = next(line for line in lines if line.startswith("[2001:db8::5]:555 "))
    # in: the header and the payload, read from the proxy's connection.
    assert re.fullmatch(
        rf"\[2001:db8::5\]:555 pid \d+ \d+\.\d+s in \d+ out \d+ exit status 0{COSTS}", proxy_line
    )
