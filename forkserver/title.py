"""Process titles: what ``ps`` and ``top`` show for the parent, a child and a spare.

With the optional ``setproctitle`` (``pip install 'pyforkserver[title]'``) and
``proc_title`` on, the serving parent started by the command line shows
``forkserver: master [conf/echo.toml] 127.0.0.1:7000``, a child
``forkserver: conn 127.0.0.1:54321`` and an idle spare ``forkserver: spare``.
Without the library every process keeps its interpreter's command line and
nothing is logged: titles are a convenience, never a reason not to serve.

A ``Server`` used as a library inside another program leaves the titles
alone: the process is its host's to name.
"""

from __future__ import annotations

import os

from .addresses import format_address

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from .listeners import Listener

__all__ = ["child", "enable", "set_title"]

PREFIX = "forkserver: "

# setproctitle.setproctitle once titles are enabled, else None: a child tests
# this one global and pays nothing more when titles are off (child/start.py).
set_title: Callable[[str], None] | None = None


def enable(source: str, handler: str | None, listeners: Sequence[Listener]) -> bool:
    """Title this process as the serving parent and let its children title
    themselves; False (and nothing changed) when setproctitle is missing.

    *source* is the config file ("command line" when there is none, then
    *handler* names the service)."""
    global set_title
    setproctitle = _load()
    if setproctitle is None:
        return False
    named = source if source != "command line" else handler
    addresses = " ".join(listener.name for listener in listeners)
    # SPT_NOENV: the title gets argv's space alone (the lean parent's command
    # line is long enough), and the environment block is left where it is:
    # otherwise /proc/PID/environ of the parent and every child reads empty,
    # for tools and for the bench's leak check (tests/helpers/bench.py).
    # Read at the first call, which is made here once, not in each child.
    before = os.environ.get("SPT_NOENV")
    os.environ["SPT_NOENV"] = "1"
    try:
        setproctitle(f"{PREFIX}master [{named}] {addresses}".rstrip())
    finally:
        if before is None:
            del os.environ["SPT_NOENV"]
        else:
            os.environ["SPT_NOENV"] = before
    set_title = setproctitle
    return True


def _load() -> Callable[[str], None] | None:
    """setproctitle's C function, or None when the library is not installed.

    The extension is loaded by itself, without the package's __init__: that
    imports logging, whose at-fork hooks made every child copy ~100 more
    pages (+100 faults and ~0.7 ms of CPU per connection, measured with
    bench.compare).  The C module imports nothing."""
    from importlib.machinery import PathFinder

    package = PathFinder.find_spec("setproctitle")
    if package is None or not package.submodule_search_locations:
        return None
    spec = PathFinder.find_spec("_setproctitle", list(package.submodule_search_locations))
    if spec is None or spec.loader is None:
        return None  # the pure-Python fallback only: it sets nothing
    try:
        module = spec.loader.create_module(spec)
        spec.loader.exec_module(module)  # type: ignore[arg-type]
    except ImportError:
        return None  # built for another Python
    setproctitle: Callable[[str], None] = module.setproctitle  # type: ignore[union-attr]
    return setproctitle


def child(family: int, peer: Any) -> str:
    """A child's title: its peer, or ``spare`` before it has one (*family* 0)."""
    if not family:
        return f"{PREFIX}spare"
    return f"{PREFIX}conn {format_address(family, peer)}"
