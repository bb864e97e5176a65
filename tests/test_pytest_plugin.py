"""The pytest plugin (forkserver/testing/) as its users meet it.

Example test files run in a pytest subprocess (pytester), which finds the
plugin through its ``pytest11`` entry point, as a user's pytest does.  After
each run, no process may be left with its working directory under the
example's directory: every server, child and leaked grandchild was ended.
The teardown checks themselves are then exercised in-process against fake
servers, for what the real one cannot be made to do (leave a zombie, ignore
SIGTERM).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import sysconfig
import textwrap
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from forkserver import pytest_plugin
from forkserver.pytest_plugin import ServerProcess
from forkserver.testing import config, leaks
from forkserver.testing.process import log_messages, parse_address

pytest_plugins = ["pytester"]

RunPytest = Callable[..., pytest.RunResult]


def _processes_under(directory: Path) -> list[psutil.Process]:
    """Live processes, other than this one, working in *directory* or below."""
    found = []
    for process in psutil.process_iter(["cwd", "status"]):
        cwd = process.info["cwd"]
        if (
            process.pid != os.getpid()
            and cwd
            and process.info["status"] != psutil.STATUS_ZOMBIE
            and Path(cwd).is_relative_to(directory)
        ):
            found.append(process)
    return found


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunPytest]:
    """``run(*args)``: pytest on the example files, in a subprocess, time-bounded.

    Teardown: whatever the example's servers started is gone (every server
    runs in the example's directory, and its children inherit that)."""
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)

    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "--timeout=30", *args, timeout=50
        )

    yield run
    deadline = time.monotonic() + 5
    while (leftovers := _processes_under(pytester.path)) and time.monotonic() < deadline:
        time.sleep(0.02)
    for process in leftovers:
        process.kill()
    assert not leftovers, f"the example run left processes behind: {leftovers}"


