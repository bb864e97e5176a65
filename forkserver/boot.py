"""Re-executing into a lean parent, and the lean parent's main().

Every page the serving parent holds is copied into page tables at each fork
and torn down at each child's exit, so the parent's size is paid once per
connection.  The command line needs argparse, tomllib and the settings
machinery only to start: once the config is valid and the listeners are
bound, ``cli.main()`` re-executes ``python -m forkserver`` with the same
arguments (same pid) and passes the settings, ``sys.path`` and the
listeners across exec (handover.py).

The new image sees the variable, skips all parsing and runs the parent loop
with only what serving needs imported (measured: 4 MB less anonymous memory
than the CLI's image, ``bench/fork_cost.py``).
"""

from __future__ import annotations

import os
import sys

from . import log
from .errors import ConfigError
from .handover import BOOT_ENV, stash, unstash
from .listeners import Listener
from .parent import pidfds

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from .config import Settings

__all__ = ["exec_lean_parent", "lean_main"]

_SET_BY_US = "FORKSERVER_SET_ENV"  # variables we set only for the exec


def exec_lean_parent(
    settings: Settings,
    source: str,
    listeners: Sequence[Listener],
    argv: list[str],
    handover: dict[str, Any] | None = None,
    metrics_listener: Listener | None = None,
) -> None:
    """Replace this process with a lean parent; never returns.

    *source* names where the settings came from, for error messages;
    *handover* carries children to adopt and a readiness fd (take_handover)."""
    import dataclasses
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    values = dataclasses.asdict(settings)
    # Every listener as a [[listen]] table, also those host, port and unix make.
    values["listen"] = [dataclasses.asdict(spec) for spec in settings.listeners()]
    state = {
        "settings": values,
        "source": source,
        "path": [root, *sys.path],
        "listeners": [lis.inherit() for lis in listeners],
        "argv": argv,
        "metrics": metrics_listener.inherit() if metrics_listener else None,
        "children": (handover or {}).get("children", []),
        "ready_fd": (handover or {}).get("ready_fd", -1),
    }
    os.environ[BOOT_ENV] = stash(state)
    # Room for a pidfd per child, made here: limits survive exec, and the lean
    # parent then need not import resource (parent/pidfds.py says why).
    pidfds.make_room(settings.max_children)
    # Resolve every symbol of libpython and libc once, in the parent, rather
    # than lazily on first call in each child (each resolution writes the GOT,
    # a page copied per child: ~14 faults per connection, measured).
    if "LD_BIND_NOW" not in os.environ:
        os.environ["LD_BIND_NOW"] = "1"
        os.environ[_SET_BY_US] = "LD_BIND_NOW"
    # Keep the interpreter's own flags (-X dev, -W ...), as multiprocessing does.
    flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    if not _site_needed():
        flags.append("-S")
    sys.stdout.flush()
    sys.stderr.flush()
    # -c, not -m: runpy and importlib.util would be the parent's largest imports.
    boot = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from forkserver.cli import main; raise SystemExit(main())"
    )
    os.execv(sys.executable, [sys.executable, *flags, "-c", boot, *argv])


# Import hooks that site installs which the lean parent can do without:
# setuptools' distutils shim, and forkserver's own editable-install finder
# (its package root is put on sys.path instead).
_STANDARD_FINDERS = ("BuiltinImporter", "FrozenImporter", "PathFinder", "DistutilsMetaFinder")


def _site_needed() -> bool:
    """Whether the lean parent must run site: only when some import hook
    (an editable install's finder, say) is needed to find the handler.  Without
    site (-S) the parent is ~2 MB smaller: site's .pth files import pathlib,
    re and urllib in an editable install."""
    for finder in sys.meta_path:
        name = getattr(finder, "__name__", type(finder).__name__)
        module = getattr(finder, "__module__", "") or ""
        if name in _STANDARD_FINDERS or module.startswith("__editable___pyforkserver_"):
            continue
        return True
    return False


def _restore_site_builtins() -> None:
    """exit() and quit() come from site; a handler may call them."""
    import builtins

    if not hasattr(builtins, "exit"):
        import _sitebuiltins

        builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
        builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")


def lean_main(blob: str) -> int:
    """The re-executed parent: adopt the listeners, import the handler, serve."""
    from .config.settings import Settings
    from .handlers import import_handler
    from .server import Server

    state = unstash(blob)
    if os.environ.pop(_SET_BY_US, None):  # ld.so has read it: keep it from handlers
        os.environ.pop("LD_BIND_NOW", None)
    sys.path[:] = state["path"]
    _restore_site_builtins()
    # A real Settings, rebuilt without checking again or importing the config
    # machinery (config/fields.py says why): "listen" holds every listener,
    # so settings.listeners() builds none.
    settings = Settings.from_dict(state["settings"])
    listeners = [Listener.adopt(**info) for info in state["listeners"]]
    log.setup(settings.log_level, settings.log_format)
    try:
        handler = import_handler(settings.handler, state["source"]) if settings.handler else None
        # If the handler module brought in stdlib logging, route through it.
        log.setup(settings.log_level, settings.log_format)
        server = Server.from_settings(settings, handler, listeners, state["source"])
    except ConfigError as exc:
        print(f"forkserver: {exc}", file=sys.stderr)
        handed_over = state["ready_fd"] >= 0 or bool(state["children"])
        for listener in listeners:
            if handed_over:  # the socket files are the old parent's, still serving
                listener.close()
            else:
                listener.close_and_unlink()
        return 2
    if state["ready_fd"] >= 0:  # for the upgrade's old parent only, never for children
        os.set_inheritable(state["ready_fd"], False)
    if state["metrics"]:
        server.metrics_listener = Listener.adopt(**state["metrics"])
    server.adopt(state["argv"], state["children"], state["ready_fd"])
    if settings.proc_title:
        from . import title

        title.enable(state["source"], settings.handler, listeners)
    server.exiting_after_serve = True
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
