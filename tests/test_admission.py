"""Admission (forkserver/admission.py): the rules as units, then end to end.

The units check the arithmetic (CIDR matching, IPv6 grouping, per-source
counts, the token bucket on a fake clock, early-drop odds).  The end-to-end
tests start the real server and check what a refused client sees (the busy
message, then EOF, never a hang), what the log says, and that a refusal costs
no fork, in both serving modes: forked on accept and from a pool of spares.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from forkserver import admission
from forkserver.admission import Admission, parse_early_drop
from forkserver.config import Settings
from forkserver.server import LOG_INTERVAL
from tests.helpers.clients import (
    accept_queue_length,
    connect,
    read_pid_greeting,
    recv_to_eof,
    recv_until,
)
from tests.helpers.processes import child_pids, idle_children, reaped
from tests.helpers.servers import (
    FORK_ON_ACCEPT,
    MODES,
    POOL,
    ServerProcess,
    StartServer,
    config,
    wait_until,
)

V4, V6, UNIX = socket.AF_INET, socket.AF_INET6, socket.AF_UNIX
BUSY = "busy, try later\r\n"


def _config(handler: str, **settings: Any) -> str:
    """config() plus busy_message = BUSY (written by hand: config() does not
    escape control characters)."""
    return config(handler, **settings) + 'busy_message = "busy, try later\\r\\n"\n'


def _admission(**settings: Any) -> Admission:
    return Admission(Settings(**settings))


def _peer(family: int, host: str) -> Any:
    return (host, 40000) if family == V4 else (host, 40000, 0, 0)


# -- units: allow and deny ------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("rules", "family", "host", "expected"),
    [
        # IPv4 networks
        ({"deny": ["10.0.0.0/8"]}, V4, "10.255.0.1", "deny"),
        ({"deny": ["10.0.0.0/8"]}, V4, "11.0.0.1", None),
        ({"deny": ["10.0.0.0/8"]}, V4, "9.255.255.255", None),
        ({"deny": ["192.168.1.128/25"]}, V4, "192.168.1.128", "deny"),
        ({"deny": ["192.168.1.128/25"]}, V4, "192.168.1.255", "deny"),
        ({"deny": ["192.168.1.128/25"]}, V4, "192.168.1.127", None),
        ({"deny": ["203.0.113.7"]}, V4, "203.0.113.7", "deny"),  # a bare address is a /32
        ({"deny": ["203.0.113.7"]}, V4, "203.0.113.8", None),
        ({"deny": ["10.1.2.3/8"]}, V4, "10.9.9.9", "deny"),  # host bits are ignored
        ({"allow": ["10.0.0.0/8"]}, V4, "10.0.0.1", None),
        ({"allow": ["10.0.0.0/8"]}, V4, "127.0.0.1", "not_allowed"),
        ({"allow": ["10.0.0.0/8", "127.0.0.0/8"]}, V4, "127.0.0.1", None),
        # deny wins over allow
        ({"allow": ["10.0.0.0/8"], "deny": ["10.1.0.0/16"]}, V4, "10.1.2.3", "deny"),
        ({"allow": ["10.0.0.0/8"], "deny": ["10.1.0.0/16"]}, V4, "10.2.0.1", None),
        ({"allow": ["10.0.0.0/8"], "deny": ["10.1.0.0/16"]}, V4, "8.8.8.8", "not_allowed"),
        # IPv6 networks
        ({"deny": ["2001:db8::/32"]}, V6, "2001:db8:ffff::1", "deny"),
        ({"deny": ["2001:db8::/32"]}, V6, "2001:db9::1", None),
        ({"allow": ["::1/128"]}, V6, "::1", None),
        ({"allow": ["::1/128"]}, V6, "::2", "not_allowed"),
        ({"deny": ["fe80::/10"]}, V6, "fe80::1%lo", "deny"),  # a scoped address
        # IPv4 and IPv6 rules are separate...
        ({"deny": ["0.0.0.0/0"]}, V6, "2001:db8::1", None),
        ({"deny": ["::/0"]}, V4, "192.0.2.1", None),
        ({"allow": ["10.0.0.0/8"]}, V6, "2001:db8::1", "not_allowed"),
        # ...and an IPv4-mapped IPv6 client (dual-stack listener) is its IPv4 address
        ({"deny": ["127.0.0.0/8"]}, V6, "::ffff:127.0.0.1", "deny"),
        ({"allow": ["127.0.0.0/8"]}, V6, "::ffff:127.0.0.1", None),
        ({"allow": ["127.0.0.0/8"]}, V6, "::ffff:10.0.0.1", "not_allowed"),
        # a rule written as an IPv4-mapped network matches the IPv4 clients in it
        ({"deny": ["::ffff:10.0.0.0/104"]}, V4, "10.9.9.9", "deny"),
        ({"deny": ["::ffff:10.0.0.0/104"]}, V6, "::ffff:10.1.1.1", "deny"),
        ({"deny": ["::ffff:10.0.0.0/104"]}, V4, "11.0.0.1", None),
        ({"deny": ["::ffff:0.0.0.0/96"]}, V4, "192.0.2.1", "deny"),
    ],
)
def test_allow_and_deny_networks(
    rules: dict[str, list[str]], family: int, host: str, expected: str | None
) -> None:
    assert _admission(**rules).check(family, _peer(family, host), 0) == expected


@pytest.mark.timeout(10)
def test_unix_socket_clients_are_never_filtered() -> None:
    rules = _admission(
        deny=["0.0.0.0/0", "::/0"], allow=["10.0.0.0/8"], per_source_limit=1, per_source_rate=1
    )
    assert rules.source(UNIX, "") is None
    for _ in range(5):
        assert rules.check(UNIX, "", 0) is None
        rules.opened(None)  # a Unix client counts against nothing
    rules.closed(None)


@pytest.mark.timeout(10)
def test_nothing_enabled_by_default() -> None:
    assert not _admission().enabled
    assert _admission(deny=["10.0.0.0/8"]).enabled
    assert _admission(per_source_rate=5).enabled


# -- units: sources and per-source limits -----------------------------------------


@pytest.mark.timeout(10)
def test_ipv6_clients_count_per_prefix_and_mapped_ones_as_ipv4() -> None:
    def key(rules: Admission, family: int, host: str) -> Any:
        return rules.source(family, _peer(family, host))

    by64 = _admission(ipv6_prefix=64)
    assert key(by64, V6, "2001:db8:0:1::1") == key(by64, V6, "2001:db8:0:1:ffff:ffff:ffff:ffff")
    assert key(by64, V6, "2001:db8:0:1::1") != key(by64, V6, "2001:db8:0:2::1")
    by48 = _admission(ipv6_prefix=48)
    assert key(by48, V6, "2001:db8:0:1::1") == key(by48, V6, "2001:db8:0:ffff::1")
    assert key(by48, V6, "2001:db8:0::1") != key(by48, V6, "2001:db8:1::1")
    by128 = _admission(ipv6_prefix=128)
    assert key(by128, V6, "2001:db8::1") != key(by128, V6, "2001:db8::2")
    # IPv4 addresses are never grouped; a mapped one is the same source as itself.
    assert key(by48, V4, "192.0.2.1") != key(by48, V4, "192.0.2.2")
    assert key(by64, V6, "::ffff:192.0.2.1") == key(by64, V4, "192.0.2.1")


@pytest.mark.timeout(10)
def test_per_source_limit_counts_opened_and_closed() -> None:
    rules = _admission(per_source_limit=2)
    a, b = _peer(V4, "192.0.2.1"), _peer(V4, "192.0.2.2")
    key = rules.source(V4, a)
    assert rules.check(V4, a, 0) is None
    rules.opened(key)
    assert rules.check(V4, a, 0) is None
    rules.opened(key)
    assert rules.check(V4, a, 0) == "per_source_limit"
    assert rules.check(V4, b, 0) is None  # another source is not affected
    rules.closed(key)
    assert rules.check(V4, a, 0) is None
    rules.opened(key)
    assert rules.check(V4, a, 0) == "per_source_limit"
    for _ in range(4):  # more closes than opens (say, a spare died) must not go negative
        rules.closed(key)
    rules.opened(key)
    rules.opened(key)
    assert rules.check(V4, a, 0) == "per_source_limit"


@pytest.mark.timeout(10)
def test_per_source_limit_groups_an_ipv6_prefix() -> None:
    rules = _admission(per_source_limit=1, ipv6_prefix=64)
    first = _peer(V6, "2001:db8:0:1::1")
    rules.opened(rules.source(V6, first))
    assert rules.check(V6, _peer(V6, "2001:db8:0:1::99"), 0) == "per_source_limit"
    assert rules.check(V6, _peer(V6, "2001:db8:0:2::1"), 0) is None


# -- units: the token bucket ----------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    """A fake time.monotonic for admission.py only."""
    fake = _Clock()
    monkeypatch.setattr(admission, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def _takes(rules: Admission, host: str, n: int) -> list[str | None]:
    return [rules.check(V4, _peer(V4, host), 0) for _ in range(n)]


@pytest.mark.timeout(10)
def test_token_bucket_allows_the_burst_then_the_rate(clock: _Clock) -> None:
    rules = _admission(per_source_rate=2, per_source_burst=3)
    assert _takes(rules, "192.0.2.1", 4) == [None, None, None, "per_source_rate"]
    assert _takes(rules, "192.0.2.2", 3) == [None, None, None]  # its own bucket
    clock.now += 0.25  # half a token: still refused
    assert _takes(rules, "192.0.2.1", 1) == ["per_source_rate"]
    clock.now += 0.25  # a whole token, the refused attempt did not spend the half
    assert _takes(rules, "192.0.2.1", 2) == [None, "per_source_rate"]
    clock.now += 1.0  # two tokens
    assert _takes(rules, "192.0.2.1", 3) == [None, None, "per_source_rate"]
    clock.now += 3600  # refills up to the burst, no more
    assert _takes(rules, "192.0.2.1", 4) == [None, None, None, "per_source_rate"]


@pytest.mark.timeout(10)
def test_token_bucket_with_a_fractional_rate(clock: _Clock) -> None:
    rules = _admission(per_source_rate=0.5, per_source_burst=1)
    assert _takes(rules, "192.0.2.1", 2) == [None, "per_source_rate"]
    clock.now += 1.5
    assert _takes(rules, "192.0.2.1", 1) == ["per_source_rate"]
    clock.now += 0.5
    assert _takes(rules, "192.0.2.1", 2) == [None, "per_source_rate"]


@pytest.mark.timeout(10)
def test_buckets_of_many_sources_stay_bounded(
    clock: _Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission, "_MAX_BUCKETS", 8)
    rules = _admission(per_source_rate=1, per_source_burst=2)
    for i in range(200):  # a new source every second: older buckets have refilled
        clock.now += 1.0
        assert _takes(rules, f"10.0.{i // 256}.{i % 256}", 1) == [None]
        assert len(rules._buckets) <= 9
    # A source whose bucket was forgotten starts full again: same as refilled.
    assert _takes(rules, "10.0.0.0", 3) == [None, None, "per_source_rate"]


# -- units: random early drop -----------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", None),
        ("10:30:100", (10, 30, 100)),
        ("0:0:1", (0, 0, 1)),
        ("1:100:2", (1, 100, 2)),
    ],
)
def test_parse_early_drop(value: str, expected: tuple[int, int, int] | None) -> None:
    assert parse_early_drop(value) == expected


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "value", ["10:30", "10:30:100:1", "a:b:c", "10:30:10", "20:30:10", "10:101:100", "-1:30:100"]
)
def test_parse_early_drop_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_early_drop(value)


def _drop_rate(rules: Admission, alive: int, trials: int) -> float:
    refused = [rules.check(V4, _peer(V4, "192.0.2.1"), alive) for _ in range(trials)]
    assert set(refused) <= {None, "early_drop"}
    return refused.count("early_drop") / trials


@pytest.mark.timeout(10)
def test_early_drop_probability_rises_from_rate_at_start_to_all_at_full() -> None:
    rules = _admission(early_drop="2:30:6")
    assert _drop_rate(rules, 0, 2000) == 0.0
    assert _drop_rate(rules, 1, 2000) == 0.0  # below start: never
    for alive in (6, 7, 1000):  # at full and beyond: always
        assert _drop_rate(rules, alive, 2000) == 1.0
    # Halfway: 30% + 70% * 2/4 = 65%; 4000 trials put it within a few points.
    assert 0.55 <= _drop_rate(rules, 4, 4000) <= 0.75
    assert 0.20 <= _drop_rate(rules, 2, 4000) <= 0.40  # at start: the rate
    zero = _admission(early_drop="5:0:10")
    assert _drop_rate(zero, 5, 2000) == 0.0
    assert _drop_rate(zero, 10, 2000) == 1.0


@pytest.mark.timeout(10)
def test_early_drop_applies_to_every_client() -> None:
    rules = _admission(early_drop="0:100:1")
    assert rules.check(V4, _peer(V4, "192.0.2.1"), 1) == "early_drop"
    assert rules.check(V6, _peer(V6, "2001:db8::1"), 1) == "early_drop"
    assert rules.check(UNIX, "", 1) == "early_drop"


# -- end to end ---------------------------------------------------------------------------


def _refused(address: tuple[str, int], message: str = BUSY, source: str = "") -> int:
    """Connect (from *source*, if given), expect *message* then EOF (never a
    hang); returns the local port."""
    with _connect_from(source, address) if source else connect(address, timeout=5) as sock:
        port = int(sock.getsockname()[1])
        assert recv_to_eof(sock, timeout=5) == message.encode()
    return port


def _connect_from(source: str, address: tuple[str, int]) -> socket.socket:
    """A client connected from loopback address *source* (all of 127/8 is ours)."""
    return socket.create_connection(address, timeout=10, source_address=(source, 0))


def _served(address: tuple[str, int], source: str = "") -> tuple[socket.socket, int]:
    """Connect (from *source*, if given) and read a PidEcho greeting: the open
    socket and the child's pid."""
    sock = _connect_from(source, address) if source else connect(address, timeout=10)
    try:
        greeting = recv_until(sock, b"\n")
        assert greeting.rstrip(b"\n").isdigit(), f"not served: got {greeting!r}"
        return sock, int(greeting)
    except BaseException:
        sock.close()
        raise


