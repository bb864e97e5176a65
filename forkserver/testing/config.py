"""What a server started from a test is given: its settings as TOML, its
handler's name, and an environment that imports what the test imports."""

from __future__ import annotations

import math
import os
import site
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["NOT_INHERITED", "environment", "handler_name", "import_path", "toml_table"]

# Variables meant for the process running the tests, not for a server it starts:
# with NOTIFY_SOCKET, systemd would take the test server for the service.
NOT_INHERITED = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "FORKSERVER_BOOT")


def handler_name(handler: object) -> str:
    """*handler* as "module:attr": a string as it is, a class or function by its names."""
    if isinstance(handler, str):
        return handler
    module = getattr(handler, "__module__", None)
    qualname = getattr(handler, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<locals>" in qualname:
        raise TypeError(
            f"forkserver fixture: cannot name {handler!r} as 'module:attr'; "
            "define it at the top level of an importable module, or pass the string"
        )
    return f"{module}:{qualname}"


def environment(rootdir: Path, extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment, with an import path that finds what this
    test can import, then *extra*."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env["PYTHONPATH"] = os.pathsep.join(import_path(rootdir))
    env.setdefault("PYTHONUNBUFFERED", "1")  # a child's print() is in the log at once
    env.update(extra)
    return env


def import_path(rootdir: Path) -> list[str]:
    """sys.path minus what every interpreter has anyway (the standard library and
    site-packages, which must stay after it), then the rootdir, then PYTHONPATH."""
    interpreter = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        interpreter.add(os.path.realpath(sysconfig.get_paths()[key]))
    interpreter.update(os.path.realpath(p) for p in getattr(site, "getsitepackages", list)())
    interpreter.add(os.path.realpath(site.getusersitepackages()))

    def ours(path: str) -> bool:
        real = os.path.realpath(path)
        return os.path.isdir(real) and not any(
            real == top or real.startswith(top + os.sep) for top in interpreter
        )

    entries: list[str] = []
    for path in [os.path.abspath(p or os.curdir) for p in sys.path if ours(p or os.curdir)]:
        if path not in entries:
            entries.append(path)
    for path in [str(rootdir), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]:
        if path and os.path.abspath(path) not in entries:
            entries.append(os.path.abspath(path))
    return entries


def toml_table(name: str, values: Mapping[str, Any]) -> str:
    """``[name]`` and one ``key = value`` line per item of *values*."""
    lines = [f"[{name}]"]
    lines += [f"{key} = {toml_value(value, key)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def toml_value(value: object, key: str = "value") -> str:
    """*value* as a TOML literal; TypeError, naming *key*, for what TOML cannot hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str | os.PathLike):
        text = os.fspath(value)
        if isinstance(text, str):
            return '"' + "".join(_toml_char(c) for c in text) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v, key) for v in value) + "]"
    raise TypeError(
        f"forkserver fixture: {key}={value!r} is not a setting value "
        "(a string, path, number, boolean, or a list of them)"
    )


def _toml_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    if ord(c) < 0x20 or ord(c) == 0x7F:
        return f"\\u{ord(c):04x}"
    return c
