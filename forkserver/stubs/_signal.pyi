# The C module behind `signal`, used directly on the per-connection path
# (plain ints in and out: no enum conversions). Only what forkserver calls.
from collections.abc import Iterable
from typing import Any

SIG_DFL: int
SIG_IGN: int
SIG_BLOCK: int
SIG_UNBLOCK: int
SIG_SETMASK: int

def signal(signalnum: int, handler: Any, /) -> Any: ...
def set_wakeup_fd(fd: int, /, *, warn_on_full_buffer: bool = ...) -> int: ...
def pthread_sigmask(how: int, mask: Iterable[int], /) -> set[int]: ...
