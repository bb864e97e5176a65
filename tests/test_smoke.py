from __future__ import annotations

from tests.helpers.clients import echo_roundtrip
from tests.helpers.servers import StartServer, config


def test_echo_roundtrip_and_clean_stop(start_server: StartServer) -> None:
    server = start_server(config())
    assert echo_roundtrip(server.tcp_address, b"hello") == b"hello"
    assert server.stop() == 0
