"""Who gets a child: decided in the parent right after accept(), before any fork.

A refused connection costs the parent an accept() and a close(), never a
fork.  The rules, in the order they are checked:

1. ``deny`` and ``allow`` networks;
2. random early drop (``early_drop``, sshd's MaxStartups): past ``start``
   children, refuse with a probability rising from ``rate``% to 100% at
   ``full``;
3. ``per_source_limit``: connections one source may have served at once;
4. ``per_source_rate``: a token bucket per source, so one flooding client
   is refused while everyone else is served (unlike xinetd's ``cps``, which
   closes the listener for all).

A *source* is a client address; IPv6 clients are grouped by ``ipv6_prefix``
(one /64 is usually one host or one customer), and IPv4-mapped IPv6 addresses
(from a dual-stack ``::`` listener) count as the IPv4 address.  Unix-socket
clients have no address and are never filtered.
"""

from __future__ import annotations

import os
import socket
import time

# The config's pure parser; the config checks early_drop with it too.
from .config.values import parse_early_drop

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .config import Settings

__all__ = ["Admission", "parse_early_drop"]

_V4_MAPPED = 0xFFFF << 32
_MAX_BUCKETS = 10_000  # beyond this, forget sources whose bucket is full again


def _address_int(family: int, host: str) -> tuple[int, int]:
    """(4 or 6, the address as an int); IPv4-mapped IPv6 comes back as IPv4."""
    if family == socket.AF_INET:
        return 4, int.from_bytes(socket.inet_aton(host), "big")
    value = int.from_bytes(socket.inet_pton(socket.AF_INET6, host.partition("%")[0]), "big")
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


class _Networks:
    """CIDR membership with integer arithmetic, parsed once at start."""

    def __init__(self, cidrs: tuple[str, ...]) -> None:
        import ipaddress

        self._nets: list[tuple[int, int, int]] = []  # (version, shift, network >> shift)
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            version, bits = net.version, net.max_prefixlen
            base = int(net.network_address)
            if version == 6 and base >> 32 == 0xFFFF and net.prefixlen >= 96:
                version, bits, base = 4, 32, base & 0xFFFFFFFF  # written as ::ffff:a.b.c.d
                shift = 128 - net.prefixlen
            else:
                shift = bits - net.prefixlen
            self._nets.append((version, shift, base >> shift))

    def __contains__(self, address: tuple[int, int]) -> bool:
        version, value = address
        return any(v == version and value >> shift == top for v, shift, top in self._nets)


class Admission:
    """The parent's admission rules and the per-source state they need."""

    def __init__(self, settings: Settings) -> None:
        s = settings
        self._allow = _Networks(s.allow) if s.allow else None
        self._deny = _Networks(s.deny) if s.deny else None
        self._early_drop = parse_early_drop(s.early_drop)
        self._limit = s.per_source_limit
        self._rate = s.per_source_rate
        self._burst = float(s.per_source_burst)
        self._v6_shift = 128 - s.ipv6_prefix
        # Per source: connections being served, and [tokens, last refill time].
        self._live: dict[tuple[int, int], int] = {}
        self._buckets: dict[tuple[int, int], list[float]] = {}
        self.enabled = bool(
            self._allow or self._deny or self._early_drop or self._limit or self._rate
        )

    def source(self, family: int, peer: Any) -> tuple[int, int] | None:
        """The source a client counts as, or None for a Unix-socket client."""
        if family not in (socket.AF_INET, socket.AF_INET6):
            return None
        version, value = _address_int(family, peer[0])
        if version == 6:
            value >>= self._v6_shift
        return version, value

    def check(self, family: int, peer: Any, busy: int) -> str | None:
        """Why this connection is refused, or None to serve it.  *busy* is
        the number of children serving a connection now."""
        if self._early_drop is not None:
            start, rate, full = self._early_drop
            if busy >= start:
                chance = rate + (100 - rate) * (busy - start) / (full - start)
                if int.from_bytes(os.urandom(2), "big") * 100 < chance * 65536:
                    return "early_drop"
        if family not in (socket.AF_INET, socket.AF_INET6):
            return None
        address = _address_int(family, peer[0])
        if self._deny is not None and address in self._deny:
            return "deny"
        if self._allow is not None and address not in self._allow:
            return "not_allowed"
        key = self.source(family, peer)
        assert key is not None
        if self._limit and self._live.get(key, 0) >= self._limit:
            return "per_source_limit"
        if self._rate and not self._take_token(key):
            return "per_source_rate"
        return None

    def _take_token(self, key: tuple[int, int]) -> bool:
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._forget_full_buckets(now)
            self._buckets[key] = bucket = [self._burst, now]
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _forget_full_buckets(self, now: float) -> None:
        """A bucket that has refilled holds nothing a new one would not."""
        full = [
            k for k, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self._rate >= self._burst
        ]  # fmt: skip
        for key in full:
            del self._buckets[key]

    def opened(self, key: tuple[int, int] | None) -> None:
        """A connection from *key* got a child."""
        if key is not None and self._limit:
            self._live[key] = self._live.get(key, 0) + 1

    def closed(self, key: tuple[int, int] | None) -> None:
        """A connection from *key* ended (its child was reaped)."""
        if key is not None and self._limit:
            left = self._live.get(key, 0) - 1
            if left > 0:
                self._live[key] = left
            else:
                self._live.pop(key, None)
