"""The syscall filter: compiled once by libseccomp in the parent, loaded by each child.

libseccomp comes through pyseccomp (the ``sandbox`` extra: a ctypes port of
libseccomp's own Python bindings, same API; docs/sandbox.md says why).  The
parent builds the filter and exports it as classic BPF once
(``seccomp_export_bpf``); a child loads those bytes with one
``prctl(PR_SET_SECCOMP)``, so it neither calls into libseccomp nor compiles
anything per connection (``seccomp_load`` in each child regenerates the
program each time: see docs/sandbox.md for the measured difference).
"""

from __future__ import annotations

import ctypes
import errno
import os

from .calls import prepare_prctl

__all__ = ["Program", "missing", "unknown_names"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .calls import Prepared

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
BPF_INSTRUCTION = 8  # sizeof(struct sock_filter)


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_ushort), ("filter", ctypes.c_void_p))


def missing() -> str | None:
    """Why seccomp cannot be used here (no pyseccomp, no libseccomp), or None."""
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        return (
            f"needs libseccomp and the pyseccomp package (pip install 'forkserver[sandbox]'): {exc}"
        )
    return None


def unknown_names(names: tuple[str, ...]) -> list[str]:
    """The names in *names* that are no system call of this machine's architecture."""
    import pyseccomp

    return [n for n in names if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, n) < 0]


def _bpf(deny: tuple[str, ...], allow: tuple[str, ...], kill: bool) -> bytes:
    """The filter as libseccomp compiles it, exported as classic BPF."""
    import pyseccomp as sc

    action = sc.KILL_PROCESS if kill else sc.ERRNO(errno.EPERM)
    if allow:
        rules = sc.SyscallFilter(action)
        for name in allow:
            rules.add_rule(sc.ALLOW, name)
    else:
        rules = sc.SyscallFilter(sc.ALLOW)
        for name in deny:
            rules.add_rule(action, name)
    # The sandbox sets no_new_privs itself (or leaves it to CAP_SYS_ADMIN).
    rules.set_attr(sc.Attr.CTL_NNP, 0)
    memory = os.memfd_create("forkserver-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(memory), "wb") as out:
            rules.export_bpf(out)
        return os.pread(memory, os.fstat(memory).st_size, 0)
    finally:
        os.close(memory)


def _compiled(deny: tuple[str, ...], allow: tuple[str, ...], kill: bool) -> bytes:
    """:func:`_bpf`, run in a child process: the serving parent must never import
    pyseccomp.  It imports ctypes.util, which imports threading, whose at-fork
    hook then made every connection's child copy ~160 more pages: +1 ms of CPU
    per connection (perf, 1 client, echo: 351 faults per child against 185),
    most of what seccomp seemed to cost."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(r)
            with os.fdopen(w, "wb") as out:
                out.write(_bpf(deny, allow, kill))
            status = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(w)
    with os.fdopen(r, "rb") as got:
        code = got.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not code or len(code) % BPF_INSTRUCTION:
        raise RuntimeError(f"libseccomp could not compile the filter (status {status})")
    return code


class Program:
    """A filter compiled to BPF in the parent; ``prepared()`` is the call that
    installs it in a child (needs no_new_privs or CAP_SYS_ADMIN)."""

    def __init__(self, deny: tuple[str, ...], allow: tuple[str, ...], kill: bool) -> None:
        self.code = _compiled(deny, allow, kill)
        # Built here so the child only passes a pointer to the kernel.
        self._buffer = ctypes.create_string_buffer(self.code, len(self.code))
        self._fprog = _SockFprog(len(self.code) // BPF_INSTRUCTION, ctypes.addressof(self._buffer))

    @property
    def instructions(self) -> int:
        return len(self.code) // BPF_INSTRUCTION

    def prepared(self) -> Prepared:
        """prctl(PR_SET_SECCOMP) with this filter, as a call a child runs (calls.run_prepared)."""
        return prepare_prctl(
            "PR_SET_SECCOMP", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(self._fprog)
        )
