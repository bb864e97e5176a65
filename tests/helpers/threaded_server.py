"""A program that serves from a thread, as a library user would, while
another thread holds a lock: ``python -m tests.helpers.threaded_server HOLD
[SETTINGS_JSON]``, for tests/test_threads.py.

It logs through stdlib logging in forkserver's format, so the ``forkserver``
fixture reads its "listening on" and "forkserver ready" lines.  Once ready,
another thread takes HOLD and keeps it until SIGUSR1:

* ``logging-handler``: the lock of the handler that writes to stderr (as
  a thread in the middle of writing a record holds it);
* ``logging-module``: logging's module lock (logging's own before-fork hook
  takes it, so every fork waits until it is let go);
* ``import``: it sits inside the import of a module (``slow_import``);
* ``none``: nothing;

and then the program prints "holding HOLD".  On SIGTERM: ``shutdown()``,
exit 0.  Each child (:func:`report`) logs a line through logging, imports a
module nobody has imported yet, and answers one line: its pid and whether
``slow_import`` was half imported when it was forked; then it echoes to EOF.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import forkserver
from forkserver import log

HOLDS = ("logging-handler", "logging-module", "import", "none")
READY = threading.Event()  # the parent logged "forkserver ready"
INSIDE = threading.Event()  # the holder took its lock, or is inside the import
RELEASE = threading.Event()  # SIGUSR1: let go

# Imported by the holder: it stops halfway until RELEASE, then sets DONE.
SLOW_IMPORT = """\
import sys
main = sys.modules["__main__"]
main.INSIDE.set()
main.RELEASE.wait()
DONE = True
"""


def report(conn: socket.socket, addr: Any) -> None:
    """The handler: what a child could do, said back to the client."""
    logging.getLogger("threaded_server.child").info("child %d serving", os.getpid())
    import fresh_in_child  # type: ignore[import-not-found]  # first imported here

    half = sys.modules.get("slow_import")
    half_imported = half is not None and not hasattr(half, "DONE")
    conn.sendall(f"{os.getpid()} {fresh_in_child.NAME} {half_imported}\n".encode())
    while data := conn.recv(65536):
        conn.sendall(data)


def hold(what: str) -> None:
    """In its own thread: take *what* until RELEASE."""
    if what == "logging-handler":
        handler = logging.getLogger().handlers[0]
        assert handler.lock is not None
        with handler.lock:
            INSIDE.set()
            RELEASE.wait()
    elif what == "logging-module":
        with logging._lock:  # type: ignore[attr-defined]
            INSIDE.set()
            RELEASE.wait()
    elif what == "import":
        import slow_import  # type: ignore[import-not-found]  # noqa: F401
    else:
        INSIDE.set()
        RELEASE.wait()


class _SeesReady(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("forkserver ready"):
            READY.set()
        return True


def main(what: str, settings: dict[str, Any], modules: Path) -> int:
    logging.basicConfig(level=logging.INFO, format=log.FORMAT, stream=sys.stderr)
    logging.getLogger().handlers[0].addFilter(_SeesReady())
    (modules / "slow_import.py").write_text(SLOW_IMPORT)
    (modules / "fresh_in_child.py").write_text('NAME = "fresh"\n')
    sys.path.insert(0, str(modules))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGUSR1, lambda signum, frame: RELEASE.set())
    server = forkserver.Server(("127.0.0.1", 0), report, **settings)
    serving = threading.Thread(target=server.serve_forever, name="serve_forever")
    serving.start()
    holder = threading.Thread(target=hold, args=(what,), name="holder")
    try:
        # The parent logs "forkserver ready" through logging: take the lock after it.
        while not READY.wait(0.05):
            if stop.is_set() or not serving.is_alive():
                return 1
        holder.start()
        INSIDE.wait()
        print(f"holding {what}", flush=True)
        # With a timeout: a signal the kernel gave another thread does not
        # interrupt the main thread's wait, and Python runs handlers only in
        # the main thread, when it next runs (a plain wait() missed SIGTERM
        # about 1 time in 4).
        while not stop.wait(0.1):
            pass
    finally:
        RELEASE.set()
        if holder.ident is not None:
            holder.join()
        server.shutdown()
        serving.join()
        server.server_close()
    return 0


if __name__ == "__main__":
    assert sys.argv[1] in HOLDS, f"HOLD is one of {HOLDS}"
    with tempfile.TemporaryDirectory(prefix="threaded_server-") as where:
        settings = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
        raise SystemExit(main(sys.argv[1], settings, Path(where)))
