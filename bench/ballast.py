"""An echo handler module with a heavy parent: ballast built at import time.

    FORKSERVER_BALLAST_MB=300 python -m forkserver --handler bench.ballast:EchoHandler --port 0

Importing this module builds ``FORKSERVER_BALLAST_MB`` megabytes (default 0) of
distinct 1 KiB ``bytes`` objects in one list, written to as they are created,
so the parent's RSS grows by about that much (plus ~5% object overhead)
before its first fork, like a service that preloads a large model or cache.
The handler is ``forkserver.examples.echo.EchoHandler``, unchanged.
"""

from __future__ import annotations

import os

from forkserver.examples.echo import EchoHandler

__all__ = ["BALLAST", "ENV", "EchoHandler", "build"]

ENV = "FORKSERVER_BALLAST_MB"
CHUNK = 1024


def build(megabytes: float) -> list[bytes]:
    """About *megabytes* MiB of distinct bytes objects (distinct, so nothing is shared)."""
    count = int(megabytes * 2**20) // CHUNK
    return [i.to_bytes(8, "little") * (CHUNK // 8) for i in range(count)]


BALLAST = build(float(os.environ.get(ENV) or 0))
