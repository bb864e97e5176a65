"""forkserver: the classic Unix process-per-connection server, done right.

Process model::

        SIGTERM/INT graceful stop, QUIT now, HUP reload, USR2 upgrade, USR1 reopen log
                              |  (the handler only writes a byte to the signal pipe)
    +------------------------ v -------- parent ---------------------------+
    | fds: listeners (TCP v4/v6, UDP, Unix; TLS or PROXY per listener),    |
    |      epoll, signal pipe, one pidfd per child, metrics listener;      |
    |      with spares: the handoff socketpair and the busy pipe           |
    | loop (parent/loop.py): epoll_wait, each ready fd's callback, one     |
    |      deadline heap                                                   |
    |   TCP/Unix  -> accept() -> admit? -> fork() -> close(conn)           |
    |   UDP       -> recvfrom() -> admit? -> fork() (the child answers)    |
    |   PROXY     -> header read without blocking, then admit? as above    |
    |   pipe      -> the action parent/signals.py names                    |
    |   pidfd     -> waitpid(that pid) alone: no SIGCHLD, no waitpid(-1)   |
    | at max_children: listeners leave the loop (the backlog waits)        |
    +---------+-------------------------------+----------------------------+
              | fork() per connection         | fork() ahead (spare_children)
    +---------v-----------------+   +---------v------------------------------+
    | child (child/stream.py,   |   | spare (child/spare.py): accepts from   |
    | child/datagram.py)        |   | the listener itself (EPOLLEXCLUSIVE),  |
    | signals back to SIG_DFL,  |   | or takes a connection the parent hands |
    | parent's fds closed,      |   | over (SCM_RIGHTS); then as a child.    |
    | handler(conn, addr),      |   | EOF on the handoff socket: exit 0      |
    | shutdown + close, _exit   |   +----------------------------------------+
    +---------------------------+

Signals are blocked across fork(), so a child never runs the parent's
handlers.  Where each step lives: a connection is accepted in
``parent/accept.py`` (a datagram in ``parent/datagrams.py``); what runs
after fork is in ``child/``; a child is reaped in ``parent/children.py``; a
signal is handled as ``parent/signals.py`` says; a setting is defined in
``config/settings.py``.  The README's module map lists every module.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "BaseHandler",
    "BindError",
    "ConfigError",
    "DatagramHandler",
    "ForkingMixIn",
    "ForkingTCPServer",
    "ForkingUDPServer",
    "ForkingUnixDatagramServer",
    "ForkingUnixStreamServer",
    "Listen",
    "Server",
    "Settings",
    "StreamHandler",
    "__version__",
]

TYPE_CHECKING = False
if TYPE_CHECKING:  # what the lazy attributes below resolve to, for the type checker
    from .compat import (
        ForkingMixIn,
        ForkingTCPServer,
        ForkingUDPServer,
        ForkingUnixDatagramServer,
        ForkingUnixStreamServer,
    )
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
    # socketserver's names (compat.py): "from forkserver import ForkingTCPServer".
    "ForkingMixIn": "compat",
    "ForkingTCPServer": "compat",
    "ForkingUDPServer": "compat",
    "ForkingUnixStreamServer": "compat",
    "ForkingUnixDatagramServer": "compat",
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
