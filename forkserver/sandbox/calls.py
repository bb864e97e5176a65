"""The C calls a sandbox needs that ``os`` does not offer (Python 3.11), through ctypes.

Loaded only when a sandbox is configured: the default path never imports
ctypes (a fork copies every page the import touched).
"""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "CLONE_NEWNET", "has_capability", "leave_network", "prepare_no_new_privs",
    "prepare_prctl", "prepare_syscall", "run_prepared", "syscall",
]  # fmt: skip

PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000
CAP_SYS_ADMIN = 21

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = (
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
)
_libc.unshare.restype = ctypes.c_int
_libc.unshare.argtypes = (ctypes.c_int,)


def _failed(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    # A call a child makes, with every argument converted in the parent: the
    # function object, its arguments, and what to call it in an error.
    Prepared = tuple[Callable[..., int], tuple[object, ...], str]


def prepare_prctl(name: str, option: int, arg2: int, arg3: int = 0) -> Prepared:
    """``prctl(option, arg2, arg3)``, to be run in a child by :func:`run_prepared`."""
    return (_libc.prctl, (option, arg2, arg3, 0, 0), f"prctl({name})")


def prepare_syscall(name: str, number: int, *args: object) -> Prepared:
    """The raw system call *number*, to be run in a child by :func:`run_prepared`."""
    return (_libc.syscall, (ctypes.c_long(number), *args), name)


def prepare_no_new_privs() -> Prepared:
    """prctl(PR_SET_NO_NEW_PRIVS), as a call a child runs: no exec() from then on
    can gain privileges (setuid bits, file capabilities)."""
    return prepare_prctl("PR_SET_NO_NEW_PRIVS", PR_SET_NO_NEW_PRIVS, 1)


def run_prepared(prepared: list[Prepared]) -> None:
    """In a child: make each call in turn; raises OSError at the first that fails.

    The leanest way through ctypes we measured: a child that only calls
    function objects bound in the parent with arguments built there copies
    fewer pages than one that goes through Python wrappers (forkserver's
    own, before: ~50 faults and ~300 µs per child for Landlock and seccomp
    together; bench/peers/needsfloor.py's, the same calls: ~15 faults)."""
    for function, args, name in prepared:
        if function(*args) == -1:
            raise _failed(name)


def syscall(number: int, *args: object) -> int:
    """The raw system call *number*; raises OSError on -1."""
    result = int(_libc.syscall(ctypes.c_long(number), *args))
    if result == -1:
        raise _failed(f"syscall {number}")
    return result


def leave_network() -> None:
    """Move this process into a new, empty network namespace (only a down
    loopback): sockets it already holds keep working, new ones reach nothing."""
    if _libc.unshare(CLONE_NEWNET) == -1:
        raise _failed("unshare(CLONE_NEWNET)")


def has_capability(bit: int = CAP_SYS_ADMIN) -> bool:
    """Whether this process holds capability *bit* (CapEff in /proc/self/status)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass  # no /proc: say no, and the start-up check explains
    return False
