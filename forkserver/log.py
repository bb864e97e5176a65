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

__all__ = ["INTERVAL", "LEVELS", "Logger", "Throttle", "get_logger", "setup"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_NAMES = {v: k.upper() for k, v in LEVELS.items()}
FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


class Throttle:
    """Allows one log line per interval and counts what it held back."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = -interval
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


INTERVAL = 10.0  # at most one line per interval for a fault that repeats


class _State:
    """How records are written; set once by setup()."""

    own = False  # True: write lines ourselves; False: stdlib logging
    level = LEVELS["info"]
    fd = 2
    json = False  # one JSON object per line instead of text


_state = _State()


def setup(level: str, fmt: str = "text", fd: int = 2) -> None:
    """Configure output for the command line: lines to *fd* at *level*, as
    "text" or "json" lines."""
    _state.level = LEVELS[level]
    _state.fd = fd
    _state.json = fmt == "json"
    if "logging" in sys.modules:
        import logging

        logging.basicConfig(level=_state.level, format=FORMAT, stream=sys.stderr, force=True)
        if _state.json:
            for handler in logging.getLogger().handlers:
                handler.setFormatter(_json_formatter())
        _state.own = False
    else:
        _state.own = True


def reopen(path: str) -> None:
    """Point fd 2 (stderr: the parent's log, the children's, their stray
    tracebacks) at *path*, opened for appending; at start and on SIGUSR1,
    after logrotate has moved the old file away."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.dup2(fd, 2)  # the duplicate is inheritable: children write here too
    finally:
        os.close(fd)


def _format_json(level: int, name: str, text: str, created: float, fields: dict[str, Any]) -> str:
    import json  # only once JSON lines were asked for

    local = time.localtime(created)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", local)
    record = {
        "time": f"{stamp}.{int(created % 1 * 1000):03d}{time.strftime('%z', local)}",
        "level": _NAMES.get(level, str(level)),
        "logger": name,
        "pid": os.getpid(),
        "message": text,
        **fields,
    }
    return json.dumps(record, default=str)


def _json_formatter() -> Any:
    import logging

    class JSONFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + self.formatException(record.exc_info)
            fields = getattr(record, "fields", None) or {}
            return _format_json(record.levelno, record.name, text, record.created, fields)

    return JSONFormatter()


class Logger:
    """A named logger; see the module docstring for where records go."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def isEnabledFor(self, level: int) -> bool:
        if _state.own:
            return level >= _state.level
        return bool(_stdlib(self.name).isEnabledFor(level))

    def _log(
        self,
        level: int,
        msg: str,
        args: tuple[Any, ...],
        exc: bool = False,
        fields: dict[str, Any] | None = None,
    ) -> None:
        if not _state.own:
            extra = {"fields": fields} if fields else None
            _stdlib(self.name).log(level, msg, *args, exc_info=exc, stacklevel=3, extra=extra)
            return
        if level < _state.level:
            return
        text = msg % args if args else msg
        if exc:
            import traceback  # only on the error path: keep it out of the parent

            text += "\n" + "".join(traceback.format_exception(*sys.exc_info())).rstrip("\n")
        now = time.time()
        if _state.json:
            line = _format_json(level, self.name, text, now, fields or {}) + "\n"
        else:
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

    def record(self, msg: str, *args: Any, **fields: Any) -> None:
        """An INFO line whose *fields* become keys of their own in JSON lines
        (the access log)."""
        self._log(20, msg, args, fields=fields)

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
