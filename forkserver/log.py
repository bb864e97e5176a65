"""Log lines, without making every fork pay for the logging module.

Importing :mod:`logging` (which imports :mod:`threading`) registers at-fork
hooks that run in every child, and they make each child fault in pages it
would otherwise share: measured here, about 0.6 ms of CPU per connection on
top of a bare fork's 0.6 ms (``bench/fork_cost.py``).  So forkserver does not
import :mod:`logging` itself:

* The CLI calls :func:`setup`.  If the handler module already imported
  :mod:`logging` (so its hooks are paid for anyway), stdlib logging is
  configured with forkserver's format and everything goes through it, the
  handler's own loggers included.  Otherwise this module formats and writes
  the same lines to stderr itself.
* Used as a library (``forkserver.Server`` without :func:`setup`), records go
  to stdlib logging, imported on first use: the program's own logging
  configuration applies, as it would for socketserver.

:func:`get_logger` has the shape of ``logging.getLogger``: ``debug``,
``info``, ``warning``, ``error``, ``exception``, with lazy ``%`` arguments.
"""

from __future__ import annotations

import os
import sys
import time

# typing stays out of the serving parent: only the type checker reads these.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["LEVELS", "Logger", "get_logger", "setup"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_NAMES = {v: k.upper() for k, v in LEVELS.items()}
FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


class _State:
    """How records are written; set once by setup()."""

    own = False  # True: write lines ourselves; False: stdlib logging
    level = LEVELS["info"]
    fd = 2


_state = _State()


def setup(level: str, fd: int = 2) -> None:
    """Configure output for the command line: lines to *fd* at *level*."""
    _state.level = LEVELS[level]
    _state.fd = fd
    if "logging" in sys.modules:
        import logging

        logging.basicConfig(level=_state.level, format=FORMAT, stream=sys.stderr, force=True)
        _state.own = False
    else:
        _state.own = True


class Logger:
    """A named logger; see the module docstring for where records go."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def isEnabledFor(self, level: int) -> bool:
        if _state.own:
            return level >= _state.level
        return bool(_stdlib(self.name).isEnabledFor(level))

    def _log(self, level: int, msg: str, args: tuple[Any, ...], exc: bool = False) -> None:
        if not _state.own:
            _stdlib(self.name).log(level, msg, *args, exc_info=exc, stacklevel=3)
            return
        if level < _state.level:
            return
        text = msg % args if args else msg
        if exc:
            import traceback  # only on the error path: keep it out of the parent

            text += "\n" + "".join(traceback.format_exception(*sys.exc_info())).rstrip("\n")
        now = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        millis = int(now % 1 * 1000)
        line = f"{stamp},{millis:03d} [{os.getpid()}] {_NAMES[level]} {self.name}: {text}\n"
        data = line.encode("utf-8", "backslashreplace")
        try:
            while data:
                data = data[os.write(_state.fd, data) :]
        except OSError:
            pass  # stderr is gone; there is nowhere left to report to

    def debug(self, msg: str, *args: Any) -> None:
        self._log(10, msg, args)

    def info(self, msg: str, *args: Any) -> None:
        self._log(20, msg, args)

    def warning(self, msg: str, *args: Any) -> None:
        self._log(30, msg, args)

    def error(self, msg: str, *args: Any) -> None:
        self._log(40, msg, args)

    def exception(self, msg: str, *args: Any) -> None:
        self._log(40, msg, args, exc=True)


def _stdlib(name: str) -> Any:
    import logging

    return logging.getLogger(name)


def get_logger(name: str) -> Logger:
    return Logger(name)
