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
``cli`` (the command line).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import ConfigError, Settings
from .handlers import BaseHandler, StreamHandler
from .listeners import BindError
from .server import Server

__all__ = [
    "BaseHandler",
    "BindError",
    "ConfigError",
    "Server",
    "Settings",
    "StreamHandler",
    "__version__",
]
