"""Bad ``[sandbox]`` tables: one line, exit 2, nothing bound or forked.

Each case is a real start (``python -m forkserver --config FILE``, not
``--check``).  What the machine lacks is made real where it can be: a
kernel without Landlock is this one with ``landlock_create_ruleset``
answering ENOSYS (a seccomp filter set before exec), a process without
CAP_SYS_ADMIN is root with it dropped from the bounding set.  Only a missing
libseccomp is imitated, by a ``pyseccomp`` that fails to import as the real
one does without the library.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forkserver.testing.config import environment
from forkserver.testing.pytest_plugin import ServerFactory
from tests.helpers.servers import ROOT, assert_config_refused, config, run_forkserver

HANDLER = "tests.helpers.sandbox_services:attempt"

CASES = [
    pytest.param(
        'syscalls_deny = ["mkdir", "nosuchcall"]',
        'sandbox.syscalls_deny: unknown system call "nosuchcall" on this architecture',
        id="unknown-syscall",
    ),
    pytest.param(
        'syscalls_allow = [""]',
        'sandbox.syscalls_allow: unknown system call ""',
        id="empty-syscall",
    ),
    pytest.param(
        'landlock = "on"\nread = ["/nonexistent/forkserver"]',
        'sandbox.read: "/nonexistent/forkserver" does not exist',
        id="missing-path",
    ),
    pytest.param(
        'landlock = "on"\nread_write = ["missing-dir"]',
        'missing-dir" does not exist',  # relative to the config file's directory
        id="missing-relative-path",
    ),
    pytest.param(
        'read = ["/usr"]', 'sandbox.read needs landlock = "on" (or "best-effort")', id="no-landlock"
    ),
    pytest.param(
        'syscalls_deny = ["mkdir"]\nsyscalls_allow = ["read"]',
        "sandbox: give syscalls_deny or syscalls_allow, not both",
        id="deny-and-allow",
    ),
    pytest.param(
        'syscall_action = "kil"',
        'sandbox.syscall_action must be one of "eperm", "kill", got "kil"',
        id="bad-action",
    ),
    pytest.param(
        'network = "off"',
        'sandbox.network must be one of "inherit", "none", got "off"',
        id="bad-network",
    ),
    pytest.param(
        "landlock = true", 'sandbox.landlock must be one of "off", "on", "best-effort"', id="bool"
    ),
    pytest.param(
        'landlok = "on"', 'unknown key sandbox.landlok (did you mean "landlock"?)', id="typo"
    ),
    pytest.param(
        "syscalls_deny = 3",
        "sandbox.syscalls_deny must be a string or a list of strings, got 3",
        id="not-a-list",
    ),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("body", "message"), CASES)
def test_a_bad_sandbox_table_is_one_line_and_exit_2(
    tmp_path: Path, body: str, message: str
) -> None:
    (tmp_path / "bad.toml").write_text(config(HANDLER) + f"[sandbox]\n{body}\n")
    result = run_forkserver("--config", "bad.toml", cwd=tmp_path)
    assert_config_refused(result)
    assert result.stderr.startswith("forkserver: bad.toml: "), result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("sandbox = 3\n", "bad.toml: sandbox must be a table, got 3", id="not-a-table"),
        pytest.param(
            '[server.sandbox]\nlandlock = "on"\n',
            "bad.toml: give the sandbox as a [sandbox] table, not server.sandbox",
            id="inside-server",
        ),
    ],
)
def test_the_sandbox_table_is_a_top_level_table(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.toml").write_text(text + config(HANDLER))
    if text.startswith("[server."):  # a sub-table must follow its table in TOML
        (tmp_path / "bad.toml").write_text(config(HANDLER) + text)
    result = run_forkserver("--config", "bad.toml", cwd=tmp_path)
    assert_config_refused(result)
    assert message in result.stderr, result.stderr


LISTEN = '[[listen]]\ntcp = "127.0.0.1:0"\n[listen.sandbox]\n'


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            LISTEN + 'syscalls_deny = ["nosuchcall"]\n',
            'sandbox.syscalls_deny: unknown system call "nosuchcall"',
            id="unknown-syscall",
        ),
        pytest.param(
            LISTEN + 'read = ["/usr"]\n',
            'sandbox.read needs landlock = "on" (or "best-effort")',
            id="no-landlock",
        ),
        pytest.param(
            'user = "nobody"\n' + LISTEN + 'network = "none"\n',
            'network = "none" in a [[listen]] sandbox needs children that keep root',
            id="network-after-user-drop",
        ),
    ],
)
def test_a_bad_listener_sandbox_is_one_line_and_exit_2(
    tmp_path: Path, text: str, message: str
) -> None:
    server = f'[server]\nhandler = "{HANDLER}"\n'
    (tmp_path / "bad.toml").write_text(server + text)
    result = run_forkserver("--config", "bad.toml", cwd=tmp_path)
    assert_config_refused(result)
    assert message in result.stderr, result.stderr


# -- what the machine lacks ---------------------------------------------------------------

NO_LANDLOCK = (
    "import errno, pyseccomp as sc\n"
    "f = sc.SyscallFilter(sc.ALLOW)\n"
    "f.add_rule(sc.ERRNO(errno.ENOSYS), 'landlock_create_ruleset')\n"
    "f.load()\n"
)
NO_SYS_ADMIN = (
    "import ctypes\n"
    "assert ctypes.CDLL(None).prctl(24, 21, 0, 0, 0) == 0  # PR_CAPBSET_DROP, CAP_SYS_ADMIN\n"
)
EXEC_SERVER = (
    "import os, sys\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'forkserver', *sys.argv[1:]])\n"
)


def _run_under(prelude: str, tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Start the server on a [sandbox] *body* in a process *prelude* changed first."""
    (tmp_path / "c.toml").write_text(config(HANDLER) + f"[sandbox]\n{body}\n")
    return subprocess.run(
        [sys.executable, "-c", prelude + EXEC_SERVER, "--config", "c.toml"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
        cwd=tmp_path,
        timeout=20,
        check=False,
    )


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="drops a capability root has")


