"""What a value must be beyond its type: networks, early drop, accounts, addresses.

Each ``check_*`` returns what is wrong with a value, for its key's config
error, or None.  The parsing here is pure and cheap to import, so the runtime
uses it too (``admission`` parses ``early_drop`` with :func:`parse_early_drop`):
runtime modules import the config's parsing, never the other way round.
"""

from __future__ import annotations

from ..addresses import address_problem, parse_address
from .text import show

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "check_account",
    "check_address",
    "check_early_drop",
    "check_hosts",
    "check_networks",
    "parse_early_drop",
]


def check_networks(values: tuple[str, ...]) -> str | None:
    """Every value an IPv4 or IPv6 network in CIDR notation."""
    import ipaddress

    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f'{show(value)} is not an IPv4 or IPv6 network (like "10.0.0.0/8" or "::1")'
    return None


def parse_early_drop(value: str) -> tuple[int, int, int] | None:
    """sshd's MaxStartups "start:rate:full", or None for "" (off); ValueError if bad."""
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(value)
    start, rate, full = (int(p) for p in parts)
    if not (start < full and 0 <= rate <= 100):
        raise ValueError(value)
    return start, rate, full


def check_early_drop(value: str) -> str | None:
    try:
        parse_early_drop(value)
    except ValueError:
        return f'{show(value)} is not "start:rate:full" with start < full and rate 0-100'
    return None


def check_account(kind: str) -> Callable[[str], str | None]:
    """The check of a "user" or "group" name: it must exist on this system."""

    def check(value: str) -> str | None:
        if not value:
            return None
        import grp
        import pwd

        try:
            (pwd.getpwnam if kind == "user" else grp.getgrnam)(value)
        except (KeyError, ValueError):  # ValueError: a NUL, if a caller did not check
            return f"no {kind} {show(value)} on this system"
        return None

    return check


def check_hosts(values: tuple[str, ...]) -> str | None:
    """Host names or addresses that getaddrinfo() can take: it encodes a name with
    IDNA, which refuses an empty label ("a..b") or one of over 63 characters."""
    for host in values:
        try:
            host.encode("idna")
        except UnicodeError:
            return f"{show(host)} is not a host name or IP address"
    return None


def check_address(example_port: int) -> Callable[[str], str | None]:
    """The check of a "HOST:PORT" setting; its message suggests *example_port*."""

    def check(value: str) -> str | None:
        return address_problem(value, example_port) or check_hosts((parse_address(value)[0],))

    return check
