"""The exceptions forkserver raises for a user's mistakes; main() maps them to exit codes.

They are the built-in types a ``socketserver`` user already catches: a bad
setting is a ``ValueError``, a number out of range (a port of -1) also an
``OverflowError`` (socketserver's bind() raises that), and a failed bind an
``OSError`` carrying the errno.
"""

from __future__ import annotations

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "BindError",
    "ConfigError",
    "OutOfRangeError",
]

# What main() returns: 0 after a clean stop, 1 when the server could not run
# (a BindError, an unreachable server for `status`), 2 for a usage or
# configuration error (a ConfigError).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message says which (exit 2)."""


class OutOfRangeError(ConfigError, OverflowError):
    """A number outside its range (a port of -1 or 70000): what socketserver's bind() raises."""


class BindError(OSError):
    """A listener could not be created; the message names the address and reason (exit 1).

    ``errno`` is the failed call's (EADDRINUSE, EACCES...), or None when no
    call failed (a live server already answers on a Unix socket path)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # OSError's own slot: OSError(message) leaves it None
        self.strerror = message

    def __str__(self) -> str:
        return str(self.args[0])
