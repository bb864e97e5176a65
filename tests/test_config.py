"""forkserver/config/: Settings, load() and the reference table.

Bad configs through the CLI: test_config_errors.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from forkserver.config import ConfigError, Listen, Settings, load, reference_table

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
        "proc_title": True,
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
        "request_timeout": 0.0,
        "request_min_rate": 0,
        "request_timeout_max": 0.0,
        "max_lifetime": 0.0,
        "limit_cpu": -1,
        "limit_memory_mb": -1,
        "limit_open_files": -1,
        "limit_core_mb": -1,
        "user": "",
        "group": "",
        "umask": -1,
        "sandbox": None,
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
    lines = (rest.split("\n\n")[1] if listen else server).splitlines()
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
