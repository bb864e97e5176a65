"""The ``[server]`` checks that need more than one key, or the machine.

Each key's own check (type, range, choices, its ``check=``) runs in
``checking.py``; what a key means beside another (``spare_children`` within
``max_children``), or for the account that starts the server (switching
``user`` needs root), is checked here, once every key has its value.
"""

from __future__ import annotations

import os

from ..errors import ConfigError
from .text import show

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["check_together"]

TABLE = "server"


def check_together(s: Settings) -> None:
    """Raise ConfigError for the first combination of settings that cannot work."""
    if s.user and os.geteuid() != 0:
        import pwd

        if pwd.getpwnam(s.user).pw_uid != os.geteuid():
            raise ConfigError(f"{TABLE}.user: switching to {show(s.user)} needs root")
    if s.group and os.geteuid() != 0:
        import grp

        if grp.getgrnam(s.group).gr_gid != os.getegid():
            raise ConfigError(f"{TABLE}.group: switching to {show(s.group)} needs root")
    if s.request_timeout_max and s.request_timeout_max < s.request_timeout:
        raise ConfigError(
            f"{TABLE}.request_timeout_max must be 0 or at least request_timeout "
            f"({s.request_timeout:g}), got {s.request_timeout_max:g}"
        )
    if s.user and any(t.sandbox and t.sandbox.network == "none" for t in s.listen):
        # A listener's sandbox applies after the user drop, and a network
        # namespace needs CAP_SYS_ADMIN; [sandbox]'s is made before the drop.
        raise ConfigError(
            f'{TABLE}.user: network = "none" in a [[listen]] sandbox needs children '
            "that keep root; give it in [sandbox] instead"
        )
    if s.spare_children > s.max_children:
        raise ConfigError(
            f"{TABLE}.spare_children must be at most max_children ({s.max_children}), "
            f"got {s.spare_children}"
        )
