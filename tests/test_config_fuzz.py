"""Generated configs: loading gives Settings or one printable ConfigError line, never a
traceback; the CLI exits 0 or 2 with one line, and a config --check passes really starts.

Examples per property: see tests/helpers/fuzz.py (``FORKSERVER_FUZZ=1`` for a long run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from forkserver.config import ConfigError, Listen, Settings, load
from forkserver.config.checking import field_types
from forkserver.config.sandbox import Sandbox
from forkserver.config.text import MAX_MESSAGE
from forkserver.testing.config import environment
from forkserver.testing.process import NotReady, ServerProcess
from tests.helpers.fuzz import fuzz_timeout, subprocess_examples
from tests.helpers.servers import ROOT, run_forkserver

ECHO = "forkserver.examples.echo:EchoHandler"
SERVER_KEYS = [f.name for f in dataclasses.fields(Settings)]
LISTEN_KEYS = [f.name for f in dataclasses.fields(Listen)]

# -- values, as tomllib returns them ------------------------------------------------

# Strings an operator might write, right or wrong, and strings no one should.
HAZARDS = [
    "", ".", "/", "/tmp", "app.sock", "app.pid", "app.log", "run/app.pid", "/no/such/dir/x",
    "../x", "~", "a\x00b", "\x00", "a\nb", "\x1b[2J", "\x1b]0;title\x07", "\u202e", "\ud7ff",
    "nobody", "root", "nogroup", "no_such_user", "127.0.0.1", "::1", "::", "0.0.0.0",
    "127.0.0.1:0", "[::1]:0", "127.0.0.1:99999", ":0", "10.0.0.0/8", "2:50:10", "1:2",
    "text", "json", "DEBUG", "wait", "refuse", ECHO, "exec:/bin/cat", "exec:", "x:y",
    "s" * 200, "/" + "d/" * 60 + "s.sock",
]  # fmt: skip
strings = st.one_of(st.sampled_from(HAZARDS), st.text(max_size=40))
integers = st.one_of(
    st.integers(-3, 70_000),
    st.sampled_from([0, -1, 1 << 31, 1 << 63, -(1 << 63), 0o777, 0o1777]),
    st.integers(min_value=-(10**500), max_value=10**500),
)
floats = st.floats(allow_nan=True, allow_infinity=True)
scalars = st.one_of(
    strings, integers, floats, st.booleans(), st.datetimes(), st.dates(), st.times()
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["a", "b", "tcp", "c d"]), inner, max_size=3),
    ),
    max_leaves=8,
)


def typed(cls: type[Settings] | type[Listen] | type[Sandbox], key: str) -> st.SearchStrategy[Any]:
    """Values of the right type for *key*, near its limits: most of what passes."""
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    kind = field_types(cls)[key]
    lo, hi = f.metadata["min"], f.metadata["max"]
    if f.metadata["choices"]:
        return st.sampled_from(f.metadata["choices"])
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(-1 if lo is None else int(lo) - 1, 100 if hi is None else int(hi) + 1)
    if kind is float:
        return st.floats(-1 if lo is None else lo - 1, 100 if hi is None else hi + 1)
    if kind is str:
        return strings
    if key == "listen":
        return st.lists(st.fixed_dictionaries({"tcp": st.just("127.0.0.1:0")}), max_size=2)
    return st.lists(strings, max_size=3)


def table(cls: type[Settings] | type[Listen] | type[Sandbox]) -> st.SearchStrategy[dict[str, Any]]:
    """A table with a few of *cls*'s keys, half the time of the right type (and now and
    then an unknown key)."""
    keys = [f.name for f in dataclasses.fields(cls) if f.name != "listen"]

    @st.composite
    def pairs(draw: st.DrawFn) -> dict[str, Any]:
        chosen = draw(st.lists(st.one_of(st.sampled_from(keys), strings), max_size=5))
        return {k: draw(st.one_of(typed(cls, k), values) if k in keys else values) for k in chosen}

    return pairs()


# -- TOML text ------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """*value* as TOML (a generated one: no tomli_w needed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # JSON's escapes are TOML's, except that TOML also wants DEL escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return str(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int):
        return str(value) if abs(value) < 10**4000 else str(value)[:4000]
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return value.isoformat()  # type: ignore[no-any-return]  # date, time, datetime


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def document(
    server: dict[str, Any], listens: list[dict[str, Any]], sandbox: dict[str, Any] | None = None
) -> str:
    lines = ["[server]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in server.items()]
    if sandbox is not None:
        lines += ["", "[sandbox]"] + [
            f"{toml_key(k)} = {toml_value(v)}" for k, v in sandbox.items()
        ]
    for listen in listens:
        lines += ["", "[[listen]]"] + [
            f"{toml_key(k)} = {toml_value(v)}" for k, v in listen.items()
        ]
    return "\n".join(lines) + "\n"


@st.composite
def config_files(draw: st.DrawFn) -> bytes:
    """A config file: a [server] table and [[listen]] tables of generated values, then
    perhaps mangled (bytes cut or inserted, deep nesting, a huge number)."""
    sandbox = draw(st.one_of(st.none(), table(Sandbox)))
    text = document(draw(table(Settings)), draw(st.lists(table(Listen), max_size=2)), sandbox)
    data = text.encode()
    mangle = draw(st.sampled_from(["none", "none", "insert", "cut", "nest", "huge", "bytes"]))
    at = draw(st.integers(0, len(data)))
    if mangle == "insert":
        data = data[:at] + draw(st.binary(max_size=8)) + data[at:]
    elif mangle == "cut":
        data = data[:at] + data[at + draw(st.integers(1, 8)) :]
    elif mangle == "nest":
        depth = draw(st.integers(1, 1500))
        opener = draw(st.sampled_from(["[", "{a = "]))
        closer = "]" if opener == "[" else "}"
        data += f"deep = {opener * depth}1{closer * depth}\n".encode()
    elif mangle == "huge":
        data += f"huge = {'9' * draw(st.integers(4000, 5000))}\n".encode()
    elif mangle == "bytes":
        data = draw(st.binary(max_size=200))
    return data


def assert_one_printable_line(message: str) -> None:
    assert "\n" not in message, message
    assert message.isprintable(), message
    assert len(message) < MAX_MESSAGE + 200, len(message)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="forkserver-fuzz-") as name:
        yield Path(name)


@fuzz_timeout
@given(data=config_files())
def test_loading_any_file_gives_settings_or_one_config_error_line(
    data: bytes, workdir: Path
) -> None:
    path = workdir / "fuzz.toml"
    path.write_bytes(data)
    try:
        loaded = load(str(path))
    except ConfigError as exc:
        event("refused")
        assert_one_printable_line(str(exc))
        assert str(exc).startswith(f"{path}: ")
        return
    event("loaded")
    assert isinstance(loaded, Settings)
    for spec in loaded.listeners():
        assert isinstance(spec, Listen)


def build(cls: type[Settings] | type[Listen], key: str, value: Any) -> Settings | Listen:
    if cls is Listen and key not in ("tcp", "udp", "unix"):
        return Listen(tcp="127.0.0.1:0", **{key: value})
    return cls(**{key: value})


@fuzz_timeout
@given(st.data())
def test_every_settings_check_gives_a_value_or_one_config_error_line(data: st.DataObject) -> None:
    cls = data.draw(st.sampled_from([Settings, Listen]))
    key = data.draw(st.sampled_from(SERVER_KEYS if cls is Settings else LISTEN_KEYS))
    value = data.draw(st.one_of(typed(cls, key), values))
    try:
        checked = build(cls, key, value)
    except ConfigError as exc:
        event("refused")
        assert_one_printable_line(str(exc))
        assert key in str(exc) or cls is Listen, str(exc)
        return
    event("accepted")
    stored = getattr(checked, key)
    for text in stored if isinstance(stored, tuple) else (stored,):
        assert not (isinstance(text, str) and "\0" in text), stored


# -- the command line, in real processes ------------------------------------------------

# Keys whose values reach the OS (paths, names, addresses) or the terminal.
RISKY = ["user", "group", "pidfile", "log_file", "unix", "host", "metrics", "handler"]
RISKY += ["busy_message", "allow", "deny", "early_drop", "log_format", "log_level"]


# Values each of those keys takes in a config that works.
PLAUSIBLE: dict[str, list[Any]] = {
    "user": ["nobody", "root"], "group": ["nogroup", "root"],
    "pidfile": ["app.pid", "run.pid"], "log_file": ["app.log"], "unix": ["app.sock", []],
    "host": ["127.0.0.1", ["127.0.0.1", "127.0.0.2"]], "metrics": ["127.0.0.1:0"],
    "handler": [ECHO], "busy_message": ["busy\r\n"], "allow": [["127.0.0.0/8"]],
    "deny": [["10.0.0.0/8"]], "early_drop": ["10:30:60"], "log_format": ["json", "text"],
    "log_level": ["info", "DEBUG"],
}  # fmt: skip


@st.composite
def risky_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A good config (echo on loopback port 0) with one to three risky keys changed,
    to what works or to a hazard."""
    server: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "handler": ECHO}
    for key in draw(st.lists(st.sampled_from(RISKY), min_size=1, max_size=3, unique=True)):
        hazard = st.one_of(st.sampled_from(HAZARDS), st.lists(strings, max_size=2))
        plausible: list[Any] = PLAUSIBLE[key]
        server[key] = draw(st.one_of(st.sampled_from(plausible), hazard))
    return server


def start_and_stop(args: list[str], cwd: Path) -> tuple[int, str]:
    """Start a server with the project's own harness, wait for its ready line or its
    exit, then stop it (SIGTERM): the exit status and its log.  Its whole process
    group is killed in any case."""
    argv = [sys.executable, "-m", "forkserver", *args]
    server = ServerProcess(argv, env=environment(ROOT, {}), cwd=cwd, name="forkserver")
    try:
        try:
            server.wait_ready(30)
        except NotReady:
            pass  # it exited: stop() collects its status and the rest of its log
        return server.stop(30), server.log
    finally:
        server.kill_group()


@fuzz_timeout
@settings(
    max_examples=subprocess_examples(6),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(server=risky_configs())
def test_cli_exits_0_or_2_with_one_line_and_a_passed_check_starts(
    server: dict[str, Any], workdir: Path
) -> None:
    cwd = Path(tempfile.mkdtemp(dir=workdir))
    path = cwd / "fuzz.toml"
    path.write_text(document(server, []))
    checked = run_forkserver("--config", str(path), "--check", cwd=cwd, timeout=30)
    assert checked.returncode in (0, 2), checked.stderr
    assert checked.stdout == ""
    assert len(checked.stderr.splitlines()) == 1, checked.stderr
    assert_one_printable_line(checked.stderr.removesuffix("\n"))
    if checked.returncode == 2:
        event("--check refused")
        return
    event("--check passed")
    # The check passed: a start must get as far as serving.  Its log must reach
    # stderr, to be read: info level, no log_file.
    assume(server.get("log_level", "info") in ("info", "debug", "INFO", "DEBUG"))
    assume(not server.get("log_file"))
    status, log = start_and_stop(["--config", str(path)], cwd)
    assert "Traceback" not in log, log
    if status == 1:  # an address the check cannot know is unusable: one line, nothing served
        event("start: could not bind")
        assert re.fullmatch(r"forkserver: (metrics: )?cannot (listen on|resolve) [^\n]*", log), log
        return
    event("started and stopped")
    assert "forkserver ready" in log, log
    assert status == 0, log


def test_generated_documents_are_toml_that_reads_back(workdir: Path) -> None:
    """The generator's own check: what it writes, tomllib reads as written."""
    import tomllib

    server: dict[str, Any] = {"a\nb": "x\x00\x7f\u202e", "n": [1, 2.5, float("inf")]}
    server.update(t={"c d": True}, d=datetime(2020, 1, 2, 3, 4, 5))
    assert tomllib.loads(document(server, [{"tcp": "127.0.0.1:0"}])) == {
        "server": server,
        "listen": [{"tcp": "127.0.0.1:0"}],
    }
