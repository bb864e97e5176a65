"""The HAProxy recipe end to end: HAProxy in TCP mode in front of three
forkserver instances that speak the PROXY protocol (v2, health checks included).

Each instance runs ``tests.helpers.transport_services:tagged_reply`` with its own tag,
so a reply says which instance served it and which client address the
handler saw.  HAProxy's frontend is a socket this test binds on port 0 and
hands over as an inherited descriptor (``bind fd@N``): no port is guessed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from forkserver.testing.leaks import kill_everything
from tests.helpers.clients import recv_to_eof
from tests.helpers.metrics import metrics_url
from tests.helpers.proxy import v1
from tests.helpers.servers import ROOT, ServerProcess, StartServer, wait_until


def _find_haproxy() -> str | None:
    # /usr/sbin is often not on a normal user's PATH.
    found = shutil.which("haproxy")
    for candidate in (found, "/usr/sbin/haproxy", "/usr/local/sbin/haproxy"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


HAPROXY = _find_haproxy()
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed: these tests run it in front of forkserver"
)

TAGGED = "tests.helpers.transport_services:tagged_reply"
# A line the instances log at WARNING or above: a PROXY header they could not
# read, a handler that failed, a child that died.
COMPLAINT = re.compile(r"\[\d+\] (WARNING|ERROR|CRITICAL) ")
ACCESS = re.compile(r"forkserver\.access: (\S+) pid \d+ .* exit status (\d+)")


# -- forkserver instances ------------------------------------------------------------


def start_instances(
    start_server: StartServer, count: int = 3, metrics: bool = False
) -> list[ServerProcess]:
    """*count* instances, tagged s0, s1, ..., each with one PROXY protocol
    listener (and with *metrics*, a metrics listener for /healthz)."""
    config = (
        "[server]\naccess_log = true\ngraceful_timeout = 10\n"
        + ('metrics = "127.0.0.1:0"\n' if metrics else "")
        + f'[[listen]]\ntcp = "127.0.0.1:0"\nhandler = "{TAGGED}"\nproxy_protocol = true\n'
    )
    return [start_server(config, env={"TRANSPORT_TEST_TAG": f"s{i}"}) for i in range(count)]


def port_of(server: ServerProcess) -> int:
    return server.tcp_address[1]


def complaints(server: ServerProcess) -> list[str]:
    return [line for line in server.lines if COMPLAINT.search(line)]


def access_lines(server: ServerProcess) -> list[tuple[str, int]]:
    """(peer, exit status) of every connection the instance has served."""
    return [(m[1], int(m[2])) for line in server.lines if (m := ACCESS.search(line))]


def _served(server: ServerProcess, count: int) -> Callable[[], bool]:
    return lambda: len(access_lines(server)) >= count


# -- haproxy ----------------------------------------------------------------------------


class Haproxy:
    """A running haproxy in the foreground, in its own session."""

    def __init__(self, proc: subprocess.Popen[bytes], address: tuple[str, int], log: Path):
        self.proc = proc
        self.address = address
        self._log = log

    @property
    def log(self) -> str:
        return self._log.read_text(errors="replace")

    def kill(self) -> None:
        kill_everything(self.proc.pid)
        self.proc.wait(10)


StartHaproxy = Callable[..., Haproxy]

# The documented recipe (conf/haproxy.cfg, shown in the README) with this
# test's ports: the frontend on the socket the test bound, one server line
# per instance with the recipe's options, health checks every 200 ms.
RECIPE = (ROOT / "conf" / "haproxy.cfg").read_text()


def recipe_config(fd: int, ports: list[int]) -> str:
    lines = RECIPE.splitlines()
    servers = [line for line in lines if line.split()[:1] == ["server"]]
    assert servers, "conf/haproxy.cfg has no server line"
    options = " ".join(servers[0].split()[3:]).replace("inter 2s", "inter 200ms")
    assert "send-proxy-v2" in options and "check-send-proxy" in options, options
    out = []
    for line in lines:
        if line.split()[:1] == ["bind"]:
            out.append(f"    bind fd@{fd}")
        elif line is servers[0]:
            out += [f"    server s{i} 127.0.0.1:{p} {options}" for i, p in enumerate(ports)]
        elif line not in servers:
            out.append(line)
    return "\n".join(out) + "\n"


@pytest.fixture
def start_haproxy(tmp_path: Path) -> Iterator[StartHaproxy]:
    """Factory: haproxy in front of *instances*; killed by process group at teardown."""
    started: list[Haproxy] = []

    def start(
        instances: list[ServerProcess],
        make_config: Callable[[int, list[ServerProcess]], str] | None = None,
    ) -> Haproxy:
        """*make_config(fd, instances)*: the config; the recipe's by default."""
        assert HAPROXY is not None
        n = len(started)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as frontend:
            frontend.bind(("127.0.0.1", 0))
            frontend.listen(128)
            fd = frontend.fileno()
            config = tmp_path / f"haproxy{n}.cfg"
            if make_config is None:
                config.write_text(recipe_config(fd, [port_of(server) for server in instances]))
            else:
                config.write_text(make_config(fd, instances))
            log = tmp_path / f"haproxy{n}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [HAPROXY, "-db", "-f", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    pass_fds=(fd,),
                    start_new_session=True,
                )
            # Only haproxy holds the listening socket from here on.
            haproxy = Haproxy(proc, frontend.getsockname(), log)
        started.append(haproxy)
        return haproxy

    yield start
    for haproxy in started:
        haproxy.kill()