def test_plugin_is_registered_through_its_entry_point(run: RunPytest) -> None:
    result = run("--trace-config", "--fixtures")
    result.stdout.fnmatch_lines(
        [
            "*registered third-party plugins:*",
            "*forkserver-* at *forkserver*pytest_plugin.py*",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*fixtures defined from forkserver.testing.pytest_plugin*", "forkserver*"]
    )


def test_old_module_path_reexports_without_registering_the_fixture_twice(
    pytester: pytest.Pytester, run: RunPytest
) -> None:
    """``forkserver.pytest_plugin`` still has the public names, and naming it
    as a plugin too defines no second ``forkserver`` fixture."""
    pytester.makeconftest('pytest_plugins = ["forkserver.pytest_plugin"]\n')
    pytester.makepyfile(
        test_shim="""
        import forkserver.pytest_plugin as shim
        from forkserver.testing import pytest_plugin

        def test_names():
            assert shim.ServerProcess is pytest_plugin.ServerProcess
            assert shim.ServerFactory is pytest_plugin.ServerFactory
            assert shim.forkserver is pytest_plugin.forkserver
        """
    )
    result = run("--fixtures", "-v")
    result.stdout.no_fnmatch_line("*fixtures defined from forkserver.pytest_plugin*")
    assert [line for line in result.outlines if line.startswith("forkserver ")] != []
    assert len([line for line in result.outlines if line.startswith("forkserver ")]) == 1
    assert run().ret == 0


def test_echo_example_over_tcp_unix_and_json_logs(
    pytester: pytest.Pytester, run: RunPytest
) -> None:
    pytester.makepyfile(
        test_echo="""
        import os
        import shutil
        import socket
        import tempfile
        import time

        from forkserver.examples.echo import EchoHandler

        def roundtrip(server, payload):
            with server.connect() as sock:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                return sock.makefile("rb").read()

        def test_tcp(forkserver):
            server = forkserver(
                "forkserver.examples.echo:EchoHandler", max_children=8, spare_children=2
            )
            assert server.host == "127.0.0.1" and server.port > 0
            assert server.address == (server.host, server.port)
            assert roundtrip(server, b"hello\\n" * 1000) == b"hello\\n" * 1000
            assert "spare_children 2" in server.wait_for_log(r"forkserver ready")
            assert f"pid {server.pid}" in server.log

        def test_json_logs(forkserver):
            server = forkserver(EchoHandler, log_format="json")
            assert roundtrip(server, b"logged as json") == b"logged as json"
            assert server.wait_for_log(r'"message": "forkserver ready')

        def test_unix_and_stop(forkserver):
            # A short directory: a Unix socket path has at most 107 bytes.
            directory = tempfile.mkdtemp(prefix="fsplugin")
            try:
                path = os.path.join(directory, "echo.sock")
                server = forkserver(EchoHandler, unix=path, spare_children=2)
                assert server.address == path
                deadline = time.monotonic() + 10  # no connection yet: only the spares
                while len(server.children()) != 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert len(server.children()) == 2
                assert roundtrip(server, b"over unix") == b"over unix"
                assert server.stop() == 0
                assert server.children() == []
                assert not os.path.exists(path)
            finally:
                shutil.rmtree(directory)
        """
    )
    result = run("-v")
    result.assert_outcomes(passed=3)


def test_handler_module_found_through_the_tests_import_path(
    pytester: pytest.Pytester, run: RunPytest
) -> None:
    """A module importable in the test (here via pytest's `pythonpath`) is
    importable in the server, which runs in the test's current directory and
    does not import pytest or the plugin."""
    pytester.makeini("[pytest]\npythonpath = lib\n")
    lib = pytester.mkdir("lib")
    (lib / "upper.py").write_text(
        textwrap.dedent(
            """
            import json
            import os
            import sys

            from forkserver import StreamHandler

            class Upper(StreamHandler):
                def handle(self):
                    for line in self.rfile:
                        self.wfile.write(line.upper())

            def probe(conn, addr):
                testing = sorted(m for m in sys.modules if "pytest" in m)
                conn.sendall(json.dumps({"cwd": os.getcwd(), "modules": testing}).encode())
            """
        )
    )
    pytester.makepyfile(
        test_upper="""
        import json

        import upper

        def test_upper(forkserver, tmp_path, monkeypatch):
            monkeypatch.chdir(tmp_path)  # lib/ is not next to where the server runs
            server = forkserver("upper:Upper")
            with server.connect() as sock:
                sock.sendall(b"hi\\n")
                assert sock.makefile("rb").readline() == b"HI\\n"

        def test_probe(forkserver, tmp_path, monkeypatch):
            monkeypatch.chdir(tmp_path)
            server = forkserver(upper.probe)  # the function itself: named "upper:probe"
            with server.connect() as sock:
                seen = json.loads(sock.makefile("rb").read())
            assert seen == {"cwd": str(tmp_path), "modules": []}
        """
    )
    result = run("-v")
    result.assert_outcomes(passed=2)


def test_leaked_grandchild_fails_the_test_and_is_killed(
    pytester: pytest.Pytester, run: RunPytest
) -> None:
    pytester.makepyfile(
        leaky="""
        import os
        import time

        def serve(conn, addr):
            pid = os.fork()
            if pid == 0:  # the grandchild outlives the connection: a leak
                conn.close()
                time.sleep(300)
                os._exit(0)
            conn.sendall(f"{pid}\\n".encode())
        """,
        test_leaky="""
        from pathlib import Path

        def test_leaks(forkserver):
            server = forkserver("leaky:serve")
            with server.connect() as sock:
                grandchild = int(sock.makefile("rb").readline())
            Path("grandchild.pid").write_text(str(grandchild))
        """,
    )
    result = run()
    result.assert_outcomes(passed=1, errors=1)
    grandchild = int((pytester.path / "grandchild.pid").read_text())
    titled = importlib.util.find_spec("setproctitle") is not None
    command = "forkserver: conn 127.0.0.1:[0-9]*[0-9]" if titled else "*python*"
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaks*",
            "forkserver pid * (handler leaky:serve) did not stop cleanly:",
            "- 1 process(es) it started were still running after it exited*",
            # The command line as ps shows it: a titled child's, if titles are on.
            f"    pid {grandchild} (parent *): {command}",
            "Anything it left running was killed. Last * lines of its log:",
            "*forkserver ready*",
        ]
    )
    assert not psutil.pid_exists(grandchild) or _zombie(grandchild)


