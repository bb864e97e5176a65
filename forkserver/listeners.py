"""Listening sockets: created and bound in the parent, closed in every child.

TCP listeners take SO_REUSEADDR so a restarted server binds at once even with
old connections in TIME_WAIT.  ``::`` is dual-stack unless an IPv4 wildcard
on the same port is configured too.  A Unix socket path left behind by a dead
server is replaced; a path a live server still answers on is never stolen.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Sequence

from . import log

# The address helpers moved to addresses.py; imported here under their old names
# for the modules that still import them from listeners.
from .addresses import address_problem, format_address, host_port, listen_key, parse_address
from .errors import BindError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "BindError",
    "Listener",
    "address_problem",
    "format_address",
    "listen_key",
    "open_listeners",
    "parse_address",
    "somaxconn",
]

logger = log.get_logger(__name__)

SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"
_SO_ATTACH_FILTER = 26  # Linux; not exported by the socket module


def somaxconn() -> int | None:
    """The kernel's cap on any listen() backlog, or None where unknown."""
    try:
        with open(SOMAXCONN_PATH) as fp:
            return int(fp.read())
    except (OSError, ValueError):
        return None


# A listener's key names its kind first: these bind by host and port, those by path.
INET_KINDS = ("tcp", "udp")
UNIX_KINDS = ("unix", "unixgram")

# accept() errors that concern one connection only: skip it, keep accepting.
SKIPPED_ACCEPT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
# Out of descriptors or kernel memory (EMFILE and the like): pause accepting
# this long rather than retry at once, which would spin.
BACKOFF_SECONDS = 0.1


class Listener:
    """One bound, listening, non-blocking socket."""

    def __init__(
        self,
        sock: socket.socket,
        unix_inode: tuple[int, int] | None = None,
        key: tuple[str, ...] = (),
    ) -> None:
        self.sock = sock
        self.family = sock.family
        self.address = sock.getsockname()
        # A UDP socket: read with recvfrom() (one child per datagram), never accepted.
        self.datagram = sock.type == socket.SOCK_DGRAM
        # How its connections are served, when not the server's default
        # handler on plain TCP: set by the server (service.py), from the
        # config.Listen it was bound for (spec, kept as a dict across a reload).
        self.service: Any = None
        self.spec: dict[str, Any] | None = None
        # What the config said ("tcp", host, port) / ("unix", path), or
        # ("systemd", name): a reload keeps a listener whose key is unchanged.
        self.key = key
        # (st_dev, st_ino) of the socket file we created, so that close() never
        # unlinks a file that a successor server has since put at the same path.
        self._unix_inode = unix_inode

    @property
    def name(self) -> str:
        shown = format_address(self.family, self.address)
        if not self.datagram:
            return shown
        if self.family == socket.AF_UNIX:
            return "unixgram:" + shown.removeprefix("unix:")
        return "udp:" + shown

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self.sock.fileno() == -1

    def close(self) -> None:
        """Close the socket, leaving any Unix socket file in place."""
        self.sock.close()

    def hand_over(self) -> None:
        """Close our copy for good, the Unix socket file now another
        process's to remove (an upgrade's new parent serves on it)."""
        self.sock.close()
        self._unix_inode = None

    def inherit(self) -> dict[str, object]:
        """Mark the fd to survive exec(); returns what adopt() needs on the other side."""
        os.set_inheritable(self.sock.fileno(), True)
        return {
            "fd": self.sock.fileno(),
            "unix_inode": self._unix_inode,
            "key": self.key,
            "spec": self.spec,
        }

    @classmethod
    def adopt(
        cls,
        fd: int,
        unix_inode: Sequence[int] | None = None,
        key: Sequence[str] = (),
        spec: dict[str, Any] | None = None,
    ) -> Listener:
        """Take over a listening socket inherited as *fd* (after exec)."""
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sock.setblocking(False)
        inode = (unix_inode[0], unix_inode[1]) if unix_inode else None
        listener = cls(sock, inode, tuple(key))
        listener.spec = spec
        return listener

    def refuse_new(self) -> None:
        """Stop the kernel from starting new TCP connections on this listener
        (a socket filter drops incoming SYNs), while those it has queued stay.

        For a graceful stop: the queue is drained after this, then the
        socket shut down.  Without the filter a connection whose handshake
        completed between the last accept() and the shutdown would be reset
        (the client thinks it connected); with it that client's SYN goes
        unanswered, and its retry, a second later, is refused: a proxy can
        send it elsewhere."""
        if self.family not in (socket.AF_INET, socket.AF_INET6) or self.datagram:
            return
        import ctypes
        import struct

        # Classic BPF, on the TCP header: drop if (flags & (SYN|ACK)) == SYN.
        program = [(0x30, 0, 0, 13), (0x54, 0, 0, 0x12), (0x15, 0, 1, 0x02)]
        program += [(0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF)]
        code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))
        fprog = struct.pack("HL", len(program), ctypes.addressof(code))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
        except OSError:
            pass  # no socket filters here: the window stays, it is short

    def close_and_unlink(self) -> None:
        self.close()
        if self._unix_inode is None:
            return
        path = str(self.address)
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == self._unix_inode:
                os.unlink(path)
        except OSError:
            pass
        self._unix_inode = None


