"""Spares seen from outside: which ones wait, what they greet with, and a
handler module whose versions tell an old image from a new one."""

from __future__ import annotations

import socket
from pathlib import Path

import psutil

from tests.helpers.clients import recv_until
from tests.helpers.processes import child_pids, idle_children, live_children
from tests.helpers.servers import ServerProcess, wait_until, write_module

POOL_SERVICES = "tests.helpers.pool_direct_services"


PID_ADDR_ECHO = f"{POOL_SERVICES}:pid_addr_echo"


def idle_spares(server: ServerProcess, count: int) -> set[int]:
    """The pids of *count* idle spares, once there are only those."""
    return idle_children(server, {"spare_children": count})


def fresh_spares(server: ServerProcess, count: int, used: set[int]) -> set[int]:
    """The pids of *count* idle spares, none of them in *used*, once the
    server has only those (the used ones exited and reaped)."""

    def settled() -> bool:
        live = live_children(server)
        return len(live) == count == len(child_pids(server.pid)) and not live & used

    wait_until(settled, 20, f"{count} fresh idle spares and nothing else")
    return live_children(server)


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie nobody reaped yet does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_greeting(sock: socket.socket) -> tuple[int, str]:
    """(pid, repr of client_address) from a pid_addr_echo greeting."""
    pid, _, addr = recv_until(sock, b"\n").decode().rstrip("\n").partition(" ")
    return int(pid), addr


def echo_line(sock: socket.socket, line: bytes) -> bytes:
    sock.sendall(line)
    return recv_until(sock, line[-1:])


VERSIONED = """
import os

def handler(conn, addr):
    conn.sendall(b"{version} %d\\n" % os.getpid())
    while data := conn.recv(100):
        conn.sendall(b"{version}:" + data)
"""


def write_versioned(directory: Path, version: str) -> None:
    write_module(directory / "versioned.py", VERSIONED.format(version=version))
