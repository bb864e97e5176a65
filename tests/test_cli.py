"""The command line end to end: ``python -m forkserver`` and the ``forkserver`` script."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

import forkserver
from forkserver.testing.pytest_plugin import ServerFactory
from tests.helpers.clients import echo_roundtrip, occupy_port
from tests.helpers.servers import (
    ROOT,
    ServerProcess,
    StartServer,
    config,
    run_forkserver,
)
from tests.helpers.services import DEBUG_RECORD, WARNING_RECORD

ECHO = "forkserver.examples.echo:EchoHandler"
CONSOLE_SCRIPT = Path(sys.prefix) / "bin" / "forkserver"
PAYLOAD = b"forkserver cli \x00\xff\n" * 1000


def _user_env() -> dict[str, str]:
    """The environment a user has: no PYTHONPATH pointing into the repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_version(tmp_path: Path) -> None:
    result = run_forkserver("--version", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "forkserver 0.1.0\n", "")
    assert forkserver.__version__ == "0.1.0"


def test_console_script_version(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "--version"],
        capture_output=True,
        text=True,
        env=_user_env(),
        cwd=tmp_path,
        timeout=20,
        check=False,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "forkserver 0.1.0\n", "")


def test_installed_as_pyforkserver_with_the_forkserver_command() -> None:
    """PyPI's "forkserver" is another project: the distribution is
    pyforkserver, the package, the command and `python -m` keep the name."""
    from importlib.metadata import distribution

    dist = distribution("pyforkserver")
    assert dist.version == forkserver.__version__
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"forkserver": "forkserver.cli:main"}
    assert 'setproctitle>=1.3; extra == "title"' in (dist.requires or [])