def ask(address: tuple[str, int], line: bytes, timeout: float = 10.0) -> tuple[bytes, int]:
    """One client: send *line*, read the reply to EOF; (reply, client's local port)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        port = int(sock.getsockname()[1])
        sock.sendall(line)
        return recv_to_eof(sock, timeout), port


REPLY = re.compile(rb"(s\d+) (\S+) (\d+) (.*\n)", re.DOTALL)


def parse_reply(reply: bytes) -> tuple[str, str, int, bytes]:
    """(tag, host, port, line) of a tagged_reply reply."""
    m = REPLY.fullmatch(reply)
    assert m, f"not a tagged reply: {reply!r}"
    return m[1].decode(), m[2].decode(), int(m[3]), m[4]


def wait_serving(haproxy: Haproxy, timeout: float = 20.0) -> None:
    """Until a request through haproxy gets its reply (the listening socket
    exists before haproxy runs, so connecting proves nothing)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if haproxy.proc.poll() is not None:
            raise AssertionError(f"haproxy exited with {haproxy.proc.returncode}:\n{haproxy.log}")
        try:
            reply, _ = ask(haproxy.address, b"ready?\n", timeout=5)
            if REPLY.fullmatch(reply):
                return
            last = reply
        except OSError as exc:
            last = exc
        time.sleep(0.05)  # a closed connection: haproxy has no server up yet
    raise AssertionError(f"haproxy not serving within {timeout}s (last: {last!r}):\n{haproxy.log}")


# -- the tests ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_health_checks_are_served_quietly(
    start_server: StartServer, start_haproxy: StartHaproxy
) -> None:
    instances = start_instances(start_server)
    haproxy = start_haproxy(instances)
    # No client traffic yet: every connection an instance sees is a health
    # check, a PROXY v2 LOCAL header and nothing else.
    for server in instances:
        wait_until(_served(server, 3), 20, "three health checks")
    for server in instances:
        for peer, status in access_lines(server):
            assert re.fullmatch(r"127\.0\.0\.1:\d+", peer), peer  # LOCAL: the real peer
            assert status == 0, server.log
        assert not complaints(server), server.log
    assert haproxy.proc.poll() is None, haproxy.log
    assert " is DOWN" not in haproxy.log, haproxy.log


@pytest.mark.timeout(60)
def test_load_is_spread_over_every_instance(
    start_server: StartServer, start_haproxy: StartHaproxy
) -> None:
    instances = start_instances(start_server)
    haproxy = start_haproxy(instances)
    wait_serving(haproxy)
    tags: Counter[str] = Counter()
    for i in range(60):
        line = b"request %d\n" % i
        reply, port = ask(haproxy.address, line)
        tag, host, seen_port, echoed = parse_reply(reply)
        assert (host, seen_port, echoed) == ("127.0.0.1", port, line)
        tags[tag] += 1
    assert set(tags) == {"s0", "s1", "s2"}, tags
    assert min(tags.values()) >= 10, f"round robin, yet: {tags}"
    for server in instances:
        assert not complaints(server), server.log
        assert server.stop() == 0


@pytest.mark.timeout(60)
def test_the_handler_sees_the_real_client_address(
    start_server: StartServer, start_haproxy: StartHaproxy
) -> None:
    instances = start_instances(start_server)
    haproxy = start_haproxy(instances)
    wait_serving(haproxy)
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        for _ in range(3):
            with socket.create_connection(
                haproxy.address, timeout=10, source_address=(source, 0)
            ) as sock:
                client = sock.getsockname()
                sock.sendall(b"who am I?\n")
                tag, host, port, echoed = parse_reply(recv_to_eof(sock))
            # haproxy's own connection comes from 127.0.0.1: only the PROXY
            # header can have told the handler this.
            assert (host, port) == client, tag
            assert echoed == b"who am I?\n"
    for server in instances:
        assert not complaints(server), server.log


class Load:
    """Client threads that keep connecting through haproxy and check every reply."""

    def __init__(self, address: tuple[str, int], threads: int = 4, limit: int = 400) -> None:
        self.address = address
        self.limit = limit  # connections per thread, at most
        self.done: list[tuple[float, str]] = []  # (when the reply was complete, tag)
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)
        ]

    def _run(self, n: int) -> None:
        for i in range(self.limit):
            if self._stop.is_set():
                return
            line = b"thread %d request %d\n" % (n, i)
            try:
                reply, port = ask(self.address, line)
                tag, host, seen_port, echoed = parse_reply(reply)
                if (host, seen_port, echoed) != ("127.0.0.1", port, line):
                    raise AssertionError(f"wrong reply {reply!r} to {line!r} from port {port}")
            except (OSError, AssertionError) as exc:
                with self._lock:
                    self.failures.append(f"{line!r}: {exc!r}")
                continue
            with self._lock:
                self.done.append((time.monotonic(), tag))

    def completed(self) -> int:
        with self._lock:
            return len(self.done)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "client threads hung"


