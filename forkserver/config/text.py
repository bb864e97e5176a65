"""Values and messages made safe for a terminal: one line, escaped, cut to a readable length.

A config value reaches an error message as the user wrote it, and a value may
hold anything TOML can say: newlines (which would split the one-line error in
two), NUL, or a terminal's escape sequences.  :func:`show` writes a value for
a message; :func:`one_line` is the last pass over a whole message before it is
printed, whatever it holds.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["MAX_MESSAGE", "MAX_SHOWN", "escape", "one_line", "show", "show_key"]

MAX_SHOWN = 60  # characters of a string value shown in a message; the rest is cut
MAX_MESSAGE = 1000  # characters of a whole message

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", '"': '\\"'}


def _escaped(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    if char.isprintable():
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else repr(char)


def escape(text: str) -> str:
    """*text* with quotes, backslashes and every unprintable character escaped
    as in a TOML basic string (``\\n``, ``\\x00``, ``\\u001b`` ...)."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return "".join(map(_escaped, text))


def show(value: Any) -> str:
    """A value as TOML would write it, for messages: strings quoted and escaped,
    and anything long cut, saying how long it was."""
    if isinstance(value, str):
        if len(value) > MAX_SHOWN:
            return f'"{escape(value[:MAX_SHOWN])}..." ({len(value)} characters)'
        return f'"{escape(value)}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > 200:  # repr() stops at 4300 digits
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    if hasattr(value, "isoformat"):  # a TOML date, time or datetime
        return str(value.isoformat())
    text = one_line(repr(value))  # repr escapes the strings inside a list or a table
    return text if len(text) <= 2 * MAX_SHOWN else f"{text[: 2 * MAX_SHOWN]}... (cut)"


def show_key(key: str) -> str:
    """A TOML key for messages: bare if TOML would write it bare, else quoted as show()."""
    bare = key and len(key) <= MAX_SHOWN and key.isascii()
    if bare and key.replace("_", "a").replace("-", "a").isalnum():
        return key
    return show(key)


def one_line(message: str) -> str:
    """*message* as one printable line: every unprintable character (newline,
    NUL, ESC ...) escaped, and cut at MAX_MESSAGE characters."""
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "... (cut)"
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else _escaped(c) for c in message)