@pytest.mark.timeout(60)
def test_landlock_on_a_kernel_without_it_is_a_config_error(tmp_path: Path) -> None:
    result = _run_under(NO_LANDLOCK, tmp_path, 'landlock = "on"\nread = ["/usr"]')
    assert_config_refused(result)
    assert 'sandbox.landlock = "on": this kernel has no Landlock' in result.stderr
    assert 'use "best-effort"' in result.stderr


@pytest.mark.timeout(60)
def test_best_effort_landlock_on_a_kernel_without_it_starts_and_says_so(
    forkserver: ServerFactory, tmp_path: Path
) -> None:
    (tmp_path / "c.toml").write_text(
        config(HANDLER) + '[sandbox]\nlandlock = "best-effort"\nread = ["/usr"]\n'
    )
    server = forkserver.command(
        [sys.executable, "-c", NO_LANDLOCK + EXEC_SERVER, "--config", "c.toml"],
        env=environment(ROOT, {}),
        cwd=tmp_path,
    )
    assert "this kernel has no Landlock; filesystem rules not applied" in server.log
    assert server.stop() == 0


@needs_root
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param('network = "none"', 'sandbox.network = "none" needs CAP_SYS_ADMIN', id="net"),
        pytest.param(
            'no_new_privs = false\nsyscalls_deny = ["mkdir"]',
            "sandbox.no_new_privs = false: Landlock and seccomp then need CAP_SYS_ADMIN",
            id="no-nnp",
        ),
    ],
)
def test_what_needs_cap_sys_admin_is_refused_without_it(
    tmp_path: Path, body: str, message: str
) -> None:
    result = _run_under(NO_SYS_ADMIN, tmp_path, body)
    assert_config_refused(result)
    assert message in result.stderr, result.stderr


@pytest.mark.timeout(60)
def test_seccomp_without_libseccomp_is_a_config_error(tmp_path: Path) -> None:
    fake = tmp_path / "nolib"
    fake.mkdir()
    # What pyseccomp raises on import where libseccomp.so.2 is not installed.
    (fake / "pyseccomp.py").write_text('raise RuntimeError("Unable to find libseccomp")\n')
    (tmp_path / "c.toml").write_text(config(HANDLER) + '[sandbox]\nsyscalls_deny = ["mkdir"]\n')
    result = run_forkserver(
        "--config", "c.toml", cwd=tmp_path, env={"PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"}
    )
    assert_config_refused(result)
    assert (
        "sandbox.syscalls_deny: needs libseccomp and the pyseccomp package "
        "(pip install 'forkserver[sandbox]'): Unable to find libseccomp"
    ) in result.stderr, result.stderr