@pytest.mark.timeout(90)
def test_graceful_stop_of_one_instance_under_load_loses_nothing(
    start_server: StartServer, start_haproxy: StartHaproxy
) -> None:
    instances = start_instances(start_server)
    haproxy = start_haproxy(instances)
    wait_serving(haproxy)
    victim = instances[1]
    with Load(haproxy.address) as load:
        wait_until(lambda: load.completed() >= 60, 30, "load through every instance")
        assert victim.stop() == 0, victim.log  # SIGTERM: drains, then exits 0
        stopped_at, completed_at_stop = time.monotonic(), load.completed()
        wait_until(lambda: load.completed() >= completed_at_stop + 100, 30, "load after the stop")
    assert load.failures == [], f"{len(load.failures)} lost: {load.failures[:5]}"
    tags = Counter(tag for _, tag in load.done)
    assert set(tags) == {"s0", "s1", "s2"}, tags
    after = Counter(tag for when, tag in load.done if when > stopped_at)
    assert "s1" not in after, f"served by the stopped instance after it exited: {after}"
    assert set(after) == {"s0", "s2"}, after
    # haproxy goes on with the two left.
    served_by = Counter(
        parse_reply(ask(haproxy.address, b"still there?\n")[0])[0] for _ in range(12)
    )
    assert set(served_by) == {"s0", "s2"}, served_by
    for server in instances:
        assert not complaints(server), server.log
    assert haproxy.proc.poll() is None, haproxy.log


# The check lines the README's metrics section shows: HAProxy asks each
# instance's metrics listener for /healthz (plain HTTP: no check-send-proxy).
HEALTHZ_CHECK = ("option httpchk GET /healthz", "http-check expect status 200")


def healthz_config(fd: int, instances: list[ServerProcess]) -> str:
    """The recipe's frontend and backend, checked through /healthz every 100 ms."""
    servers = [
        f"    server s{i} 127.0.0.1:{port_of(server)} send-proxy-v2 "
        f"check port {urlsplit(metrics_url(server)).port} inter 100ms fall 1 rise 1"
        for i, server in enumerate(instances)
    ]
    return "\n".join(
        [
            "global",
            "    maxconn 256",
            "    log stdout format raw local0 info",
            "defaults",
            "    mode tcp",
            "    log global",
            "    timeout connect 2s",
            "    timeout client 30s",
            "    timeout server 30s",
            "    retries 3",
            "    option redispatch 1",
            "frontend fe",
            f"    bind fd@{fd}",
            "    default_backend be",
            "backend be",
            "    balance roundrobin",
            *(f"    {line}" for line in HEALTHZ_CHECK),
            *servers,
            "",
        ]
    )


@pytest.mark.timeout(90)
def test_healthz_takes_a_draining_instance_out_of_rotation(
    start_server: StartServer, start_haproxy: StartHaproxy
) -> None:
    readme = (ROOT / "README.md").read_text()
    assert all(line in readme for line in HEALTHZ_CHECK), "the README shows other check lines"
    instances = start_instances(start_server, 2, metrics=True)
    haproxy = start_haproxy(instances, healthz_config)
    wait_serving(haproxy)
    served_by = Counter(parse_reply(ask(haproxy.address, b"hello\n")[0])[0] for _ in range(10))
    assert set(served_by) == {"s0", "s1"}, served_by
    assert " is DOWN" not in haproxy.log, haproxy.log
    victim = instances[1]
    # A client of the victim's that stays: it drains for as long as this is open.
    with socket.create_connection(victim.tcp_address, timeout=10) as held:
        held.sendall(v1("192.0.2.7", 7007))
        victim.signal(signal.SIGTERM)
        victim.wait_for_log("stopping: no longer accepting")
        wait_until(lambda: "be/s1 is DOWN" in haproxy.log, 20, "haproxy to mark s1 down")
        assert re.search(r"be/s1 is DOWN, reason: Layer7 wrong status, code: 503", haproxy.log), (
            haproxy.log
        )
        assert not victim.wait_exit(0), "the victim stopped draining early"
        served_by = Counter(
            parse_reply(ask(haproxy.address, b"still there?\n")[0])[0] for _ in range(10)
        )
        assert set(served_by) == {"s0"}, served_by
        held.sendall(b"goodbye\n")
        assert parse_reply(recv_to_eof(held)) == ("s1", "192.0.2.7", 7007, b"goodbye\n")
    assert victim.wait(30) == 0, victim.log
    assert "be/s0 is DOWN" not in haproxy.log, haproxy.log
    for server in instances:
        assert not complaints(server), server.log
    assert haproxy.proc.poll() is None, haproxy.log
