"""``[[listen]]``: one listener's table, an address and how its connections are served."""

from __future__ import annotations

from ..addresses import listen_key
from ..errors import ConfigError
from .fields import Table, deferred_dataclass, setting
from .paths import check_file, check_socket_paths
from .sandbox import Sandbox
from .values import check_address, check_networks

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = ["LISTEN_TABLE", "Listen", "check_unique"]

LISTEN_TABLE = "listen"
# The keys that say what a table listens on; exactly one is given.
KINDS = ("tcp", "udp", "unix", "unix_datagram")


@deferred_dataclass(frozen=True)
class Listen(Table):
    """One ``[[listen]]`` table: an address and how its connections are served."""

    section = f"[[{LISTEN_TABLE}]]"

    tcp: str = setting(
        "", 'Listen on TCP "HOST:PORT" ("[::1]:PORT" for IPv6).', check=check_address(8000)
    )
    udp: str = setting(
        "",
        'Listen on UDP "HOST:PORT": each datagram is served by its own child, whose '
        "request is `(data, socket)` (socketserver's ForkingUDPServer).",
        check=check_address(8000),
    )
    unix: str = setting(
        "", "Listen on this Unix-domain socket path.", path=True, check=check_socket_paths
    )
    unix_datagram: str = setting(
        "",
        "Receive datagrams on this Unix-domain socket path: each is served by its own "
        "child, as for `udp` (socketserver's ForkingUnixDatagramServer).",
        path=True,
        check=check_socket_paths,
    )
    handler: str = setting(
        "", "This listener's handler (as `server.handler`); empty: `server.handler`."
    )
    tls_cert: str = setting(
        "",
        "PEM certificate chain: serve TLS here. The handshake runs in the child; the "
        "handler's request is an `ssl.SSLSocket`.",
        cli="--tls-cert",
        metavar="FILE",
        path=True,
        check=check_file,
    )
    tls_key: str = setting(
        "",
        "PEM private key for `tls_cert`.",
        cli="--tls-key",
        metavar="FILE",
        path=True,
        check=check_file,
    )
    tls_client_ca: str = setting(
        "",
        "PEM CA bundle: clients must present a certificate it signed (mutual TLS). "
        "Empty: no client certificate asked for.",
        path=True,
        check=check_file,
    )
    tls_handshake_timeout: float = setting(
        10.0,
        "Seconds a client gets to complete the TLS handshake; then its child closes "
        "the connection.",
        min=0.001,
        max=3600,
    )
    proxy_protocol: bool = setting(
        False,
        "Expect a PROXY protocol header (v1 or v2, as HAProxy's send-proxy sends) on "
        "each connection: the handler's `client_address`, `allow`/`deny` and the "
        "per-source limits use the client it names. Read by the parent, without "
        "blocking, before the connection is admitted.",
    )
    proxy_trusted: tuple[str, ...] = setting(
        ("127.0.0.0/8", "::1/128"),
        "Networks (CIDR) allowed to send PROXY headers; connections from elsewhere are "
        "closed. Unix-socket clients are trusted (the socket file's mode guards them).",
        check=check_networks,
    )
    proxy_timeout: float = setting(
        5.0,
        "Seconds to wait for the whole PROXY header; then the connection is closed.",
        min=0.001,
        max=3600,
    )
    sandbox: Sandbox | None = setting(
        None,
        "This listener's own sandbox, as a `[listen.sandbox]` table (the keys of "
        "`[sandbox]`): applied on top of `[sandbox]`, just before the handler (after the "
        "TLS handshake). Restrictions only add up.",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        where = LISTEN_TABLE
        given = [k for k in KINDS if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(
                f"each [[{where}]] table needs exactly one of {', '.join(KINDS)}; "
                + (f"got {' and '.join(given)}" if given else "got none")
            )
        name = self.name
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(f"[[{where}]] {name}: tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError(f"[[{where}]] {name}: tls_client_ca needs tls_cert and tls_key")
        if self.datagram and (self.tls_cert or self.proxy_protocol):
            key = "tls_cert" if self.tls_cert else "proxy_protocol"
            raise ConfigError(
                f"[[{where}]] {name}: {key} is for streams (tcp, unix), not {self.kind}"
            )
        if self.handler.startswith("exec:") and (self.datagram or self.tls_cert):
            raise ConfigError(
                f"[[{where}]] {name}: an exec handler serves plain TCP or Unix streams only"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Listen:
        """As :meth:`Table.from_dict`, the sandbox too (a dict, from asdict)."""
        box = values.get("sandbox")
        if isinstance(box, dict):
            values = {**values, "sandbox": Sandbox.from_dict(box)}
        return super().from_dict(values)

    @property
    def kind(self) -> str:
        """Which of KINDS this table listens on."""
        return next((k for k in KINDS if getattr(self, k)), "tcp")

    @property
    def datagram(self) -> bool:
        """Datagrams (udp, unix_datagram), each served by its own child."""
        return bool(self.udp or self.unix_datagram)

    @property
    def name(self) -> str:
        """How the table is named in messages: "tcp 127.0.0.1:8000"."""
        return f"{self.kind} {getattr(self, self.kind)}"

    @property
    def key(self) -> tuple[str, ...]:
        """What identifies the socket across a reload (listeners.Listener.key)."""
        return listen_key(self)


def check_unique(tables: tuple[Listen, ...]) -> None:
    """The check of ``server.listen``: no socket given twice (port 0 binds a fresh
    port each time, so it may be).  Raises, as its message names the table."""
    keys = [t.key for t in tables]
    for i, k in enumerate(keys):
        if k in keys[:i] and k[-1] != "0":
            raise ConfigError(f"[[{LISTEN_TABLE}]] {tables[i].name} is given twice")
