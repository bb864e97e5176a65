"""The exceptions forkserver raises for a user's mistakes; main() maps them to exit codes."""

from __future__ import annotations

__all__ = ["BindError", "ConfigError"]


class ConfigError(Exception):
    """A setting is missing, unknown or out of range; the message says which (exit 2)."""


class BindError(Exception):
    """A listener could not be created; the message names the address and reason (exit 1)."""
