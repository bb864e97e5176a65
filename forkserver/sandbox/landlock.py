"""Landlock filesystem rules through its three system calls (ctypes).

The parent builds the ruleset once (``build``): it handles every access right
the running kernel's ABI knows, and grants them beneath the configured paths.
A child only calls ``landlock_restrict_self`` on the ruleset's fd, which it
inherited at fork; the fd is close-on-exec and not in the list of fds a child
closes (``parent/fork.py`` closes only what its sources name).

ABI versions: 1 (Linux 5.13) covers reading, writing, creating and removing
files; 2 adds REFER (under ABI 1, renaming or linking across directories is
always denied), 3 TRUNCATE, 5 IOCTL_DEV.  An older ABI cannot restrict the
rights it does not know, so those stay allowed: best effort, and the parent
says so once at start.
"""

from __future__ import annotations

import ctypes
import os

from .calls import prepare_syscall, syscall

__all__ = [
    "READ", "READ_WRITE", "abi", "build", "lost_rights", "prepare_restrict_self",
]  # fmt: skip

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .calls import Prepared

# The system call numbers are the same on every architecture (asm-generic).
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
READ = EXECUTE | READ_FILE | READ_DIR
# The rights that make sense on a file, not a directory: a rule on a file
# with any other right is EINVAL.
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
# Every filesystem right each ABI handles (ABI 4 added network rights only).
_HANDLED_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
NEWEST_FS_ABI = 5
READ_WRITE = (1 << 16) - 1
# What an older ABI leaves allowed (not REFER: without it, reparenting is denied).
_NAMES = {TRUNCATE: "truncate (ABI 3)", IOCTL_DEV: "device ioctls (ABI 5)"}


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # struct landlock_path_beneath_attr is packed: 12 bytes
    _fields_ = (("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32))


def abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none (or it is disabled)."""
    try:
        return syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), CREATE_RULESET_VERSION)
    except OSError:
        return 0  # ENOSYS (too old) or EOPNOTSUPP (not in the LSM list)


def handled(version: int) -> int:
    """The filesystem rights a ruleset handles under ABI *version*."""
    return _HANDLED_BY_ABI.get(version, READ_WRITE)


def lost_rights(version: int) -> list[str]:
    """The rights that ABI *version* cannot restrict (they stay allowed)."""
    return [name for bit, name in _NAMES.items() if not handled(version) & bit]


def build(read: tuple[str, ...], read_write: tuple[str, ...], version: int) -> int:
    """A ruleset fd (close-on-exec) that denies every handled right except
    *read* (read and execute) and *read_write* (everything) beneath those paths."""
    rights = handled(version)
    attr = ctypes.c_uint64(rights)  # only handled_access_fs: the kernel takes a prefix
    fd = syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(8), 0)
    try:
        for paths, access in ((read, READ), (read_write, READ_WRITE)):
            for path in paths:
                beneath = os.open(path, os.O_PATH | os.O_CLOEXEC)
                try:
                    allowed = access & rights
                    if not os.path.isdir(path):
                        allowed &= FILE_RIGHTS
                    rule = _PathBeneath(allowed, beneath)
                    syscall(SYS_ADD_RULE, fd, RULE_PATH_BENEATH, ctypes.byref(rule), 0)
                finally:
                    os.close(beneath)
    except BaseException:
        os.close(fd)
        raise
    return fd


def prepare_restrict_self(fd: int) -> Prepared:
    """landlock_restrict_self(*fd*), as a call a child runs (calls.run_prepared):
    confines that process, and what it forks or execs, to the ruleset *fd*.
    Needs no_new_privs first (or CAP_SYS_ADMIN)."""
    return prepare_syscall("landlock_restrict_self", SYS_RESTRICT_SELF, fd, 0)
