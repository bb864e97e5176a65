"""The test matrix: the whole suite on every Python that pyproject.toml claims.

``make test-all`` runs it (``nox`` from the project's venv); ``nox -s
tests-3.13 -- tests/test_server.py`` runs one version, with pytest's own
arguments after ``--``.  Each interpreter is looked up by version: a working
``python3.X`` on ``PATH`` first, else the newest ``3.X.*`` that pyenv keeps in
``$PYENV_ROOT/versions`` (its shims run only the versions selected with
``pyenv global``).  One that cannot be found is reported as ``skipped`` in
nox's summary, and named at the start: never counted as passed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

# Keep in step with requires-python and the classifiers in pyproject.toml.
PYTHONS = ["3.11", "3.12", "3.13"]

nox.options.sessions = ["tests"]
# A machine without one of the versions still runs the others; the missing
# one is named in the summary (nox's default on CI would be to fail instead).
nox.options.error_on_missing_interpreters = False
# The interpreter's own venv module: a fresh machine has no virtualenv.
nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"


def _runs(exe: str, version: str) -> bool:
    """True if *exe* starts and is Python *version*."""
    check = f"import sys; sys.exit(sys.version_info[:2] != {tuple(map(int, version.split('.')))})"
    try:
        done = subprocess.run([exe, "-c", check], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _newest(paths: list[Path]) -> list[Path]:
    """pyenv's versions, newest first (3.12.10 before 3.12.9)."""

    def key(path: Path) -> tuple[int, ...]:
        tail = path.parent.parent.name.split(".")
        return tuple(int(part) if part.isdigit() else -1 for part in tail)

    return sorted(paths, key=key, reverse=True)


def find_python(version: str) -> str | None:
    """The path of a working interpreter for *version* ("3.12"), or None."""
    name = f"python{version}"
    on_path = shutil.which(name)
    if on_path and _runs(on_path, version):
        return on_path
    roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    for root in dict.fromkeys(r for r in roots if r):
        for exe in _newest(list(Path(root, "versions").glob(f"{version}.*/bin/{name}"))):
            if _runs(str(exe), version):
                return str(exe)
    return None


def _put_on_path() -> None:
    """Put each found interpreter's directory first on PATH, where nox looks;
    say which versions are missing before any session runs."""
    missing = []
    for version in PYTHONS:
        exe = find_python(version)
        if exe is None:
            missing.append(version)
        elif shutil.which(f"python{version}") != exe:
            os.environ["PATH"] = os.pathsep.join([str(Path(exe).parent), os.environ["PATH"]])
    if missing:
        print(
            f"noxfile: no Python {', '.join(missing)} on PATH or in pyenv's versions: "
            "SKIPPED, not tested (unless .nox/ keeps a venv from an earlier run)",
            file=sys.stderr,
        )


_put_on_path()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The suite, as `make unit` runs it, on one Python."""
    session.install("--disable-pip-version-check", "--editable", ".[dev]")
    session.run("python", "--version")
    session.run("python", "-m", "pytest", *session.posargs)