def _bind_inet(
    host: str,
    port: int,
    backlog: int,
    dual_stack: bool,
    reuse_port: bool = False,
    kind: int = socket.SOCK_STREAM,
    reuse_address: bool = True,
) -> Listener:
    """A TCP listener, or with kind=SOCK_DGRAM a bound UDP socket."""
    udp = kind == socket.SOCK_DGRAM
    shown = ("udp:" if udp else "") + host_port(host, port)
    try:
        infos = socket.getaddrinfo(host or "0.0.0.0", port, type=kind, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot resolve {shown}: {exc.strerror}", exc.errno) from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        if reuse_address:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind(sockaddr)
        if not udp:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(
            f"cannot {'bind' if udp else 'listen on'} {shown}: {exc.strerror}", exc.errno
        ) from None
    return Listener(sock, key=("udp" if udp else "tcp", host, str(port)))


def _remove_stale_unix(path: str, kind: int = socket.SOCK_STREAM) -> None:
    """Unlink *path* if it is a socket no server answers on; refuse otherwise.
    *kind* is the socket type to probe with: connect() to a live datagram
    socket succeeds too, and to a dead one is refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise BindError(f"cannot listen on unix:{path}: {exc.strerror}", exc.errno) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BindError(
            f"cannot listen on unix:{path}: file exists and is not a socket", errno.EADDRINUSE
        )
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        logger.info("removing stale socket file %s", path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # someone else cleaned it up meanwhile
        return
    except OSError as exc:
        if exc.errno == errno.EAGAIN:  # its backlog is full: someone is alive there
            raise BindError(
                f"cannot listen on unix:{path}: a live server is using it", errno.EADDRINUSE
            ) from None
        raise BindError(f"cannot listen on unix:{path}: {exc.strerror}", exc.errno) from None
    finally:
        probe.close()
    raise BindError(f"cannot listen on unix:{path}: a live server is using it", errno.EADDRINUSE)


def _bind_unix(path: str, backlog: int, mode: int, kind: int = socket.SOCK_STREAM) -> Listener:
    """A Unix-domain listener, or with kind=SOCK_DGRAM a bound datagram socket."""
    _remove_stale_unix(path, kind)
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.bind(path)
        st = os.stat(path)
        os.chmod(path, mode)
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on unix:{path}: {exc.strerror or exc}", exc.errno) from None
    key = ("unix" if kind == socket.SOCK_STREAM else "unixgram", path)
    return Listener(sock, unix_inode=(st.st_dev, st.st_ino), key=key)


def adopt_activated(fds: list[tuple[int, str]]) -> list[Listener]:
    """Listeners from sockets passed by systemd (socket activation)."""
    listeners = []
    for fd, name in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise BindError(f"fd {fd} ({name}) from systemd: {exc.strerror}", exc.errno) from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            sock.detach()
            raise BindError(f"fd {fd} ({name}) from systemd is not a listening stream socket")
        sock.detach()
        listeners.append(Listener.adopt(fd, key=("systemd", name)))
        logger.info("using socket %s (%s) passed by systemd", listeners[-1].name, name)
    return listeners


def open_metrics_listener(
    address: str, backlog: int, reuse: Sequence[Listener] = ()
) -> Listener | None:
    """The listener of the metrics endpoint ("HOST:PORT"), kept across a reload."""
    if not address:
        return None
    key = ("metrics", address)
    for listener in reuse:
        if listener.key == key:
            return listener
    host, port = parse_address(address)
    listener = _bind_inet(host, port, backlog, dual_stack=True)
    listener.key = key
    return listener


def open_listeners(
    specs: Sequence[Any],
    backlog: int,
    unix_mode: int,
    reuse: Sequence[Listener] = (),
    reuse_port: bool = False,
    reuse_address: bool = True,
) -> list[Listener]:
    """Bind every configured listener (config.Listen), or close what was bound
    and raise BindError.

    *reuse* are listeners inherited across a reload: one whose configured
    address is still configured is kept (its queue, and the connections
    waiting in it, survive); the others are closed once the rest is bound.
    Sockets systemd passed are always kept."""
    kept: dict[tuple[str, ...], list[Listener]] = {}
    for lis in reuse:
        if lis.key[:1] != ("metrics",):
            kept.setdefault(lis.key, []).append(lis)
    cap = somaxconn()
    if cap is not None and backlog > cap:
        logger.warning(
            "backlog %d exceeds net.core.somaxconn=%d: the kernel silently caps it at %d",
            backlog,
            cap,
            cap,
        )
    keys = [spec.key for spec in specs]
    # "::" accepts IPv4 too unless the IPv4 wildcard on the same port is also
    # configured, in which case both would claim 0.0.0.0:PORT and the second
    # bind would fail.
    v4_wildcards = {(k[0], k[2]) for k in keys if k[0] in INET_KINDS and k[1] in ("", "0.0.0.0")}
    listeners: list[Listener] = []
    try:
        for key in keys:
            old = kept.get(key, [None]).pop(0) if kept.get(key) else None
            if old is not None:
                if old.sock.type == socket.SOCK_STREAM:
                    old.sock.listen(backlog)  # the backlog may have changed
                listeners.append(old)
            elif key[0] in UNIX_KINDS:
                kind = socket.SOCK_DGRAM if key[0] == "unixgram" else socket.SOCK_STREAM
                listeners.append(_bind_unix(key[1], backlog, unix_mode, kind))
            else:
                dual_stack = (key[0], key[2]) not in v4_wildcards
                kind = socket.SOCK_DGRAM if key[0] == "udp" else socket.SOCK_STREAM
                listeners.append(
                    _bind_inet(
                        key[1], int(key[2]), backlog, dual_stack, reuse_port, kind, reuse_address
                    )
                )
    except BindError:
        for listener in listeners:
            if listener not in reuse:
                listener.close_and_unlink()
        raise
    for old_key, olds in kept.items():
        for old in olds:
            if old_key[0] == "systemd":
                listeners.append(old)
            else:
                logger.info("closing listener %s: no longer configured", old.name)
                old.close_and_unlink()
    return listeners
