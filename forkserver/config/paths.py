"""File paths in the config: relative to the config file, and checked before the first bind.

A path in a config file (``setting(..., path=True)``) that is relative is
relative to that file's directory, as nginx and systemd read theirs, so a
config works from any working directory; a path given on the command line
stays relative to the working directory.  The checks catch, before anything
is bound, what would otherwise fail only once the server is half started: a
pidfile that is a directory, a log file in a missing directory, a socket path
too long for the kernel.
"""

from __future__ import annotations

import os

from .text import show

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from .fields import Table

__all__ = [
    "MAX_UNIX_PATH",
    "check_file",
    "check_log_file",
    "check_pidfile",
    "check_socket_paths",
    "resolve_paths",
]

MAX_UNIX_PATH = 107  # sizeof(sun_path) on Linux, less the terminating NUL


def resolve_paths(cls: type[Table], values: Mapping[str, Any], directory: str) -> dict[str, Any]:
    """*values* (a table of *cls* as read from TOML) with each relative path joined to
    *directory*; values of the wrong type are left for the table's checks to report."""
    import dataclasses

    from .fields import complete

    complete()
    resolved = dict(values)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = values.get(f.name)
        if not f.metadata["path"] or value is None:
            continue
        if isinstance(value, str):
            resolved[f.name] = _joined(directory, value)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            resolved[f.name] = [_joined(directory, v) for v in value]
    return resolved


def _joined(directory: str, path: str) -> str:
    # Empty means "off"; "\0" is rejected by the checks, whatever it is joined to.
    return os.path.join(directory, path) if path else path


def _unusable(path: str) -> str | None:
    """Why *path* cannot be a file name at all, or None."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:  # a lone surrogate, from Python rather than TOML
        return f"{show(path)} cannot be encoded as a file name"
    return None


def _writable_directory(path: str) -> str | None:
    """What stops creating a file at *path* in its directory, or None."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        return f"directory {show(directory)} does not exist"
    if not os.access(directory, os.W_OK):
        return f"directory {show(directory)} is not writable"
    return None


def check_file(value: str) -> str | None:
    """A file that must exist (a certificate, a key)."""
    if problem := _unusable(value):
        return problem
    if not os.path.isfile(value):
        return f"{show(value)}: no such file"
    return None


def check_pidfile(value: str) -> str | None:
    """The pidfile: written as a temporary file renamed into place, so its
    directory must be writable, and it must not be a directory itself."""
    if problem := _unusable(value):
        return problem
    if os.path.isdir(value):
        return f"{show(value)} is a directory"
    return _writable_directory(value)


def check_log_file(value: str) -> str | None:
    """The log file: appended to, and created if missing."""
    if problem := _unusable(value):
        return problem
    if os.path.isdir(value):
        return f"{show(value)} is a directory"
    if os.path.exists(value):
        return None if os.access(value, os.W_OK) else f"{show(value)} is not writable"
    return _writable_directory(value)


def check_socket_paths(values: str | tuple[str, ...]) -> str | None:
    """Unix socket paths: short enough for the kernel, in a writable directory.
    (What is at the path already is the bind's to judge: a stale socket is replaced.)"""
    for path in (values,) if isinstance(values, str) else values:
        if not path:  # in a list: "" would make a listener without an address
            return 'a socket path cannot be empty ("unix = []" means none)'
        if problem := _unusable(path):
            return problem
        size = len(os.fsencode(path))
        if size > MAX_UNIX_PATH:
            return f"{show(path)} is {size} bytes, over the {MAX_UNIX_PATH} a socket path may have"
        if problem := _writable_directory(path):
            return problem
    return None
