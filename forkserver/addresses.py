"""Addresses as text: "HOST:PORT", "[V6]:PORT" and "unix:PATH", parsed and formatted.

Pure string work, shared by the config's checks, the listeners, the metrics
endpoint and the log lines; it imports nothing the serving parent has not
imported already, so any module may use it.
"""

from __future__ import annotations

import socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "BIND_FORMS",
    "address_problem",
    "format_address",
    "host_port",
    "listen_key",
    "parse_address",
    "parse_bind",
]

# What --bind accepts, as gunicorn's --bind does, plus a prefix for UDP and TLS.
BIND_FORMS = "HOST:PORT, [V6]:PORT, unix:PATH, udp:HOST:PORT, tls:HOST:PORT or tls:unix:PATH"


def host_port(host: str, port: int) -> str:
    """*host* and *port* as "HOST:PORT"; an IPv6 host goes in brackets: "[::1]:PORT"."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_address(family: int, address: object) -> str:
    """HOST:PORT, [V6]:PORT or unix:PATH, as logged and reported."""
    if family == socket.AF_UNIX:
        return f"unix:{address!s}" if address else "unix:(unnamed)"
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    return str(address)


def parse_address(text: str) -> tuple[str, int]:
    """``("HOST", PORT)`` from "HOST:PORT" or "[V6]:PORT"; raises ValueError.

    An empty HOST (":9100") means every IPv4 address, as for ``host``.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f'"{text}": an IPv6 address needs brackets, like "[::1]:9100"')
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f'"{text}" is not "HOST:PORT" with a port 0-65535')
    return host, int(port)


def address_problem(value: str, example_port: int) -> str | None:
    """What is wrong with a "HOST:PORT" setting, for its config error, or None."""
    try:
        parse_address(value)
    except ValueError:
        from .config.text import show  # the value escaped and cut: it may hold anything

        like = f'"127.0.0.1:{example_port}" or "[::1]:{example_port}"'
        return f'{show(value)} is not "HOST:PORT" (like {like})'
    return None


def parse_bind(text: str) -> tuple[str, str, bool]:
    """``(kind, address, tls)`` from a ``--bind`` value; *kind* is "tcp", "udp" or "unix",
    as a ``[[listen]]`` table's key.  Raises ValueError saying what is wrong."""
    tls = text.startswith("tls:")
    rest = text.removeprefix("tls:")
    kind = "unix" if rest.startswith("unix:") else "udp" if rest.startswith("udp:") else "tcp"
    address = rest.removeprefix(f"{kind}:") if kind != "tcp" else rest
    if tls and kind == "udp":
        raise ValueError("TLS is for streams (tcp, unix), not udp")
    if not address:
        raise ValueError(f"no address after {kind}:")
    if kind != "unix":
        try:
            parse_address(address)
        except ValueError:  # its message repeats the text: the caller shows it, escaped
            raise ValueError("not HOST:PORT with a port 0-65535") from None
    return kind, address, tls


def listen_key(spec: Any) -> tuple[str, ...]:
    """What identifies a configured listener (config.Listen) across a reload:
    ("tcp", host, port), ("udp", host, port), ("unix", path) or ("unixgram", path)."""
    if spec.unix:
        return ("unix", spec.unix)
    if spec.unix_datagram:
        return ("unixgram", spec.unix_datagram)
    host, port = parse_address(spec.tcp or spec.udp)
    return ("tcp" if spec.tcp else "udp", host, str(port))