def _release(sock: socket.socket, pid: int) -> None:
    """Close a served client and wait until its child has been reaped."""
    sock.close()
    wait_until(lambda: reaped(pid), 10, f"child {pid} to be reaped")


def _refusal_lines(server: ServerProcess, reason: str) -> list[str]:
    rx = re.compile(rf"\[{server.pid}\] WARNING forkserver\.[\w.]+: refused \S+: {reason}\b")
    return [line for line in server.lines if rx.search(line)]


class _ChildSampler:
    """Watches a server's child pids in a thread: every pid seen while it ran."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.seen: set[int] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set() and self.samples < 2_000_000:
            self.seen |= child_pids(self.server.pid)
            self.samples += 1

    def __enter__(self) -> _ChildSampler:
        self._thread.start()
        wait_until(lambda: self.samples > 0, 10, "the sampler to start")
        return self

    def __exit__(self, *exc: object) -> None:
        taken = self.samples
        wait_until(lambda: self.samples > taken + 2, 10, "a last sample")
        self._stop.set()
        self._thread.join(10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_denied_clients_get_the_busy_message_and_cost_no_fork(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(_config("tests.helpers.services:PidEcho", deny=["127.0.0.0/8"], **mode))
    spares = idle_children(server, mode)
    with _ChildSampler(server) as sampler:
        ports = [_refused(server.tcp_address) for _ in range(30)]
    # No child was forked for them, and no spare was used up.
    assert sampler.seen == spares, f"children appeared: {sampler.seen - spares}"
    assert child_pids(server.pid) == spares
    assert server.stop() == 0  # the log is complete
    lines = _refusal_lines(server, "deny")
    assert lines, server.log
    assert f"refused 127.0.0.1:{ports[0]}: deny" in lines[0]
    assert len(lines) == 1, "30 refusals in one interval: one log line"


@pytest.mark.timeout(30)
def test_refused_client_that_speaks_first_still_gets_the_message(
    start_server: StartServer,
) -> None:
    # Client-speaks-first protocols (HTTP): the request is unread when the
    # parent closes, so the kernel may end with a reset; the message must
    # still arrive whole, and the client must not hang.
    server = start_server(_config("tests.helpers.services:PidEcho", deny=["127.0.0.0/8"]))
    for _ in range(20):
        with connect(server.tcp_address, timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            try:
                while chunk := sock.recv(4096):
                    data += chunk
            except ConnectionResetError:
                pass  # after the message, a reset is as good as a close
        assert data == BUSY.encode()
    assert not child_pids(server.pid)
    assert server.stop() == 0


@pytest.mark.timeout(30)
def test_allow_list_refuses_everyone_else(start_server: StartServer) -> None:
    server = start_server(_config("tests.helpers.services:PidEcho", allow=["10.0.0.0/8"]))
    port = _refused(server.tcp_address)
    server.wait_for_log(rf"refused 127\.0\.0\.1:{port}: not_allowed$")
    assert not child_pids(server.pid)
    assert server.stop() == 0


@pytest.mark.timeout(30)
def test_allow_and_deny_tell_real_peers_apart(start_server: StartServer) -> None:
    # Clients from 127.0.0.1, .2 and .3: allowed /30, minus a denied /32.
    server = start_server(
        _config("tests.helpers.services:PidEcho", allow=["127.0.0.0/30"], deny=["127.0.0.2/32"])
    )
    address = server.tcp_address
    for source in ("127.0.0.1", "127.0.0.3"):
        sock, _ = _served(address, source)
        sock.close()
    port = _refused(address, source="127.0.0.2")
    server.wait_for_log(rf"refused 127\.0\.0\.2:{port}: deny$")
    port = _refused(address, source="127.0.0.4")
    server.wait_for_log(rf"refused 127\.0\.0\.4:{port}: not_allowed$")
    assert server.stop() == 0


@pytest.mark.timeout(30)
def test_dual_stack_listener_filters_mapped_ipv4_clients_as_ipv4(
    start_server: StartServer,
) -> None:
    # One "::" listener serves both families; IPv4 clients arrive as ::ffff:a.b.c.d.
    server = start_server(
        _config("tests.helpers.services:PidEcho", host="::", deny=["127.0.0.0/8"])
    )
    port = server.tcp_address[1]
    refused_port = _refused(("127.0.0.1", port))
    server.wait_for_log(rf"refused \S*127\.0\.0\.1\S*:{refused_port}: deny$")
    sock, _ = _served(("::1", port))
    with sock:
        sock.sendall(b"over v6\n")
        sock.shutdown(socket.SHUT_WR)
        assert recv_to_eof(sock) == b"over v6\n"
    assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_per_source_limit_refuses_a_third_connection_until_one_closes(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(_config("tests.helpers.services:PidEcho", per_source_limit=2, **mode))
    idle_children(server, mode)
    address = server.tcp_address
    held = [_served(address) for _ in range(2)]
    try:
        for _ in range(3):
            _refused(address)
        server.wait_for_log(r"refused 127\.0\.0\.1:\d+: per_source_limit$")
        held.append(_served(address, source="127.0.0.2"))  # another source: its own count
        _release(*held.pop(0))
        again = _served(address)  # a slot for this source is free again
        held.append(again)
        _refused(address)  # and the limit holds again
    finally:
        for sock, _ in held:
            sock.close()
    assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_per_source_rate_refuses_a_burst_and_other_sources_are_served(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    rate, burst = 1.0, 2
    server = start_server(
        _config(
            "tests.helpers.services:PidEcho",
            host=["127.0.0.1", "::1"],
            per_source_rate=rate,
            per_source_burst=burst,
            **mode,
        )
    )
    idle_children(server, mode)
    v4 = server.tcp_address
    [v6_port] = [int(a.rpartition(":")[2]) for a in server.listening if a.startswith("[::1]")]
    v6 = ("::1", v6_port)
    started = time.monotonic()
    outcomes: list[str] = []
    held: list[socket.socket] = []
    try:
        for _ in range(10):
            sock = connect(v4, timeout=5)
            held.append(sock)
            first = sock.recv(64)
            if first == BUSY.encode():
                assert recv_to_eof(sock, timeout=5) == b""
                outcomes.append("refused")
            else:
                assert first.rstrip(b"\n").isdigit(), first  # a PidEcho greeting
                outcomes.append("served")
        span = time.monotonic() - started
        # The burst is served; then one more per second at most, while it lasted.
        served = outcomes.count("served")
        assert outcomes[:burst] == ["served"] * burst, outcomes
        assert burst <= served <= burst + int(rate * span), (outcomes, span)
        # Another source has its own bucket.
        sock, _ = _served(v6)
        held.append(sock)
    finally:
        for sock in held:
            sock.close()
    assert server.stop() == 0  # the log is complete
    lines = _refusal_lines(server, "per_source_rate")
    assert len(lines) == 1, f"{10 - served} refusals in one interval: one line\n{server.log}"


@pytest.mark.timeout(60)
def test_refusal_log_lines_report_how_many_were_held_back(start_server: StartServer) -> None:
    # One line per reason per LOG_INTERVAL; the next one counts the refusals
    # not logged meanwhile.  (This test waits out one interval.)
    server = start_server(config("tests.helpers.services:PidEcho", deny=["127.0.0.0/8"]))
    address = server.tcp_address
    for _ in range(7):
        _refused(address, "")
    after_burst = time.monotonic()
    server.wait_for_log(r"refused 127\.0\.0\.1:\d+: deny$")
    time.sleep(LOG_INTERVAL + 0.2 - (time.monotonic() - after_burst))  # not readiness: time
    port = _refused(address, "")
    line = server.wait_for_log(rf"refused 127\.0\.0\.1:{port}: deny")
    assert line.endswith(": deny (6 more refused for this reason since the last report)"), line
    assert server.stop() == 0  # the log is complete
    assert len(_refusal_lines(server, "deny")) == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_when_full_refuse_answers_busy_at_once(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    settings = {"max_children": 1, "spare_children": min(1, mode.get("spare_children", 0))}
    server = start_server(_config("tests.helpers.services:PidEcho", when_full="refuse", **settings))
    idle_children(server, settings)
    address = server.tcp_address
    sock, pid = _served(address)
    with sock:
        ports = [_refused(address) for _ in range(3)]  # at once: never left waiting
        server.wait_for_log(rf"refused 127\.0\.0\.1:{ports[0]}: full$")
        sock.sendall(b"still mine\n")
        assert sock.recv(64) == b"still mine\n"
    wait_until(lambda: reaped(pid), 10, "the child to be reaped")
    idle_children(server, settings)
    sock, _ = _served(address)  # a free slot: served again
    sock.close()
    assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_when_full_wait_leaves_the_client_in_the_backlog_until_a_slot_frees(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    settings = {"max_children": 1, "spare_children": min(1, mode.get("spare_children", 0))}
    server = start_server(_config("tests.helpers.services:PidEcho", **settings))
    idle_children(server, settings)
    address = server.tcp_address
    sock, pid = _served(address)
    with connect(address, timeout=10) as waiting:
        wait_until(lambda: accept_queue_length(address[1]) == 1, 10, "a client in the backlog")
        sock.close()  # the slot frees: the waiting client gets the next child
        assert read_pid_greeting(waiting) != pid
        waiting.sendall(b"late\n")
        assert waiting.recv(64) == b"late\n"
    assert "refused" not in server.log
    assert server.stop() == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(FORK_ON_ACCEPT, id="fork"),
        pytest.param(POOL, id="pool"),
    ],
)
def test_early_drop_refuses_everything_once_start_children_serve(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = start_server(_config("tests.helpers.services:PidEcho", early_drop="1:100:2", **mode))
    idle_children(server, mode)
    address = server.tcp_address
    sock, pid = _served(address)  # no child serving yet: admitted
    with sock:
        for _ in range(5):
            _refused(address)  # one child serves: past start, at 100%
        server.wait_for_log(r"refused 127\.0\.0\.1:\d+: early_drop$")
    wait_until(lambda: reaped(pid), 10, "the child to be reaped")
    idle_children(server, mode)
    sock, _ = _served(address)
    sock.close()
    assert server.stop() == 0
