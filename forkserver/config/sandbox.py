"""``[sandbox]``: what each connection's child may do, checked before anything starts.

The keys are declared here once, like every table's; what the kernel must
offer (Landlock, a new network namespace) and what libseccomp must know (the
syscall names) is checked when the table is built, so a config the machine
cannot honour is one ConfigError, exit 2, and nothing is bound or forked.
The runtime that applies it is ``forkserver/sandbox/``.
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from .fields import Table, deferred_dataclass, setting
from .text import show

__all__ = ["SANDBOX_TABLE", "Sandbox", "check_sandbox_paths", "check_syscalls"]

SANDBOX_TABLE = "sandbox"


def check_sandbox_paths(values: tuple[str, ...]) -> str | None:
    """Paths a Landlock rule opens: each must exist now (the parent opens them
    once, at start, to build the ruleset)."""
    for path in values:
        if not path:
            return "a path cannot be empty"
        if not os.path.exists(path):
            return f"{show(path)} does not exist"
    return None


def check_syscalls(values: tuple[str, ...]) -> str | None:
    """System call names libseccomp knows on this architecture."""
    from ..sandbox.seccomp import missing, unknown_names

    problem = missing()
    if problem:
        return problem
    unknown = unknown_names(values)
    if unknown:
        return f"unknown system call {show(unknown[0])} on this architecture"
    return None


@deferred_dataclass(frozen=True)
class Sandbox(Table):
    """The ``[sandbox]`` table: Landlock paths, a seccomp filter, no network."""

    section = SANDBOX_TABLE

    landlock: str = setting(
        "off",
        'Filesystem rules with Landlock (Linux 5.13+): "on" denies every file access '
        "but `read` and `read_write` (a kernel without Landlock is a config error); "
        '"best-effort" applies them where the kernel can and says so at start; "off".',
        choices=("off", "on", "best-effort"),
    )
    read: tuple[str, ...] = setting(
        (),
        "Paths (and what is beneath them) the handler may read and execute, with "
        '`landlock`. Include what it imports after the fork (its venv, "/usr/lib/python3").',
        path=True,
        check=check_sandbox_paths,
    )
    read_write: tuple[str, ...] = setting(
        (),
        "Paths the handler may read, write, create and remove beneath, with `landlock`.",
        path=True,
        check=check_sandbox_paths,
    )
    syscalls_deny: tuple[str, ...] = setting(
        (),
        "System calls the handler may not make (seccomp, through libseccomp: the "
        "`sandbox` extra); every other one is allowed.",
        check=check_syscalls,
    )
    syscalls_allow: tuple[str, ...] = setting(
        (),
        "The only system calls the handler may make (seccomp); instead of `syscalls_deny`. "
        "Python itself needs many: start from a deny list.",
        check=check_syscalls,
    )
    syscall_action: str = setting(
        "eperm",
        'What a filtered system call gets: "eperm" fails it with EPERM; "kill" kills '
        "the child with SIGSYS (logged as killed by the sandbox).",
        choices=("eperm", "kill"),
    )
    network: str = setting(
        "inherit",
        '"none" gives each child a new, empty network namespace: it keeps its accepted '
        "connection and can open no other (costs a namespace per connection: see "
        'docs/sandbox.md). "inherit": the host\'s network.',
        choices=("inherit", "none"),
    )
    no_new_privs: bool = setting(
        True,
        "prctl(PR_SET_NO_NEW_PRIVS) whenever any other sandbox key is on: no exec() can "
        "gain privileges. Landlock and seccomp need it unless the child keeps CAP_SYS_ADMIN.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        key = SANDBOX_TABLE
        if (self.read or self.read_write) and self.landlock == "off":
            which = "read" if self.read else "read_write"
            raise ConfigError(f'{key}.{which} needs landlock = "on" (or "best-effort")')
        if self.syscalls_deny and self.syscalls_allow:
            raise ConfigError(f"{key}: give syscalls_deny or syscalls_allow, not both")
        if self.landlock == "on":
            from ..sandbox.landlock import abi

            if abi() == 0:
                raise ConfigError(
                    f'{key}.landlock = "on": this kernel has no Landlock (Linux 5.13+ with '
                    'landlock in its LSM list); use "best-effort" to run without it'
                )
        if self.network == "none":
            from ..sandbox.calls import has_capability

            if not has_capability():
                raise ConfigError(
                    f'{key}.network = "none" needs CAP_SYS_ADMIN (root) for a network '
                    "namespace per child"
                )
        if not self.no_new_privs and self.confines():
            from ..sandbox.calls import has_capability

            if not has_capability():
                raise ConfigError(
                    f"{key}.no_new_privs = false: Landlock and seccomp then need CAP_SYS_ADMIN"
                )

    def confines(self) -> bool:
        """Whether Landlock or seccomp is asked for."""
        return self.landlock != "off" or bool(self.syscalls_deny or self.syscalls_allow)
