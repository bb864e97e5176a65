"""Each connection's sandbox (forkserver/sandbox/), end to end, with real processes.

A handler (tests/helpers/sandbox_services.py) tries one thing per connection
and replies with the outcome, so each test sees what the sandbox refused, how
(EACCES, EPERM, ENETUNREACH, SIGSYS), and that the client was still served.
The server runs as root, so a refusal here is the sandbox's, never the
file mode's.  Bad configs are in test_sandbox_config.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import tempfile
from pathlib import Path
from typing import Any

import pytest

from forkserver.testing.config import toml_table
from tests.helpers.clients import connect, recv_to_eof
from tests.helpers.processes import idle_children, reaped
from tests.helpers.servers import (
    ABNORMAL_EXIT,
    MODES,
    ServerProcess,
    StartServer,
    config,
    wait_until,
)

HANDLER = "tests.helpers.sandbox_services:attempt"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason='network = "none" and user need root')


def _start(start_server: StartServer, sandbox: dict[str, Any], **settings: Any) -> ServerProcess:
    return start_server(config(HANDLER, **settings) + toml_table("sandbox", sandbox))


def _ask(server: ServerProcess, line: str) -> str:
    """One connection: send *line*, return the handler's reply (b"" if it died)."""
    with connect(server.tcp_address, timeout=10) as sock:
        sock.sendall(line.encode() + b"\n")
        return recv_to_eof(sock, timeout=10).decode().strip()


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A readable directory with a 10-byte file, a read-write directory, and a
    7-byte secret outside both."""
    readable, writable = tmp_path / "readable", tmp_path / "rw"
    readable.mkdir()
    writable.mkdir()
    (readable / "data").write_bytes(b"0123456789")
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret!")
    return readable, writable, secret


def _stopped_cleanly(server: ServerProcess) -> None:
    assert server.stop() == 0
    assert not ABNORMAL_EXIT.search(server.log), server.log


# -- Landlock -------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_landlock_denies_what_is_outside_its_paths_and_allows_what_is_inside(
    start_server: StartServer, tmp_path: Path, mode: dict[str, Any]
) -> None:
    readable, writable, secret = _files(tmp_path)
    sandbox = {"landlock": "on", "read": [str(readable)], "read_write": [str(writable)]}
    server = _start(start_server, sandbox, **mode)
    assert re.search(r"sandbox for each connection: landlock ABI \d+, no_new_privs", server.log)
    assert _ask(server, f"read {readable / 'data'}") == "ok 10 bytes"
    assert _ask(server, f"read {secret}") == "error EACCES"  # root, yet refused
    assert _ask(server, f"write {writable / 'out'}") == "ok written"
    assert (writable / "out").read_text().startswith("written by ")
    assert _ask(server, f"write {readable / 'new'}") == "error EACCES"
    assert not (readable / "new").exists()
    assert _ask(server, f"mkdir {tmp_path / 'made'}") == "error EACCES"
    assert not (tmp_path / "made").exists()
    _stopped_cleanly(server)


# -- seccomp --------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_denied_syscall_fails_with_eperm_and_the_handler_replies(
    start_server: StartServer, tmp_path: Path, mode: dict[str, Any]
) -> None:
    readable, _, _ = _files(tmp_path)
    server = _start(start_server, {"syscalls_deny": ["mkdir", "mkdirat"]}, **mode)
    assert re.search(r"seccomp deny list \(\d+ BPF instructions\), no_new_privs", server.log)
    assert _ask(server, f"mkdir {tmp_path / 'made'}") == "error EPERM"
    assert not (tmp_path / "made").exists()
    assert _ask(server, f"read {readable / 'data'}") == "ok 10 bytes"  # the rest is allowed
    mark = len(server.lines)
    server.signal(signal.SIGHUP)  # the settings cross exec(): the filter is built again
    server.wait_for_log("forkserver ready", 30, start=mark)
    assert _ask(server, f"mkdir {tmp_path / 'made'}") == "error EPERM"
    _stopped_cleanly(server)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_denied_syscall_with_kill_ends_the_child_by_sigsys_and_is_logged(
    start_server: StartServer, tmp_path: Path, mode: dict[str, Any]
) -> None:
    sandbox = {"syscalls_deny": ["mkdir", "mkdirat"], "syscall_action": "kill"}
    server = _start(start_server, sandbox, limit_core_mb=0, **mode)
    with connect(server.tcp_address, timeout=10) as sock:
        port = sock.getsockname()[1]
        sock.sendall(f"mkdir {tmp_path / 'made'}\n".encode())
        assert recv_to_eof(sock, timeout=10) == b"", "killed before any reply"
    line = server.wait_for_log(rf"child \d+ for 127\.0\.0\.1:{port} killed by SIGSYS")
    assert not (tmp_path / "made").exists(), line
    assert _ask(server, "pid").startswith("ok "), "the next connection is served"
    idle_children(server, mode)
    assert server.stop() == 0


# What a Python handler of tests/helpers/sandbox_services.py needs, generously,
# and a spare waiting for its connection (accept4, epoll, recvmsg): no mkdir.
ALLOWED = [
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "close",
    "fstat",
    "newfstatat",
    "statx",
    "lseek",
    "mmap",
    "munmap",
    "brk",
    "mprotect",
    "madvise",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "ioctl",
    "getpid",
    "gettid",
    "getppid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "shutdown",
    "getsockname",
    "getpeername",
    "getsockopt",
    "setsockopt",
    "accept4",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "poll",
    "ppoll",
    "futex",
    "getrandom",
    "clock_gettime",
    "clock_nanosleep",
    "openat",
    "fcntl",
    "dup",
    "dup2",
    "dup3",
    "getcwd",
    "uname",
    "prlimit64",
    "set_robust_list",
    "rseq",
    "restart_syscall",
    "exit",
    "exit_group",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_an_allow_list_refuses_every_other_syscall(
    start_server: StartServer, tmp_path: Path, mode: dict[str, Any]
) -> None:
    readable, _, _ = _files(tmp_path)
    server = _start(start_server, {"syscalls_allow": ALLOWED}, **mode)
    assert "seccomp allow list" in server.log
    assert _ask(server, f"read {readable / 'data'}") == "ok 10 bytes"
    assert _ask(server, f"mkdir {tmp_path / 'made'}") == "error EPERM"
    assert not (tmp_path / "made").exists()
    _stopped_cleanly(server)


# -- network = "none" -----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_spares_a_sandbox_stops_from_starting_are_replaced_after_a_backoff(
    start_server: StartServer, tmp_path: Path
) -> None:
    """A spare waits in epoll: a filter denying it kills every spare at
    start.  They are replaced ever more slowly (0.1 s, doubled up to 10 s),
    not forked and failed in a loop, and clients are served meanwhile: with
    no spare idle, the parent forks on accept, and such a child needs no epoll."""
    readable, _, _ = _files(tmp_path)
    deny = {"syscalls_deny": ["epoll_create1", "epoll_create"]}
    server = _start(start_server, deny, spare_children=2)
    assert _ask(server, f"read {readable / 'data'}") == "ok 10 bytes"
    server.wait_for_log(r"before it had a connection; the next in 0\.8s", 20)
    failed = server.log.count("before it had a connection")
    assert 3 <= failed <= 8, server.log  # 0.1, 0.2, 0.4, 0.8: a handful, not hundreds
    assert _ask(server, f"read {readable / 'data'}") == "ok 10 bytes"
    assert server.stop() == 0  # the spares' deaths are logged, not a reason to fail


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_network_none_keeps_the_connection_and_refuses_new_ones(
    start_server: StartServer, mode: dict[str, Any]
) -> None:
    server = _start(start_server, {"network": "none"}, **mode)
    with socket.create_server(("127.0.0.1", 0)) as target:
        port = target.getsockname()[1]
        # The reply arrives over the accepted connection: it still works.
        assert _ask(server, f"connect 127.0.0.1:{port}") == "error ENETUNREACH"
        target.setblocking(False)
        with pytest.raises(BlockingIOError):
            target.accept()  # nothing reached the test's listener
    _stopped_cleanly(server)


# -- everything at once, as another user: the order of the steps ------------------------


@needs_root
@pytest.mark.timeout(60)
def test_the_whole_sandbox_applies_after_the_user_drop(start_server: StartServer) -> None:
    # Under /tmp, not tmp_path: pytest's directories are root's alone (0700),
    # and nobody must be able to reach these files but for the sandbox.
    with tempfile.TemporaryDirectory(prefix="forkserver-sandbox-") as top:
        os.chmod(top, 0o755)
        _whole_sandbox_as_nobody(start_server, Path(top))


def _whole_sandbox_as_nobody(start_server: StartServer, tmp_path: Path) -> None:
    readable, writable, secret = _files(tmp_path)
    os.chmod(writable, 0o777)
    sandbox = {
        "landlock": "on",
        "read": [str(readable)],
        "read_write": [str(writable)],
        "syscalls_deny": ["mkdir", "mkdirat"],
        "network": "none",
    }
    server = _start(start_server, sandbox, user="nobody")
    with socket.create_server(("127.0.0.1", 0)) as target:
        port = target.getsockname()[1]
        assert _ask(server, f"connect 127.0.0.1:{port}") == "error ENETUNREACH"
    assert _ask(server, f"read {readable / 'data'}") == "ok 10 bytes"
    assert _ask(server, f"read {secret}") == "error EACCES"  # 0644 beside it: Landlock's refusal
    assert _ask(server, f"mkdir {writable / 'd'}") == "error EPERM"
    assert _ask(server, f"write {writable / 'out'}") == "ok written"
    assert (writable / "out").stat().st_uid == 65534
    # From outside: the child's flags, filter and namespace as the kernel shows them.
    with connect(server.tcp_address, timeout=10) as sock:
        sock.sendall(b"hold\n")
        pid = int(sock.recv(100).split()[1])
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        assert re.search(r"^Seccomp:\s+2$", status, re.M), status  # a filter
        assert re.search(r"^Uid:\s+65534\s", status, re.M), status
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    wait_until(lambda: reaped(pid), 10, "the child to be reaped")
    _stopped_cleanly(server)


# -- no sandbox: nothing applied, nothing loaded -----------------------------------------


@pytest.mark.timeout(60)
def test_without_a_sandbox_the_child_gets_nothing_and_the_parent_loads_nothing(
    start_server: StartServer,
) -> None:
    server = start_server(config(HANDLER))
    assert "sandbox for each connection" not in server.log
    with connect(server.tcp_address, timeout=10) as sock:
        sock.sendall(b"hold\n")
        pid = int(sock.recv(100).split()[1])
        status = Path(f"/proc/{pid}/status").read_text()
        assert re.search(r"^NoNewPrivs:\s+0$", status, re.M), status
        assert re.search(r"^Seccomp:\s+0$", status, re.M), status
        assert os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    assert "_ctypes" not in maps and "libseccomp" not in maps, "paid for an unused sandbox"
    _stopped_cleanly(server)


@pytest.mark.timeout(60)
def test_with_seccomp_the_filter_is_compiled_once_outside_the_parent(
    start_server: StartServer,
) -> None:
    """libseccomp's binding imports threading (through ctypes.util), whose
    at-fork hook made every child copy ~160 more pages: the parent has a
    child compile the filter, and only holds its BPF."""
    server = _start(start_server, {"syscalls_deny": ["mkdir"]})
    assert re.search(r"seccomp deny list \(\d+ BPF instructions\)", server.log), server.log
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    assert "libseccomp" not in maps
    _stopped_cleanly(server)


# -- a [[listen]] table's own sandbox -------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_a_listeners_sandbox_confines_its_connections_only(
    start_server: StartServer, tmp_path: Path, mode: dict[str, Any]
) -> None:
    readable, _, secret = _files(tmp_path)
    text = toml_table("server", {"handler": HANDLER, **mode})
    text += '[[listen]]\ntcp = "127.0.0.1:0"\n'
    text += '[[listen]]\ntcp = "127.0.0.1:0"\n'
    text += toml_table("listen.sandbox", {"landlock": "on", "read": [str(readable)]})
    server = start_server(text)
    plain, confined = server.addresses
    assert re.search(r"sandbox for the connections of tcp 127\.0\.0\.1:0: landlock", server.log)

    def ask(address: Any, line: str) -> str:
        with connect(address, timeout=10) as sock:
            sock.sendall(line.encode() + b"\n")
            return recv_to_eof(sock, timeout=10).decode().strip()

    assert ask(confined, f"read {readable / 'data'}") == "ok 10 bytes"
    assert ask(confined, f"read {secret}") == "error EACCES"
    assert ask(plain, f"read {secret}") == "ok 7 bytes"  # the other listener: no sandbox
    # A reload hands the listeners, and so their tables, across exec(): the
    # sandbox comes back with them.
    mark = len(server.lines)
    server.signal(signal.SIGHUP)
    server.wait_for_log("forkserver ready", 30, start=mark)
    assert ask(confined, f"read {secret}") == "error EACCES"
    assert ask(plain, f"read {secret}") == "ok 7 bytes"
    _stopped_cleanly(server)


# -- Landlock ABI versions ----------------------------------------------------------------


def _truncate_under(version: int, directory: Path, victim: Path) -> str:
    """In a forked child: a read-only ruleset over *directory* built for ABI
    *version*, then truncate(*victim*); the outcome, through a pipe."""
    from forkserver.sandbox import calls, landlock

    ruleset = landlock.build((str(directory),), (), version)
    confine = [calls.prepare_no_new_privs(), landlock.prepare_restrict_self(ruleset)]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        outcome = b"allowed"
        try:
            calls.run_prepared(confine)
            os.truncate(victim, 0)
        except PermissionError:
            outcome = b"EACCES"
        except BaseException:
            outcome = b"failed"
        os.write(write_end, outcome)
        os._exit(0)
    os.close(write_end)
    os.close(ruleset)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as result:
        said = result.read().decode()
    assert os.waitstatus_to_exitcode(status) == 0
    return said


@pytest.mark.timeout(30)
def test_an_older_abi_leaves_what_it_cannot_restrict_allowed_and_says_so(tmp_path: Path) -> None:
    from forkserver.sandbox import landlock

    if landlock.abi() < 3:
        pytest.skip("needs a kernel with Landlock ABI 3 (truncate) to compare")
    victim = tmp_path / "victim"
    victim.write_bytes(b"0123456789")
    # The running kernel's ABI handles truncate: denied.
    assert _truncate_under(landlock.abi(), tmp_path, victim) == "EACCES"
    assert victim.stat().st_size == 10
    # A ruleset as an ABI 1 kernel would get it cannot: allowed, as the log says.
    assert landlock.lost_rights(1) == ["truncate (ABI 3)", "device ioctls (ABI 5)"]
    assert landlock.lost_rights(landlock.abi()) == []
    assert _truncate_under(1, tmp_path, victim) == "allowed"
    assert victim.stat().st_size == 0
