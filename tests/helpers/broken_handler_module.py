"""A handler module that fails while it is imported (test_config.py's bad-config table)."""

from __future__ import annotations

raise RuntimeError("broken_handler_module refuses to load")
