"""forkserver: the classic Unix process-per-connection server, done right.

Process model::

                 SIGTERM/INT/QUIT/HUP/USR1/USR2 ──┐     SIGCHLD (child exited)
                                                  ▼        │
    ┌──────────────────── parent ────────────────────────────┴───────────┐
    │ fds: listeners (TCP v4/v6, Unix), selector, wakeup pipe            │
    │ loop: select(listeners + wakeup pipe), no timeout while idle       │
    │   listener readable → accept() → fork() → close(conn)              │
    │   wakeup readable   → drain; dispatch handle_<signal>();           │
    │                       reap: waitpid(-1, WNOHANG) until 0            │
    │ at max_children: stop selecting on listeners (kernel backlog waits) │
    └──────────┬────────────────────────────┬────────────────────────────┘
               │ fork()                     │ fork()
    ┌──────────▼─────────────┐   ┌──────────▼─────────────┐
    │ child: one connection  │   │ child: one connection  │
    │ closes listeners,      │   │ ...                    │
    │ selector, wakeup pipe; │   └────────────────────────┘
    │ signals back to SIG_DFL│
    │ handler(conn, addr)    │
    │ shutdown+close(conn)   │
    │ os._exit(status)       │
    └────────────────────────┘

Modules, in the order a connection meets them: ``listeners`` (bind, listen),
``server`` (the parent's loop: accept, fork, stop), ``wakeup`` (signals and
the self-pipe), ``child`` (what runs after fork), ``handlers`` (the handler
contract), ``children`` (the child table and reaping), ``config`` (settings),
``cli`` (the command line); around them ``admission`` (refusals before any
fork), ``pool`` (pre-forked spares), ``boot`` (the lean re-executed parent,
reload and upgrade), ``log``, ``systemd``, ``pidfile``, ``metrics`` and
``status``, and ``pytest_plugin`` (the ``forkserver`` fixture).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "BaseHandler",
    "BindError",
    "ConfigError",
    "DatagramHandler",
    "Listen",
    "Server",
    "Settings",
    "StreamHandler",
    "__version__",
]

TYPE_CHECKING = False
if TYPE_CHECKING:  # what the lazy attributes below resolve to, for the type checker
    from .config import Listen, Settings
    from .errors import BindError, ConfigError
    from .handlers import BaseHandler, DatagramHandler, StreamHandler
    from .server import Server

# Attributes load their module on first use (PEP 562): a handler module's
# "from forkserver import StreamHandler" must not pull the config machinery
# into the serving parent, whose every page each fork copies.
_LAZY = {
    "BaseHandler": "handlers",
    "StreamHandler": "handlers",
    "DatagramHandler": "handlers",
    "Listen": "config",
    "BindError": "errors",
    "ConfigError": "errors",
    "Server": "server",
    "Settings": "config",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'forkserver' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"forkserver.{module}"), name)
    globals()[name] = value
    return value
