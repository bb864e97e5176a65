"""Handlers for tests/test_sandbox*.py: each tries one thing and says how it went.

The client sends one line, ``VERB ARGUMENT``; the handler replies
``ok DETAIL`` or ``error ERRNO_NAME`` (the handler's own error reply), so a
test sees exactly which call the sandbox refused and how.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any


def _attempt(verb: str, argument: str) -> str:
    if verb == "read":
        with open(argument, "rb") as f:
            return f"ok {len(f.read())} bytes"
    if verb == "write":
        with open(argument, "w") as f:
            f.write(f"written by {os.getpid()}")
        return "ok written"
    if verb == "mkdir":
        os.mkdir(argument)
        return "ok made"
    if verb == "connect":
        host, port = argument.rsplit(":", 1)
        # A numeric address and an explicit socket: no resolver, no file read.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as out:
            out.settimeout(5)
            out.connect((host, int(port)))
        return "ok connected"
    if verb == "pid":
        return f"ok {os.getpid()}"
    return "error unknown verb"


def attempt(conn: socket.socket, addr: Any) -> None:
    """Try what the client's line asks; reply with the outcome."""
    line = b""
    while not line.endswith(b"\n"):
        data = conn.recv(4096)
        if not data:
            return
        line += data
    verb, _, argument = line.decode().strip().partition(" ")
    if verb == "hold":  # the test looks at this child from outside, then closes
        conn.sendall(f"ok {os.getpid()}\n".encode())
        while conn.recv(4096):
            pass
        return
    try:
        reply = _attempt(verb, argument)
    except OSError as exc:
        reply = f"error {errno.errorcode.get(exc.errno or 0, str(exc.errno))}"
    conn.sendall(reply.encode() + b"\n")
