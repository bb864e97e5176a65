from __future__ import annotations

from tests.conftest import StartServer, config, echo_roundtrip


def test_echo_roundtrip_and_clean_stop(start_server: StartServer) -> None:
    server = start_server(config())
    assert echo_roundtrip(server.tcp_address, b"hello") == b"hello"
    assert server.stop() == 0
