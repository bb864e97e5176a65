"""Compile the C programs in bench/ at run time, into a cache outside the repository.

``built(source)`` returns the path of an executable compiled from *source*
with the machine's ``cc`` (or ``gcc``, ``clang``), or None when there is no
compiler or it fails.  The binary lives in ``$XDG_CACHE_HOME/forkserver-bench``
(``~/.cache/forkserver-bench``), named after a hash of the source and the
flags, so an edited source is rebuilt and nothing is written to tracked files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PEERS = Path(__file__).resolve().parent / "peers"
CFLAGS = ("-O2", "-pthread")
LDLIBS = ("-lm",)
COMPILE_TIMEOUT = 60.0


class BuildError(RuntimeError):
    """The compiler ran and failed; the message holds its output."""


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/forkserver-bench``, or ``~/.cache/forkserver-bench``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "forkserver-bench"


def compiler() -> str | None:
    """The C compiler on PATH, or None."""
    return next((p for c in ("cc", "gcc", "clang") if (p := shutil.which(c))), None)


def built(source: Path) -> Path | None:
    """The executable built from *source*; None when no C compiler is installed.

    Raises BuildError when the compiler fails (a bug in the source, not in
    the machine).
    """
    cc = compiler()
    if cc is None:
        return None
    digest = hashlib.sha256(source.read_bytes() + " ".join(CFLAGS + LDLIBS).encode()).hexdigest()[
        :16
    ]
    target = cache_dir() / f"{source.stem}-{digest}"
    if os.access(target, os.X_OK):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: a concurrent run never sees half a binary.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{source.stem}-")
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(source), *LDLIBS],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT,
            check=False,
        )
        if proc.returncode != 0:
            raise BuildError(f"{cc} failed on {source}:\n{proc.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
