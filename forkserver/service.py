"""How one listener's connections are served: its handler, TLS, PROXY protocol.

A listener configured with nothing of its own (plain TCP or Unix, the
server's handler) has no Service, and its connections take the shortest path
from fork to handler.  The others carry one, built in the parent before the
first fork so that a bad certificate or handler fails the start, not a child:

* ``tls``: an ``ssl.SSLContext`` with the certificate loaded once; the
  handshake itself runs in the child (:meth:`Service.handshake`), so a slow
  or hostile client never holds up the parent;
* ``trusted``: the networks allowed to send PROXY protocol headers, which
  the parent reads without blocking (``headers.py``) before admission;
* ``datagram``: a UDP socket, one child per datagram.
"""

from __future__ import annotations

import socket

from . import log
from .addresses import format_address, listen_key
from .errors import ConfigError
from .handlers import import_handler, is_handler_class

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    from typing import Any

    from .handlers import HandlerType
    from .sandbox import Prebuilt

__all__ = ["Service", "build_services", "tls_context"]

logger = log.get_logger(__name__)


class Service:
    """What a listener's connections get besides the default path."""

    def __init__(
        self, spec: Any, handler: HandlerType, server: Any, datagram: bool, source: str = ""
    ) -> None:
        self.handler = handler
        self._handler_is_class = is_handler_class(handler)
        self._server = server
        self.datagram = datagram
        self.tls: ssl.SSLContext | None = None
        self.handshake_timeout: float = spec.tls_handshake_timeout
        if spec.tls_cert:
            self.tls = tls_context(spec, source)
        self.trusted: tuple[Any, ...] | None = None
        self.proxy_timeout: float = spec.proxy_timeout
        self.sandbox: Prebuilt | None = None
        if spec.sandbox:  # built once here; applied in the child just before the handler
            from .sandbox import Prebuilt

            self.sandbox = Prebuilt(spec.sandbox, f"the connections of {spec.name}")
            self.run = self._run_sandboxed  # type: ignore[method-assign]
        if spec.proxy_protocol:
            import ipaddress

            self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in spec.proxy_trusted)

    @property
    def label(self) -> str:
        """ " (tls, proxy)" after the listener's address in the log; "" for neither."""
        parts = [p for p, on in (("tls", self.tls), ("proxy", self.trusted is not None)) if on]
        return f" ({', '.join(parts)})" if parts else ""

    def run(self, request: Any, client_address: Any) -> None:
        """Run the handler for one connection or datagram (in the child)."""
        if self._handler_is_class:
            self.handler(request, client_address, self._server)
        else:
            self.handler(request, client_address)

    def _run_sandboxed(self, request: Any, client_address: Any) -> None:
        """run(), in this listener's sandbox (an OSError: the handler never runs)."""
        assert self.sandbox is not None
        self.sandbox.enter()
        Service.run(self, request, client_address)

    def trusts(self, family: int, peer: Any) -> bool:
        """Whether *peer* may send a PROXY header (Unix clients always may)."""
        if family == socket.AF_UNIX:
            return True
        import ipaddress

        address = ipaddress.ip_address(peer[0])
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        assert self.trusted is not None
        return any(address in net for net in self.trusted)

    def handshake(self, conn: socket.socket, family: int, peer: Any) -> tuple[socket.socket, bool]:
        """In the child: the TLS handshake, bounded by tls_handshake_timeout.

        Returns the socket that now holds the connection (an SSLSocket once
        wrapped) and whether the handshake succeeded; a failure (a plaintext
        client, a bad or missing client certificate, a timeout) is logged."""
        import ssl

        assert self.tls is not None
        previous = conn.gettimeout()
        conn.settimeout(self.handshake_timeout)
        shown = format_address(family, peer)
        try:
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            conn.do_handshake()
        except TimeoutError:
            logger.warning(
                "TLS handshake with %s timed out after %gs", shown, self.handshake_timeout
            )
            return conn, False
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
            logger.warning("TLS handshake with %s failed: %s", shown, reason)
            return conn, False
        conn.settimeout(previous)
        return conn, True

    @staticmethod
    def close_tls(conn: socket.socket) -> None:
        """Send TLS close_notify, not waiting for the client's (it may never come)."""
        if hasattr(conn, "unwrap"):
            try:
                conn.setblocking(False)
                conn.unwrap()
            except (OSError, ValueError):
                pass  # want-read (the client's close_notify), or no handshake was done


def tls_context(spec: Any, source: str = "") -> ssl.SSLContext:
    """The server-side context of a TLS listener (config.Listen); raises ConfigError."""
    import ssl

    where = f"{source + ': ' if source else ''}[[listen]] {'tcp' if spec.tcp else 'unix'} "
    where += spec.tcp or spec.unix
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(spec.tls_cert, spec.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{where}: cannot load tls_cert {spec.tls_cert} with tls_key {spec.tls_key}: "
            f"{getattr(exc, 'reason', None) or exc.strerror or exc}"
        ) from None
    if spec.tls_client_ca:
        try:
            context.load_verify_locations(spec.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{where}: cannot load tls_client_ca {spec.tls_client_ca}: "
                f"{getattr(exc, 'reason', None) or exc.strerror or exc}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _plain(spec: Any) -> bool:
    return not (
        spec.handler or spec.tls_cert or spec.proxy_protocol or spec.datagram or spec.sandbox
    )


def build_services(
    specs: Any, listeners: list[Any], default: HandlerType | None, server: Any, source: str = ""
) -> None:
    """Give each listener the Service its spec (config.Listen) asks for.

    A listener with no spec (systemd's sockets) or a plain one keeps None.
    Raises ConfigError for a handler that does not import or a certificate
    that does not load."""
    by_key: dict[tuple[str, ...], list[Any]] = {}
    for spec in specs:
        by_key.setdefault(listen_key(spec), []).append(spec)
    imported: dict[str, HandlerType] = {}
    for listener in listeners:
        candidates = by_key.get(listener.key)
        if candidates:
            spec = candidates.pop(0)
            listener.spec = dict(vars(spec))  # for a reload that keeps this socket
            if spec.sandbox is not None:  # a dict, as asdict() gives: it crosses exec
                listener.spec["sandbox"] = dict(vars(spec.sandbox))
        elif listener.spec is not None:
            # Not in the config: a reload that could not bind its new
            # addresses keeps serving on the old ones, as they were.
            from .config.listen import Listen

            spec = Listen.from_dict(listener.spec)
        else:
            spec = None
        if spec is None or _plain(spec):
            if default is None and not listener.datagram:
                raise ConfigError(f"{source}: server.handler is required for {listener.name}")
            continue
        if spec.handler:
            if spec.handler not in imported:
                imported[spec.handler] = import_handler(spec.handler, source)
            handler = imported[spec.handler]
        elif default is not None:
            handler = default
        else:
            raise ConfigError(f"{source}: [[listen]] {listener.name} has no handler")
        listener.service = Service(spec, handler, server, listener.datagram, source)
