"""Bad configs through the real CLI, as a table of cases: exit 2, one printable line
naming the file, the key, the value and what was expected, nothing bound, and
--check refusing exactly what a start refuses."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.servers import assert_config_refused, run_forkserver

# -- bad configs through the real CLI -----------------------------------------


@dataclass(frozen=True)
class Bad:
    """A bad config file: its bytes and the fragments the one error line must contain."""

    body: bytes | None  # None: no file at the path
    says: tuple[str, ...]
    make: Callable[[Path], None] | None = None  # builds the path instead of writing body
    skip_as_root: bool = False


def _directory(path: Path) -> None:
    path.mkdir()


def _unreadable(path: Path) -> None:
    path.write_bytes(_server())
    path.chmod(0)


def _server(*lines: str) -> bytes:
    """A good [server] table (loopback, port 0, echo) with *lines* ("key = value") replacing
    or adding keys, so that each case has exactly one thing wrong."""
    values = {
        "host": '"127.0.0.1"',
        "port": "0",
        "handler": '"forkserver.examples.echo:EchoHandler"',
    }
    for line in lines:
        key, _, value = line.partition(" = ")
        values[key] = value
    return ("[server]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())).encode()


def _handler_only() -> bytes:
    return b'[server]\nhandler = "forkserver.examples.echo:EchoHandler"\n'


def _handler(spec: str) -> bytes:
    return _server(f'handler = "{spec}"')


CASES: dict[str, Bad] = {
    "unknown-key": Bad(_server("prot = 8000"), ("unknown key server.prot", 'did you mean "port"?')),
    "unknown-table": Bad(
        _server() + b"[servers]\nport = 1\n",
        ("unknown table or key servers", "expected a [server] table"),
    ),
    "server-not-a-table": Bad(b"server = 5\n", ("server must be a table, got 5",)),
    "port-string": Bad(
        _server('port = "abc"'), ('server.port must be an integer 0-65535, got "abc"',)
    ),
    "port-too-big": Bad(
        _server("port = 70000"), ("server.port must be an integer 0-65535, got 70000",)
    ),
    "port-negative": Bad(_server("port = -1"), ("server.port must be an integer 0-65535, got -1",)),
    "port-bool": Bad(_server("port = true"), ("server.port must be an integer 0-65535, got true",)),
    "backlog-0": Bad(_server("backlog = 0"), ("server.backlog must be an integer 1-65535, got 0",)),
    "max_children-0": Bad(
        _server("max_children = 0"), ("server.max_children must be an integer 1-100000, got 0",)
    ),
    "graceful_timeout-string": Bad(
        _server('graceful_timeout = "soon"'),
        ('server.graceful_timeout must be a number 0-86400, got "soon"',),
    ),
    "graceful_timeout-negative": Bad(
        _server("graceful_timeout = -1"),
        ("server.graceful_timeout must be a number 0-86400, got -1",),
    ),
    "graceful_timeout-nan": Bad(
        _server("graceful_timeout = nan"),
        ("server.graceful_timeout must be a number 0-86400, got nan",),
    ),
    "request_timeout_max-below-request_timeout": Bad(
        _server("request_timeout = 10", "request_timeout_max = 5"),
        ("server.request_timeout_max must be 0 or at least request_timeout (10), got 5",),
    ),
    "log_level-unknown": Bad(
        _server('log_level = "loud"'),
        (
            'server.log_level must be one of "debug", "info", "warning", "error", "critical"',
            '"loud"',
        ),
    ),
    "host-int": Bad(
        _server("host = 5"), ("server.host must be a string or a list of strings, got 5",)
    ),
    "host-list-of-ints": Bad(
        _server("host = [1, 2]"), ("server.host must be a string or a list of strings, got [1, 2]",)
    ),
    "no-listener": Bad(_server("host = []"), ("no listener: host and unix are", "empty")),
    "unix_mode-too-big": Bad(
        _server("unix_mode = 0o1777"),
        ("server.unix_mode must be an integer 0o000-0o777, got 0o1777",),
    ),
    "handler-missing": Bad(
        b'[server]\nhost = "127.0.0.1"\nport = 0\n',
        ('server.handler is required (e.g. handler = "module:attr")',),
    ),
    "handler-no-colon": Bad(
        _handler("nocolon"),
        ('server.handler must be "module:attr", got "nocolon"',),
    ),
    "handler-no-module": Bad(
        _handler("no_such_module_xyz:App"),
        ("server.handler: no module named 'no_such_module_xyz'", '"no_such_module_xyz:App"'),
    ),
    "handler-no-attribute": Bad(
        _handler("forkserver.examples.echo:Missing"),
        ("server.handler: module 'forkserver.examples.echo' has no attribute 'Missing'",),
    ),
    "handler-not-callable": Bad(
        _handler("forkserver.examples.echo:BUFSIZE"),
        ('server.handler: "forkserver.examples.echo:BUFSIZE" is a', "not a class or function"),
    ),
    "handler-module-raises": Bad(
        _handler("tests.helpers.broken_handler_module:Handler"),
        (
            "server.handler: importing 'tests.helpers.broken_handler_module' failed: "
            "RuntimeError: broken_handler_module refuses to load",
        ),
    ),
    "invalid-toml": Bad(
        b'[server]\nport = \nhandler = "x:y"\n', ("invalid TOML: Invalid value (at line 2",)
    ),
    "not-utf8": Bad(
        _server() + b"# caf\xe9 \xff\n", ("invalid TOML: 'utf-8' codec can't decode byte 0xe9",)
    ),
    "file-missing": Bad(None, ("cannot read config: No such file or directory",)),
    "file-is-a-directory": Bad(None, ("cannot read config: Is a directory",), make=_directory),
    "file-unreadable": Bad(
        None, ("cannot read config: Permission denied",), make=_unreadable, skip_as_root=True
    ),
    # What tomllib raises besides TOMLDecodeError.
    "integer-of-4301-digits": Bad(
        _server("port = " + "9" * 4301), ("invalid TOML: an integer of over 4300 digits",)
    ),
    "arrays-nested-1200-deep": Bad(
        _server("host = " + "[" * 1200 + "]" * 1200),
        ("invalid TOML: arrays or tables nested too deeply",),
    ),
    "inline-tables-nested-1200-deep": Bad(
        _server("host = " + "{a = " * 1200 + "1" + "}" * 1200),
        ("invalid TOML: arrays or tables nested too deeply",),
    ),
    "number-too-large-for-a-float": Bad(
        _server("graceful_timeout = " + "1" * 400),
        ("server.graceful_timeout must be a number 0-86400, got an integer of about 399 digits",),
    ),
    # A NUL in any string: an error, never cut off silently or raised from the OS.
    **{
        f"nul-in-{key}": Bad(
            _server(f"{key} = {value}"),
            (f"server.{key} must not contain a NUL character, got {shown}",),
        )
        for key, value, shown in [
            ("user", r'"a\u0000b"', r'"a\x00b"'),
            ("group", r'"a\u0000b"', r'"a\x00b"'),
            ("pidfile", r'"/tmp/a\u0000b"', r'"/tmp/a\x00b"'),
            ("log_file", r'"/tmp/a\u0000b"', r'"/tmp/a\x00b"'),
            ("unix", r'"/tmp/s\u0000.sock"', r'"/tmp/s\x00.sock"'),
            ("host", r'"127.0.0.1\u0000junk"', r'"127.0.0.1\x00junk"'),
            ("metrics", r'"127.0.0.1:9100\u0000"', r'"127.0.0.1:9100\x00"'),
            (
                "handler",
                r'"forkserver.examples.echo:EchoHandler\u0000"',
                r'"forkserver.examples.echo:EchoHandler\x00"',
            ),
            ("allow", r'["10.0.0.0/8\u0000"]', r"['10.0.0.0/8\x00']"),
            ("busy_message", r'"busy\u0000"', r'"busy\x00"'),
        ]
    },
    "nul-in-listen-tcp": Bad(
        _handler_only() + b'[[listen]]\ntcp = "127.0.0.1:0\\u0000"\n',
        ('[[listen]] tcp must not contain a NUL character, got "127.0.0.1:0\\x00"',),
    ),
    "nul-in-listen-tls_cert": Bad(
        _handler_only() + b'[[listen]]\ntcp = "127.0.0.1:0"\ntls_cert = "c\\u0000"\n',
        ("[[listen]] tls_cert must not contain a NUL character",),
    ),
    # Paths that would fail only once the listeners are bound.
    "pidfile-is-a-directory": Bad(
        _server('pidfile = "/"'), ('server.pidfile: "/" is a directory',)
    ),
    "pidfile-in-a-missing-directory": Bad(
        _server('pidfile = "/no-such-dir-xyz/app.pid"'),
        ('server.pidfile: directory "/no-such-dir-xyz" does not exist',),
    ),
    "log_file-is-a-directory": Bad(
        _server('log_file = "/"'), ('server.log_file: "/" is a directory',)
    ),
    "log_file-in-a-missing-directory": Bad(
        _server('log_file = "/no-such-dir-xyz/app.log"'),
        ('server.log_file: directory "/no-such-dir-xyz" does not exist',),
    ),
    "unix-path-too-long": Bad(
        _server(f'unix = "/tmp/{"s" * 200}"'),
        ("server.unix:", "(205 characters) is 205 bytes, over the 107 a socket path may have"),
    ),
    "unix-empty-path": Bad(
        _server('unix = ["s.sock", ""]'),
        ('server.unix: a socket path cannot be empty ("unix = []" means none)',),
    ),
    "unix-in-a-missing-directory": Bad(
        _server('unix = "/no-such-dir-xyz/app.sock"'),
        ('server.unix: directory "/no-such-dir-xyz" does not exist',),
    ),
    # Host names getaddrinfo() would refuse with a UnicodeError, after --check.
    "host-label-too-long": Bad(
        _server(f'host = "{"h" * 64}.example"'),
        (f'server.host: "{"h" * 60}..." (72 characters) is not a host name or IP address',),
    ),
    "metrics-empty-label": Bad(
        _server('metrics = "a..b:9100"'),
        ('server.metrics: "a..b" is not a host name or IP address',),
    ),
    "user-unknown": Bad(
        _server('user = "no_such_user_xyz"'), ('server.user: no user "no_such_user_xyz" on this',)
    ),
    # Values reach the terminal escaped and cut: one line, no control characters.
    "newline-in-value": Bad(
        _server(r'port = "80\n[server]"'),
        (r'server.port must be an integer 0-65535, got "80\n[server]"',),
    ),
    "terminal-escape-in-value": Bad(
        _server(r'log_format = "\u001b[2J\u001b]0;title\u0007"'),
        (r'got "\x1b[2J\x1b]0;title\x07"',),
    ),
    "long-value-cut": Bad(
        _server(f'log_format = "{"y" * 5000}"'),
        (f'got "{"y" * 60}..." (5000 characters)',),
    ),
    "newline-in-unknown-key": Bad(
        _server(r'"a\nb" = 1'), (r'unknown key server."a\nb" (known keys: ',)
    ),
}


@dataclass(frozen=True)
class Run:
    path: Path
    result: subprocess.CompletedProcess[str]  # a start
    checked: subprocess.CompletedProcess[str]  # --check


@pytest.fixture(scope="module")
def rejected(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Run]:
    """Runs the CLI on a case once per module, to start and with --check; the tests
    below share the runs."""
    runs: dict[str, Run] = {}
    workdir = tmp_path_factory.mktemp("bad-configs")

    def run(name: str) -> Run:
        if name not in runs:
            case = CASES[name]
            path = workdir / f"{name}.toml"
            if case.make is not None:
                case.make(path)
            elif case.body is not None:
                path.write_bytes(case.body)
            start = run_forkserver("--config", str(path), cwd=workdir, timeout=10)
            check = run_forkserver("--config", str(path), "--check", cwd=workdir, timeout=10)
            runs[name] = Run(path, start, check)
        return runs[name]

    return run


def _params() -> list[Any]:
    params = []
    for name, case in CASES.items():
        marks: list[pytest.MarkDecorator] = []
        if case.skip_as_root:
            marks.append(
                pytest.mark.skipif(
                    os.geteuid() == 0, reason="root reads a chmod 000 file; needs a normal user"
                )
            )
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.mark.parametrize("name", _params())
def test_bad_config_exits_2_with_one_line_and_starts_nothing(
    name: str, rejected: Callable[[str], Run]
) -> None:
    result = rejected(name).result
    assert_config_refused(result)
    assert result.stderr.removesuffix("\n").isprintable(), result.stderr


@pytest.mark.parametrize("name", _params())
def test_check_refuses_exactly_what_a_start_refuses(
    name: str, rejected: Callable[[str], Run]
) -> None:
    run = rejected(name)
    assert_config_refused(run.checked)
    # A handler that fails to import names sys.path[0]: the serving parent has its own.
    assert (
        run.checked.stderr.split("; sys.path[0]")[0] == run.result.stderr.split("; sys.path[0]")[0]
    )


@pytest.mark.parametrize("name", _params())
def test_bad_config_message_names_key_value_and_expectation(
    name: str, rejected: Callable[[str], Run]
) -> None:
    stderr = rejected(name).result.stderr
    for fragment in CASES[name].says:
        assert fragment in stderr


@pytest.mark.parametrize("name", _params())
def test_bad_config_message_names_the_file(name: str, rejected: Callable[[str], Run]) -> None:
    run = rejected(name)
    assert run.result.stderr.startswith(f"forkserver: {run.path}: ")