def test_check_good_config_exits_0_and_starts_nothing(tmp_path: Path) -> None:
    path = _write(tmp_path / "good.toml", config())
    result = run_forkserver("--config", path, "--check", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr == f"forkserver: {path}: config OK\n"
    assert result.stdout == ""


def test_check_bad_handler_exits_2(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.toml", config(handler="no_such_module_xyz:App"))
    result = run_forkserver("--config", path, "--check", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("forkserver: ")
    assert "no module named 'no_such_module_xyz'" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "config OK" not in result.stderr


# conf/echo.toml by name (so it cannot silently vanish), plus every other shipped example.
SHIPPED = sorted({ROOT / "conf" / "echo.toml", *(ROOT / "conf").glob("*.toml")})


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_passes_check(path: Path, tmp_path: Path) -> None:
    result = run_forkserver("--config", str(path), "--check", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, f"forkserver: {path}: config OK\n")


def test_flags_alone_serve_without_a_config_file(start_server: StartServer) -> None:
    server = start_server(None, "--handler", ECHO, "--port", "0")
    host, port = server.tcp_address
    assert host == "127.0.0.1"  # the default host
    assert port != 0
    assert echo_roundtrip((host, port), PAYLOAD) == PAYLOAD
    assert server.stop() == 0


def test_port_0_log_line_reports_the_real_bound_port(start_server: StartServer) -> None:
    server = start_server(config())
    host, port = server.tcp_address
    assert port != 0
    assert server.listening == [f"127.0.0.1:{port}"]
    listening = [
        c.laddr
        for c in psutil.Process(server.pid).net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
    assert echo_roundtrip((host, port), b"real port") == b"real port"
    assert server.stop() == 0


def test_flags_override_the_config_file(start_server: StartServer) -> None:
    # Every value in the file would fail or show: another loopback address, a
    # port that is taken, a handler that does not exist, warnings only.
    with occupy_port() as taken:
        text = config(
            handler="no_such_module_xyz:App",
            host="127.0.0.2",
            port=taken.getsockname()[1],
            max_children=5,
            log_level="warning",
        )
        server = start_server(
            text,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--handler",
            "tests.helpers.services:DebugEcho",
            "--max-children",
            "3",
            "--log-level",
            "debug",
        )
        host, port = server.tcp_address
        assert host == "127.0.0.1"
        assert port not in (0, taken.getsockname()[1])
    assert re.search(
        r"forkserver ready: pid \d+, handler tests\.helpers\.services:DebugEcho, "
        r"max_children 3, spare_children 0$",
        server.log,
        re.M,
    )
    assert echo_roundtrip((host, port), PAYLOAD) == PAYLOAD
    server.wait_for_log(re.escape(WARNING_RECORD))
    assert DEBUG_RECORD in server.log
    assert server.stop() == 0


def _somaxconn() -> int:
    try:
        return int(Path("/proc/sys/net/core/somaxconn").read_text())
    except (OSError, ValueError):
        return 1 << 30


@pytest.mark.skipif(_somaxconn() >= 65535, reason="needs net.core.somaxconn below 65535")
def test_backlog_flag_overrides_the_config_file(start_server: StartServer) -> None:
    # The only outside sign of the backlog: the warning that the kernel caps it.
    wanted = _somaxconn() + 1
    server = start_server(config(backlog=16), "--backlog", str(wanted))
    assert (
        f"backlog {wanted} exceeds net.core.somaxconn={wanted - 1}: "
        f"the kernel silently caps it at {wanted - 1}"
    ) in server.log
    assert echo_roundtrip(server.tcp_address, b"backlog") == b"backlog"
    assert server.stop() == 0


def test_default_log_level_hides_debug_records(start_server: StartServer) -> None:
    server = start_server(config(handler="tests.helpers.services:DebugEcho"))
    assert echo_roundtrip(server.tcp_address, b"quiet") == b"quiet"
    # The child writes the DEBUG record (if enabled) before the WARNING one.
    server.wait_for_log(re.escape(WARNING_RECORD))
    assert DEBUG_RECORD not in server.log
    assert server.stop() == 0


def test_port_out_of_range_on_command_line_exits_2(tmp_path: Path) -> None:
    result = run_forkserver("--handler", ECHO, "--port", "99999", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "forkserver: command line: server.port must be an integer 0-65535, got 99999\n"
    )


def test_unknown_log_level_flag_exits_2_with_one_line(tmp_path: Path) -> None:
    result = run_forkserver("--handler", ECHO, "--port", "0", "--log-level", "loud", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        'forkserver: command line: server.log_level must be one of "debug", "info", '
        '"warning", "error", "critical", got "loud"\n'
    )


def test_bind_failure_exits_1_naming_address_and_reason(tmp_path: Path) -> None:
    with occupy_port() as taken:
        port = taken.getsockname()[1]
        path = _write(tmp_path / "taken.toml", config(port=port))
        result = run_forkserver("--config", path, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == (
        f"forkserver: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )


def test_sigterm_stops_cleanly_with_exit_0(start_server: StartServer) -> None:
    server = start_server(config())
    assert echo_roundtrip(server.tcp_address, b"before") == b"before"
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    server.wait_for_log("stopped: all children have exited")
    assert "Traceback" not in server.log


def _console_script_server(forkserver: ServerFactory, *args: str, cwd: Path) -> ServerProcess:
    """The installed ``forkserver`` script, serving, run as a user would (no PYTHONPATH)."""
    return forkserver.command([str(CONSOLE_SCRIPT), *args], env=_user_env(), cwd=cwd, stdout=False)


MYMOD = '''\
def handler(conn, addr):
    """Echo, upper-cased, so the reply shows that this module served it."""
    while data := conn.recv(65536):
        conn.sendall(data.upper())
'''


def test_handler_module_in_working_directory_is_importable_via_console_script(
    forkserver: ServerFactory, tmp_path: Path
) -> None:
    (tmp_path / "mymod.py").write_text(MYMOD)
    args = ("--handler", "mymod:handler", "--port", "0")
    srv = _console_script_server(forkserver, *args, cwd=tmp_path)
    assert "handler mymod:handler" in srv.log
    assert echo_roundtrip(srv.tcp_address, b"from cwd") == b"FROM CWD"
    assert srv.stop() == 0


# -- paths: relative to the config file, or to the working directory on the command line


def _config_elsewhere(tmp_path: Path, **settings: Any) -> tuple[Path, Path, Path]:
    """A config with *settings* in tmp_path/service, and another directory to run in:
    (the config's directory, the working directory, the config file)."""
    service, elsewhere = tmp_path / "service", tmp_path / "elsewhere"
    service.mkdir()
    elsewhere.mkdir()
    path = service / "app.toml"
    path.write_text(config(host=[], **settings))
    return service, elsewhere, path


def test_relative_paths_in_a_config_are_relative_to_its_directory(
    forkserver: ServerFactory, tmp_path: Path
) -> None:
    service, elsewhere, path = _config_elsewhere(tmp_path, unix="app.sock", pidfile="app.pid")
    server = forkserver.start("--config", str(path), handler=ECHO, cwd=elsewhere)
    assert server.listening == [f"unix:{service / 'app.sock'}"]
    assert echo_roundtrip(str(service / "app.sock"), b"beside its config") == b"beside its config"
    assert (service / "app.pid").read_text() == f"{server.pid}\n"
    assert sorted(p.name for p in elsewhere.iterdir()) == []
    assert server.stop() == 0


def test_relative_paths_on_the_command_line_are_relative_to_the_working_directory(
    forkserver: ServerFactory, tmp_path: Path
) -> None:
    service, elsewhere, path = _config_elsewhere(tmp_path, unix="app.sock")
    args = ("--config", str(path), "--unix", "cwd.sock", "--pidfile", "cwd.pid")
    server = forkserver.start(*args, handler=ECHO, cwd=elsewhere)
    assert server.listening == ["unix:cwd.sock"]
    assert echo_roundtrip(str(elsewhere / "cwd.sock"), b"from cwd") == b"from cwd"
    assert (elsewhere / "cwd.pid").read_text() == f"{server.pid}\n"
    assert not (service / "app.sock").exists()
    assert server.stop() == 0
