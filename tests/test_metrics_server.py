"""The metrics endpoint of a running server: scraped, parsed, and read by `status`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    ROOT,
    StartServer,
    config,
    connect,
    echo_roundtrip,
    recv_to_eof,
    recv_until,
    wait_until,
)


def _metrics_url(server) -> str:
    line = server.wait_for_log(r"metrics on http://\S+/metrics")
    return re.search(r"(http://\S+)/metrics", line).group(1)  # type: ignore[union-attr]


def _scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):  # the reference parser
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.mark.timeout(60)
@pytest.mark.parametrize("spares", [0, 2])
def test_scrape_counts_connections_refusals_and_children(
    start_server: StartServer, spares: int
) -> None:
    server = start_server(
        config("tests.services:PidEcho", metrics="127.0.0.1:0", per_source_limit=1,
               spare_children=spares)
    )  # fmt: skip
    base = _metrics_url(server)
    ok = ("forkserver_children_exited_total", (("how", "ok"),))
    for i in range(3):
        with connect(server.tcp_address) as sock:
            recv_until(sock, b"\n")
        # The source's count drops when its child is reaped: wait for that.
        want = i + 1
        wait_until(lambda: _scrape(base)[ok] == want, what="the child reaped")  # noqa: B023
    held = connect(server.tcp_address)
    recv_until(held, b"\n")
    with connect(server.tcp_address) as refused:  # per_source_limit: one at a time
        assert recv_to_eof(refused) == b""
    # After a handoff half the spares are replaced at once, the rest soon after.
    idle = ("forkserver_children", (("state", "idle"),))
    wait_until(lambda: _scrape(base)[idle] == spares, what="the spares replaced")
    m = _scrape(base)
    assert m[("forkserver_connections_accepted_total", ())] == 5
    assert m[("forkserver_connections_refused_total", (("reason", "per_source_limit"),))] == 1
    assert m[("forkserver_children", (("state", "busy"),))] == 1
    assert m[("forkserver_children", (("state", "idle"),))] == spares
    assert m[("forkserver_children_uss_bytes", ())] > 0
    assert m[("forkserver_parent_rss_bytes", ())] > 0
    status = subprocess.run(
        [sys.executable, "-m", "forkserver", "status", "--url", base],
        capture_output=True, text=True, timeout=30, check=False, cwd=ROOT,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    local = held.getsockname()
    assert f"{local[0]}:{local[1]}" in status.stdout
    assert "busy" in status.stdout
    held.close()
    # Scrapes are children too, but not connections: they never count as such.
    assert _scrape(base)[("forkserver_connections_accepted_total", ())] == 5
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_metrics_listener_survives_a_reload(start_server: StartServer) -> None:
    server = start_server(config(metrics="127.0.0.1:0"))
    base = _metrics_url(server)
    assert echo_roundtrip(server.tcp_address, b"x") == b"x"
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    server.wait_for_log("forkserver ready", 30, start=mark)
    assert _scrape(base)[("forkserver_max_children", ())] == 1024  # same port, still served
    assert server.stop() == 0