def test_bad_handler_fails_with_the_servers_message(
    pytester: pytest.Pytester, run: RunPytest
) -> None:
    pytester.makepyfile(
        test_bad="""
        def test_bad_handler(forkserver):
            forkserver("no_such_module:Handler")
        """
    )
    result = run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*forkserver (handler no_such_module:Handler) exited with exit status 2 "
            "before it was ready; its log:",
            "    forkserver: *server0.toml: server.handler: no module named 'no_such_module'*",
        ]
    )
    result.stdout.no_fnmatch_line("*Traceback*")


def test_server_not_ready_in_time_fails_and_is_killed(
    pytester: pytest.Pytester, run: RunPytest
) -> None:
    pytester.makepyfile(
        slow_import="""
        import time
        time.sleep(300)  # the server never gets to "ready"
        """,
        test_slow="""
        def test_slow(forkserver):
            forkserver("slow_import:Handler", ready_timeout=1)
        """,
    )
    result = run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*forkserver (handler slow_import:Handler) was not ready within 1 s*"]
    )


def test_server_dying_during_the_test_fails_it(pytester: pytest.Pytester, run: RunPytest) -> None:
    pytester.makepyfile(
        test_dies="""
        import os
        import signal

        def test_killed(forkserver):
            server = forkserver("forkserver.examples.echo:EchoHandler")
            os.kill(server.pid, signal.SIGKILL)
            os.waitid(os.P_PID, server.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped

        def test_stopped_by_the_test(forkserver):
            server = forkserver("forkserver.examples.echo:EchoHandler")
            os.kill(server.pid, signal.SIGKILL)
            assert server.stop() == -signal.SIGKILL  # the status is the test's to check
        """
    )
    result = run()
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_killed*",
            "- it exited during the test with signal SIGKILL (expected 0)",
        ]
    )


# -- the teardown checks, against fake servers ---------------------------------------


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


FAKE_SERVER = """
import os, signal, sys, time
{setup}
print("listening on 127.0.0.1:9", file=sys.stderr, flush=True)
print("forkserver ready", file=sys.stderr, flush=True)
while True:
    signal.pause()
"""


@pytest.fixture
def fake_server() -> Iterator[Callable[[str], ServerProcess]]:
    """Start a stand-in for forkserver that runs *setup*, then reports ready."""
    started: list[ServerProcess] = []
    spawned: list[psutil.Process] = []  # the fakes' children, whatever their session

    def start(setup: str, stop_timeout: float = 10.0) -> ServerProcess:
        code = FAKE_SERVER.format(setup=textwrap.dedent(setup))
        server = ServerProcess(
            [sys.executable, "-c", code],
            handler="fake",
            env=os.environ,
            stop_timeout=stop_timeout,
        )
        started.append(server)
        server.wait_ready(10)
        spawned.extend(leaks.descendants(server.pid))
        return server

    yield start
    for server in started:
        if server.returncode is None:  # not stopped (so not reaped) by the test
            server.kill_group()
    for process in spawned:
        if process.is_running():
            process.kill()


def test_fake_server_that_stops_cleanly_has_no_report(
    fake_server: Callable[[str], ServerProcess],
) -> None:
    server = fake_server("signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))")
    assert server.address == ("127.0.0.1", 9)
    assert server.stop_checked() == 0
    assert server.report() == ""


