"""Each connection's sandbox: built once in the parent, applied by each child.

Nothing here is imported unless a ``[sandbox]`` table is configured: the
parent then gives its connection children :class:`SandboxedLimits` instead
of plain ``ChildLimits`` (decided once, in ``parent/parent.py``), and
``child/start.py``'s ``limits.apply_to_process()`` becomes, in the child::

    1. network = "none": unshare(CLONE_NEWNET)  while the child may still be root
    2. rlimits, then the user/group drop        (ChildLimits)
    3. prctl(PR_SET_NO_NEW_PRIVS)
    4. landlock_restrict_self(ruleset fd)       the ruleset built by the parent
    5. prctl(PR_SET_SECCOMP, BPF)               compiled by the parent; last, as
                                                it may deny the calls above

and only then the handler (or the TLS handshake) runs.  The metrics scrape
children keep plain limits: they serve the parent's numbers, not clients.

A ``[[listen]]`` table's own sandbox is a second :class:`Prebuilt`, held by
that listener's ``Service`` and entered just before its handler (all five
steps but the user drop); the kernel stacks it on the first: Landlock
rulesets and seccomp filters can only take more away.
"""

from __future__ import annotations

import os

from .. import log
from ..child.limits import ChildLimits
from . import calls

TYPE_CHECKING = False
if TYPE_CHECKING:
    from ..config import Settings
    from ..config.sandbox import Sandbox
    from .calls import Prepared
    from .seccomp import Program

__all__ = ["Prebuilt", "SandboxedLimits"]

logger = log.get_logger(__name__)


class Prebuilt:
    """What a child applies, built once: the Landlock ruleset fd and the seccomp BPF."""

    def __init__(self, sandbox: Sandbox, label: str = "each connection") -> None:
        self.network_none = sandbox.network == "none"
        self.ruleset = -1
        self.program: Program | None = None
        said: list[str] = []
        if sandbox.landlock != "off":
            from . import landlock

            version = landlock.abi()
            if version == 0:  # only with "best-effort": the config check refused "on"
                logger.warning("sandbox: this kernel has no Landlock; filesystem rules not applied")
            else:
                self.ruleset = landlock.build(sandbox.read, sandbox.read_write, version)
                lost = landlock.lost_rights(version)
                said.append(f"landlock ABI {version}")
                if lost:
                    logger.warning(
                        "sandbox: Landlock ABI %d cannot restrict %s: those stay allowed",
                        version, ", ".join(lost),
                    )  # fmt: skip
        if sandbox.syscalls_deny or sandbox.syscalls_allow:
            from .seccomp import Program

            kill = sandbox.syscall_action == "kill"
            self.program = Program(sandbox.syscalls_deny, sandbox.syscalls_allow, kill)
            kind = "allow list" if sandbox.syscalls_allow else "deny list"
            said.append(f"seccomp {kind} ({self.program.instructions} BPF instructions)")
        if self.network_none:
            said.append('network "none"')
        # no_new_privs goes with any other setting: Landlock and seccomp need it
        # (or CAP_SYS_ADMIN) and it stops a setuid program undoing the rest.
        self.no_new_privs = sandbox.no_new_privs and bool(
            self.ruleset >= 0 or self.program is not None or self.network_none
        )
        if self.no_new_privs:
            said.append("no_new_privs")
        # What a child calls, in order, every argument converted here: an
        # import, a wrapper or a conversion run in each child would copy the
        # pages it touches (calls.run_prepared).
        self._calls: list[Prepared] = []
        if self.no_new_privs:
            self._calls.append(calls.prepare_no_new_privs())
        if self.ruleset >= 0:
            from .landlock import prepare_restrict_self

            self._calls.append(prepare_restrict_self(self.ruleset))
        if self.program is not None:
            self._calls.append(self.program.prepared())
        logger.info("sandbox for %s: %s", label, ", ".join(said) or "nothing applies")

    def apply(self) -> None:
        """In the child, after the user drop: steps 3-5 (raises OSError)."""
        calls.run_prepared(self._calls)
        if self.ruleset >= 0:
            os.close(self.ruleset)  # the handler has no use for it

    def enter(self) -> None:
        """A listener's sandbox, in the child just before its handler: all of it
        at once (the config refuses network = "none" here if the user drop came first)."""
        if self.network_none:
            calls.leave_network()
        self.apply()

    def close(self) -> None:
        """In the parent, when it is done forking."""
        if self.ruleset >= 0:
            os.close(self.ruleset)
            self.ruleset = -1


class SandboxedLimits(ChildLimits):
    """A connection child's limits with the sandbox after the user drop."""

    def __init__(self, settings: Settings, sandbox: Sandbox) -> None:
        super().__init__(settings)
        self.sandbox = Prebuilt(sandbox)
        self.any = True

    def apply_to_process(self) -> None:
        if self.sandbox.network_none:
            # Before the user drop: a new network namespace needs CAP_SYS_ADMIN.
            calls.leave_network()
        super().apply_to_process()
        self.sandbox.apply()
