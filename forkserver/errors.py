"""The exceptions forkserver raises for a user's mistakes; main() maps them to exit codes."""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "BindError", "ConfigError"]

# What main() returns: 0 after a clean stop, 1 when the server could not run
# (a BindError, an unreachable server for `status`), 2 for a usage or
# configuration error (a ConfigError).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class ConfigError(Exception):
    """A setting is missing, unknown or out of range; the message says which (exit 2)."""


class BindError(Exception):
    """A listener could not be created; the message names the address and reason (exit 1)."""
