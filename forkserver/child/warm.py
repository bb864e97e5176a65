"""Warm the child's path before the first fork, so children do not each pay for it.

Every page a child writes is copied for that child (copy-on-write), and
CPython writes more than refcounts: the first run of a function rewrites
its bytecode with specialized instructions, and the first lookup of a name
on a type fills the interpreter's type-attribute cache and may give the type
a version tag.  Done once in the parent, these writes are inherited by every
child instead of being redone, and copied, in each one.

:func:`warm_up` runs the connection path (``stream.serve``: the socket
object, close, shutdown) on a socketpair with a handler that does nothing,
formats a child's process title if titles are on, and looks up the handler
classes' attributes.  It never runs a user's handler: that could have
effects.  Measured with ``perf`` on the ``exceptions:page_fault_user``
tracepoint, 1 client, echo handler: a child took 181 page faults without
this, 165 with it (3 rounds then; see ROUNDS).

A spare (``spare_children``) warms again while it waits for a connection:
the pages it then copies are copied before a client is waiting, not after.
"""

from __future__ import annotations

import os
import socket

from .. import title
from .stream import serve

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

__all__ = ["warm_up"]

# Attributes the handler base classes set on each instance: a lookup of each
# on the class comes first (a data descriptor would take precedence).
INSTANCE_ATTRIBUTES = ("request", "client_address", "server", "connection", "rfile", "wfile")
# CPython 3.11 quickens a function's bytecode at its 8th call (before that,
# each call writes a counter in the code object: a page copied per function
# in every child).  3 rounds and no title warmed left a child 8.6 more page
# faults than this (198.7 against 190.1, 3 x 2,000 one-client connections).
ROUNDS = 10
# A peer of each family's type, for the child's process title (title.child).
PEERS: dict[int, Any] = {socket.AF_INET: ("127.0.0.1", 1), socket.AF_INET6: ("::1", 1, 0, 0)}


def _nothing(*args: Any) -> None:
    pass


def warm_up(families: Iterable[int], handlers: Iterable[Any], rounds: int = ROUNDS) -> None:
    """Run the connection path *rounds* times for each address family; look
    up each handler class's attributes."""
    a, b = socket.socketpair()
    with a, b:
        for family in set(families):
            for _ in range(rounds):
                serve(os.dup(a.fileno()), family, None, _nothing, _nothing)
                if title.set_title is not None:
                    title.child(family, PEERS.get(family, ""))
    for handler in handlers:
        if isinstance(handler, type):
            for name in (*dir(handler), *INSTANCE_ATTRIBUTES):
                getattr(handler, name, None)
