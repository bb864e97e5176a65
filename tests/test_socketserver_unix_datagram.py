"""Unix-domain datagram listeners (``[[listen]] unix_datagram``): socketserver's
ForkingUnixDatagramServer from a config file.  Each datagram gets its own child
and its reply goes back, exactly, to the sender's bound path; the socket file
goes when the server stops; the table's mistakes are one-line config errors.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from forkserver.config import Listen
from forkserver.errors import ConfigError
from tests.helpers.servers import StartServer
from tests.helpers.transports import DATAGRAM_ECHO, listen, stop_cleanly


@pytest.mark.timeout(30)
@pytest.mark.parametrize("size", [1, 1000, 8192])
def test_unix_datagram_echo_is_exact_and_goes_back_to_the_sender(
    start_server: StartServer, tmp_path: Path, size: int
) -> None:
    path = tmp_path / "dgram.sock"
    server = start_server(listen(unix_datagram=str(path), handler=DATAGRAM_ECHO))
    assert server.listening == [f"unixgram:{path}"]
    payload = os.urandom(size)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.bind(str(tmp_path / "client.sock"))  # the reply's address
        client.settimeout(10)
        for _ in range(3):
            client.sendto(payload, str(path))
            reply, source = client.recvfrom(65536)
            assert reply == payload
            assert source == str(path)
    stop_cleanly(server)
    assert not path.exists()  # the server's socket file goes with it


@pytest.mark.timeout(30)
def test_a_stale_unix_datagram_socket_file_is_replaced(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = tmp_path / "dgram.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody receives on it
    server = start_server(listen(unix_datagram=str(path), handler=DATAGRAM_ECHO))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
        client.bind(str(tmp_path / "client.sock"))
        client.settimeout(10)
        client.sendto(b"ping", str(path))
        assert client.recv(100) == b"ping"
    stop_cleanly(server)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"unix_datagram": "/tmp/x.sock", "tls_cert": __file__, "tls_key": __file__},
            "tls_cert is for streams (tcp, unix), not unix_datagram",
        ),
        (
            {"unix_datagram": "/tmp/x.sock", "proxy_protocol": True},
            "proxy_protocol is for streams (tcp, unix), not unix_datagram",
        ),
        (
            {"unix_datagram": "/tmp/x.sock", "unix": "/tmp/y.sock"},
            "needs exactly one of tcp, udp, unix, unix_datagram; got unix and unix_datagram",
        ),
        (
            {"unix_datagram": "/tmp/x.sock", "handler": "exec:/bin/cat"},
            "an exec handler serves plain TCP or Unix streams only",
        ),
    ],
)
def test_unix_datagram_table_mistakes_are_config_errors(
    table: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Listen(**table)  # type: ignore[arg-type]