def test_unreaped_child_is_reported(
    fake_server: Callable[[str], ServerProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leaks, "ZOMBIE_GRACE", 0.3)
    server = fake_server(
        """
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        child = os.fork()
        if child == 0:
            os._exit(0)  # and the parent never reaps it:
        os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
        """
    )
    assert server.stop_checked() == 0
    report = server.report()
    assert "1 child(ren) exited but were not reaped within 0.3 s (zombies): " in report
    assert "did not stop cleanly" in report


def test_child_that_left_the_session_is_still_found(
    fake_server: Callable[[str], ServerProcess],
) -> None:
    """A process that left the server's session is found through the process
    tree as it was before the stop."""
    server = fake_server(
        """
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        r, w = os.pipe()
        if os.fork() == 0:
            os.setsid()
            os.write(w, b".")
            time.sleep(300)
            os._exit(0)
        os.read(r, 1)  # ready once the child has left the session
        """
    )
    (child,) = server.children()
    assert os.getsid(child.pid) == child.pid
    assert server.stop_checked() == 0
    assert f"pid {child.pid} (parent " in server.report()
    assert not child.is_running() or _zombie(child.pid)


def test_server_ignoring_sigterm_is_killed(fake_server: Callable[..., ServerProcess]) -> None:
    server = fake_server("signal.signal(signal.SIGTERM, signal.SIG_IGN)", stop_timeout=0.5)
    assert server.stop_checked() == -signal.SIGKILL
    report = server.report()
    assert "- it did not exit within 0.5 s of SIGTERM" in report
    assert "- it exited after SIGTERM with signal SIGKILL (expected 0)" in report
    assert not psutil.pid_exists(server.pid)


# -- pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        'quote " and backslash \\ and \t tab, \x7f, \x00, é, \U0001f600',
        "",
        0,
        -1,
        65535,
        0.25,
        1e-05,
        1e300,
        True,
        False,
        [],
        ["127.0.0.1", "::1"],
        [1, 2.5],
    ],
)
def test_setting_values_are_written_as_toml(value: Any) -> None:
    text = config.toml_table("server", {"key": value})
    assert tomllib.loads(text) == {"server": {"key": value}}


def test_path_and_tuple_settings_are_written_as_toml() -> None:
    text = config.toml_table("server", {"unix": (Path("/tmp/a b.sock"),)})
    assert tomllib.loads(text) == {"server": {"unix": ["/tmp/a b.sock"]}}


def test_a_value_toml_cannot_hold_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"max_children=\{\} is not a setting value"):
        config.toml_table("server", {"max_children": {}})


@pytest.mark.parametrize(
    ("line", "messages"),
    [
        ("2026-01-01 00:00:00,000 [1] INFO x: listening on 1.2.3.4:5", None),
        ('{"message": "listening on 1.2.3.4:5", "pid": 1}', ["listening on 1.2.3.4:5"]),
        ("{not json", None),
    ],
)
def test_log_lines_text_or_json(line: str, messages: list[str] | None) -> None:
    assert log_messages(line) == (messages or [line])


@pytest.mark.parametrize(
    ("logged", "address"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("[::1]:8000", ("::1", 8000)),
        ("[::]:0", ("::", 0)),
        ("unix:/run/x.sock", "/run/x.sock"),
        ("udp:127.0.0.1:53", ("127.0.0.1", 53)),
    ],
)
def test_logged_addresses_are_parsed(logged: str, address: object) -> None:
    assert parse_address(logged) == address


def test_a_log_level_that_hides_the_ready_line_is_refused(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    start = pytest_plugin.ServerFactory(tmp_path_factory, tmp_path)
    with pytest.raises(ValueError, match=r"log_level='warning' hides the \"listening on\""):
        start("forkserver.examples.echo:EchoHandler", log_level="warning")
    assert start.servers == []


def test_handler_objects_are_named_by_module_and_qualname() -> None:
    from forkserver.examples.echo import EchoHandler

    name = config.handler_name(EchoHandler)
    assert name == "forkserver.examples.echo:EchoHandler"

    def local(conn: object, addr: object) -> None: ...

    with pytest.raises(TypeError, match="define it at the top level"):
        config.handler_name(local)


def test_import_path_is_the_tests_own_entries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the test added to sys.path, then the rootdir: never the standard
    library or site-packages, which would then come before the standard library."""
    lib = tmp_path / "lib"
    lib.mkdir()
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.chdir(tmp_path)
    path = config.import_path(tmp_path / "root")
    assert path[0] == str(lib)
    assert path[-1] == str(tmp_path / "root") or str(tmp_path / "root") in path
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        assert sysconfig.get_paths()[key] not in path
