"""A handler module that installs a Python signal handler of its own at import
(as a library might), in the parent: SIGWINCH appends a line to the file
named by OWN_SIGNAL_FILE."""

from __future__ import annotations

import os
import signal
import socket
from types import FrameType
from typing import Any


def _noted(signum: int, frame: FrameType | None) -> None:
    with open(os.environ["OWN_SIGNAL_FILE"], "a") as f:
        f.write(f"{signum}\n")


signal.signal(signal.SIGWINCH, _noted)


def echo(conn: socket.socket, addr: Any) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
