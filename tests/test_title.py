"""Process titles (forkserver/title.py): what ps shows, read from /proc/PID/cmdline."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

from forkserver.testing.process import ServerProcess
from tests.helpers.clients import recv_until
from tests.helpers.servers import ROOT, StartServer, config, wait_until

needs_title = pytest.mark.skipif(
    importlib.util.find_spec("setproctitle") is None,
    reason="the [title] extra (setproctitle) is not installed",
)


def cmdline(pid: int) -> str:
    """What ps shows: the NUL-separated arguments, as one line."""
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return raw.replace(b"\0", b" ").decode().strip()


def titles_of_children(server: ServerProcess) -> list[str]:
    return sorted(cmdline(child.pid) for child in server.children())


@needs_title
@pytest.mark.timeout(60)
def test_parent_shows_config_and_listeners_child_its_peer_spare_that_it_is_one(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "titled.toml"
    path.write_text(config(spare_children=1))
    server = start_server(None, "--config", str(path), env={"TITLE_TEST_MARK": "kept"})
    host, port = server.tcp_address
    assert cmdline(server.pid) == f"forkserver: master [{path}] {host}:{port}"
    # The title did not take the environment's place: tools still read it.
    assert b"\0TITLE_TEST_MARK=kept\0" in Path(f"/proc/{server.pid}/environ").read_bytes()
    wait_until(lambda: titles_of_children(server) == ["forkserver: spare"], 10, "a spare")
    with server.connect() as client:
        client.sendall(b"ping\n")
        assert recv_until(client, b"\n") == b"ping\n"  # served: its child has its title
        peer = "{}:{}".format(*client.getsockname()[:2])
        wait_until(lambda: len(server.children()) == 2, 10, "a new spare")
        titles = titles_of_children(server)
    assert titles == [f"forkserver: conn {peer}", "forkserver: spare"]
    assert server.stop() == 0


@needs_title
@pytest.mark.timeout(60)
def test_a_child_forked_on_accept_shows_its_peer(start_server: StartServer) -> None:
    handler = "forkserver.examples.echo:EchoHandler"  # no config file: the handler names it
    server = start_server(None, "--handler", handler, "--host", "127.0.0.1", "--port", "0")
    host, port = server.tcp_address
    assert cmdline(server.pid) == f"forkserver: master [{handler}] {host}:{port}"
    with server.connect() as client:
        client.sendall(b"ping\n")
        assert recv_until(client, b"\n") == b"ping\n"
        peer = "{}:{}".format(*client.getsockname()[:2])
        assert titles_of_children(server) == [f"forkserver: conn {peer}"]
    assert server.stop() == 0


@needs_title
@pytest.mark.timeout(60)
def test_proc_title_false_leaves_every_command_line_alone(start_server: StartServer) -> None:
    server = start_server(config(proc_title=False, spare_children=1))
    wait_until(lambda: len(server.children()) == 1, 10, "a spare")
    with server.connect() as client:
        client.sendall(b"ping\n")
        assert recv_until(client, b"\n") == b"ping\n"
        wait_until(lambda: len(server.children()) == 2, 10, "a new spare")
        commands = [cmdline(pid) for pid in (server.pid, *(c.pid for c in server.children()))]
    assert len(commands) == 3
    assert not [c for c in commands if c.startswith("forkserver:")], commands
    assert server.stop() == 0


@pytest.mark.timeout(60)
def test_without_setproctitle_nothing_changes_and_nothing_is_said(tmp_path: Path) -> None:
    """-S keeps site-packages (setproctitle with it) off the path: the parent
    and its children keep the interpreter's command line, and serve."""
    boot = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from forkserver.cli import main; main()"
    argv = [sys.executable, "-S", "-c", boot, "--handler", "forkserver.examples.echo:EchoHandler"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    server = ServerProcess([*argv, "--port", "0"], env=env, cwd=tmp_path, name="forkserver")
    try:
        server.wait_ready(30)
        assert "-c import sys; " in cmdline(server.pid)  # the lean parent, as exec()ed
        with server.connect() as client:
            client.sendall(b"ping\n")
            assert recv_until(client, b"\n") == b"ping\n"
            (child,) = server.children()  # serving this connection until it closes
            assert cmdline(child.pid) == cmdline(server.pid)
        assert server.stop(30) == 0
        assert not re.search(r"(?i)setproctitle|title", server.log), server.log
    finally:
        server.kill_group()
