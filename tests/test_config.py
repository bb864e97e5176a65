"""forkserver/config.py: Settings, load() and the reference table; bad configs via the CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from forkserver.config import ConfigError, Listen, Settings, load, reference_table
from tests.helpers.servers import assert_config_refused, run_forkserver

# -- Settings ---------------------------------------------------------------


def test_defaults() -> None:
    assert dataclasses.asdict(Settings()) == {
        "host": ("127.0.0.1",),
        "port": 8000,
        "unix": (),
        "unix_mode": 0o666,
        "reuse_port": False,
        "listen": (),
        "backlog": 128,
        "handler": "",
        "max_children": 1024,
        "spare_children": 0,
        "graceful_timeout": 30.0,
        "kill_timeout": 5.0,
        "log_level": "info",
        "log_format": "text",
        "log_file": "",
        "access_log": False,
        "metrics": "",
        "pidfile": "",
        "when_full": "wait",
        "busy_message": "",
        "early_drop": "",
        "allow": (),
        "deny": (),
        "per_source_limit": 0,
        "per_source_rate": 0.0,
        "per_source_burst": 10,
        "ipv6_prefix": 64,
        "idle_timeout": 0.0,
        "send_timeout": 0.0,
        "max_lifetime": 0.0,
        "limit_cpu": -1,
        "limit_memory_mb": -1,
        "limit_open_files": -1,
        "limit_core_mb": -1,
        "user": "",
        "group": "",
        "umask": -1,
    }


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("port", -1, "server.port must be an integer 0-65535, got -1"),
        ("port", 65536, "server.port must be an integer 0-65535, got 65536"),
        ("port", "80", 'server.port must be an integer 0-65535, got "80"'),
        ("port", True, "server.port must be an integer 0-65535, got true"),
        ("port", 80.0, "server.port must be an integer 0-65535, got 80.0"),
        ("port", None, "server.port must be an integer 0-65535, got None"),
        ("backlog", 0, "server.backlog must be an integer 1-65535, got 0"),
        ("max_children", 0, "server.max_children must be an integer 1-100000, got 0"),
        ("unix_mode", -1, "server.unix_mode must be an integer 0o000-0o777, got -1"),
        ("graceful_timeout", -0.5, "server.graceful_timeout must be a number 0-86400, got -0.5"),
        (
            "graceful_timeout",
            float("inf"),
            "server.graceful_timeout must be a number 0-86400, got inf",
        ),
        ("kill_timeout", False, "server.kill_timeout must be a number 0-3600, got false"),
        ("host", 5, "server.host must be a string or a list of strings, got 5"),
        ("host", ["::1", 6], "server.host must be a string or a list of strings, got ['::1', 6]"),
        ("unix", None, "server.unix must be a string or a list of strings, got None"),
        ("handler", 3, "server.handler must be a string, got 3"),
        (
            "log_level",
            "verbose",
            'server.log_level must be one of "debug", "info", "warning", "error", "critical", '
            'got "verbose"',
        ),
    ],
)
def test_bad_value_raises_config_error_naming_key_value_and_expectation(
    key: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings(**{key: value})
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("key", "value", "stored"),
    [
        ("host", "::1", ("::1",)),
        ("host", ["127.0.0.1", "::1"], ("127.0.0.1", "::1")),
        ("host", [], ()),
        ("unix", "/run/app.sock", ("/run/app.sock",)),
        ("port", 0, 0),
        ("port", 65535, 65535),
        ("unix_mode", 0o777, 0o777),
        ("graceful_timeout", 5, 5.0),
        ("graceful_timeout", 0, 0.0),
        ("kill_timeout", 2.5, 2.5),
        ("log_level", "DEBUG", "debug"),
    ],
)
def test_good_value_is_normalised(key: str, value: Any, stored: Any) -> None:
    got = getattr(Settings(**{key: value}), key)
    assert got == stored
    assert type(got) is type(stored)


def test_spare_children_cannot_exceed_max_children() -> None:
    with pytest.raises(ConfigError) as info:
        Settings(max_children=4, spare_children=5)
    assert str(info.value) == "server.spare_children must be at most max_children (4), got 5"
    assert Settings(max_children=4, spare_children=4).spare_children == 4


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]


def test_from_mapping_rejects_unknown_key_naming_source_and_known_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({"port": 1, "prot": 2}, "app.toml")
    assert str(caught.value) == 'app.toml: unknown key server.prot (did you mean "port"?)'
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({"zzz": 2}, "app.toml")
    assert str(caught.value).startswith(
        "app.toml: unknown key server.zzz (known keys: access_log, allow, backlog, "
    )


def test_from_mapping_prefixes_value_errors_with_source() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_mapping({"port": "abc"}, "conf/echo.toml")
    assert str(caught.value) == 'conf/echo.toml: server.port must be an integer 0-65535, got "abc"'


def test_replace_checks_new_values_and_names_source() -> None:
    settings = Settings(port=1)
    assert settings.replace("command line", port=2, host="::1") == Settings(port=2, host=("::1",))
    assert settings.port == 1
    with pytest.raises(ConfigError) as caught:
        settings.replace("command line", port=99999)
    assert str(caught.value) == ("command line: server.port must be an integer 0-65535, got 99999")


def test_load_reads_every_key(tmp_path: Path) -> None:
    path = tmp_path / "full.toml"
    path.write_text(
        "[server]\n"
        'host = ["127.0.0.1", "::1"]\n'
        "port = 7000\n"
        'unix = "/tmp/app.sock"\n'
        "unix_mode = 0o660\n"
        "backlog = 64\n"
        'handler = "pkg.mod:Handler"\n'
        "max_children = 8\n"
        "graceful_timeout = 2\n"
        "kill_timeout = 0.5\n"
        'log_level = "WARNING"\n'
    )
    assert load(str(path)) == Settings(
        host=("127.0.0.1", "::1"),
        port=7000,
        unix=("/tmp/app.sock",),
        unix_mode=0o660,
        backlog=64,
        handler="pkg.mod:Handler",
        max_children=8,
        graceful_timeout=2.0,
        kill_timeout=0.5,
        log_level="warning",
    )


def test_load_of_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("# nothing set\n")
    assert load(str(path)) == Settings()


def test_load_joins_relative_paths_to_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc" / "run").mkdir(parents=True)
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / "etc" / name).write_text("pem\n")
    (tmp_path / "etc" / "plain.toml").write_text(
        '[server]\npidfile = "run/app.pid"\nlog_file = "app.log"\n'
        'unix = ["app.sock", "/tmp/abs.sock"]\n'
    )
    (tmp_path / "etc" / "tables.toml").write_text(
        '[server]\npidfile = "/tmp/abs.pid"\n\n[[listen]]\nunix = "app.sock"\n\n'
        '[[listen]]\ntcp = "127.0.0.1:0"\ntls_cert = "cert.pem"\ntls_key = "key.pem"\n'
        'tls_client_ca = "ca.pem"\n'
    )
    monkeypatch.chdir(tmp_path)  # a relative config path gives paths relative to the same cwd
    plain = load("etc/plain.toml")
    assert (plain.pidfile, plain.log_file) == ("etc/run/app.pid", "etc/app.log")
    assert plain.unix == ("etc/app.sock", "/tmp/abs.sock")
    tables = load(str(tmp_path / "etc" / "tables.toml"))
    assert tables.pidfile == "/tmp/abs.pid"
    unix, tls = tables.listen
    assert unix.unix == str(tmp_path / "etc" / "app.sock")
    assert (tls.tls_cert, tls.tls_key, tls.tls_client_ca) == tuple(
        str(tmp_path / "etc" / name) for name in ("cert.pem", "key.pem", "ca.pem")
    )
    assert load(str(tmp_path / "etc" / "plain.toml")).log_file == str(tmp_path / "etc" / "app.log")


def test_empty_paths_stay_off_and_settings_from_python_stay_as_given(tmp_path: Path) -> None:
    path = tmp_path / "off.toml"
    path.write_text('[server]\npidfile = ""\nlog_file = ""\nunix = []\n')
    settings = load(str(path))
    assert (settings.pidfile, settings.log_file, settings.unix) == ("", "", ())
    assert Settings(unix=("app.sock",)).unix == ("app.sock",)


def _table_rows(listen: bool = False) -> list[list[str]]:
    server, _, rest = reference_table().partition("\n\n")
    lines = (rest.split("\n\n", 1)[1] if listen else server).splitlines()
    assert lines[0] == "| key | default | flag | meaning |"
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def test_reference_table_lists_every_field_exactly_once_in_order() -> None:
    keys = [row[0] for row in _table_rows()]
    assert keys == [f"`{f.name}`" for f in dataclasses.fields(Settings)]
    keys = [row[0] for row in _table_rows(listen=True)]
    assert keys == [f"`{f.name}`" for f in dataclasses.fields(Listen)]


def test_reference_table_rows_say_default_flag_and_expectation() -> None:
    rows = {row[0].strip("`"): row for row in _table_rows()}
    assert rows["port"][1:3] == ["`8000`", "`--port PORT`"]
    assert rows["handler"][1] == "(required)"
    assert rows["unix_mode"][1:3] == ["`0o666`", ""]
    for key, row in rows.items():
        assert len(row) == 4, key
        assert "Expects " in row[3], key


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
