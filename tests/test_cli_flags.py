"""The command line's flags for listeners and accounts (--bind, --tls-cert, --tls-key,
--user, --group), bad command lines as a table of cases, and the --help text."""

from __future__ import annotations

import grp
import os
import pwd
import re
from pathlib import Path

import pytest

from tests.helpers.clients import _has_ipv6_loopback as has_ipv6_loopback
from tests.helpers.clients import echo_roundtrip, occupy_port, recv_to_eof
from tests.helpers.servers import StartServer, assert_config_refused, run_forkserver
from tests.helpers.tls import Pki, tls_connect
from tests.helpers.transports import DATAGRAM_ECHO, udp_at, udp_client

ECHO = "forkserver.examples.echo:EchoHandler"
PAYLOAD = b"forkserver cli \x00\xff\n" * 1000


# -- --bind, --tls-cert, --tls-key, --user, --group ---------------------------------------


def test_bind_is_repeatable_and_takes_tcp_ipv6_and_unix(
    start_server: StartServer, tmp_path: Path
) -> None:
    binds = ["--bind", "127.0.0.1:0", "-b", "unix:s.sock"]
    if has_ipv6_loopback():
        binds += ["--bind", "[::1]:0"]
    server = start_server(None, "--handler", ECHO, *binds)
    shown = [re.sub(r":\d+$", ":0", a) for a in server.listening]
    assert shown == ["127.0.0.1:0", "unix:s.sock", "[::1]:0"][: len(binds) // 2]
    for address in server.addresses:  # the socket's path is relative to the server's cwd
        target = str(tmp_path / address) if isinstance(address, str) else address
        assert isinstance(address, str) or address[1] != 0
        assert echo_roundtrip(target, PAYLOAD) == PAYLOAD
    assert (tmp_path / "s.sock").is_socket()
    assert server.stop() == 0


def test_bind_udp(start_server: StartServer) -> None:
    server = start_server(None, "--handler", DATAGRAM_ECHO, "--bind", "udp:127.0.0.1:0")
    assert re.fullmatch(r"udp:127\.0\.0\.1:\d+", server.listening[0]), server.listening
    with udp_client() as client:
        client.sendto(b"datagram", udp_at(server, 0))
        assert client.recvfrom(100)[0] == b"datagram"
    assert server.stop() == 0


def test_bind_tls_with_tls_cert_and_tls_key(start_server: StartServer, pki: Pki) -> None:
    tls = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key))
    server = start_server(None, "--handler", ECHO, "--bind", "tls:127.0.0.1:0", *tls)
    with tls_connect(server.tcp_address, pki.client_context()) as sock:
        assert sock.version() is not None
        sock.sendall(b"over tls")
        reply = b""
        while len(reply) < len(b"over tls") and (data := sock.recv(100)):
            reply += data
        assert reply == b"over tls"
    assert server.stop() == 0


def test_bind_replaces_the_listeners_of_the_config(start_server: StartServer) -> None:
    with occupy_port() as taken:
        port = taken.getsockname()[1]
        text = f'[server]\nhandler = "{ECHO}"\n\n[[listen]]\ntcp = "127.0.0.1:{port}"\n'
        server = start_server(text, "--bind", "127.0.0.1:0")
        assert len(server.listening) == 1
        assert server.port != port
    assert echo_roundtrip(server.tcp_address, b"bound") == b"bound"
    assert server.stop() == 0


GREETER = """\
import os

def handler(conn, addr):
    conn.sendall(f"{os.getuid()} {os.getgid()}\\n".encode())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_user_and_group_flags_set_the_childrens_account(
    start_server: StartServer, tmp_path: Path
) -> None:
    (tmp_path / "greeter.py").write_text(GREETER)
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    server = start_server(None, "--handler", "greeter:handler", "--port", "0", "--user", "nobody")
    with server.connect() as sock:
        assert recv_to_eof(sock) == f"{nobody.pw_uid} {nobody.pw_gid}\n".encode()
    assert server.stop() == 0
    args = ("--user", "nobody", "--group", "root")
    server = start_server(None, "--handler", "greeter:handler", "--port", "0", *args)
    with server.connect() as sock:
        assert recv_to_eof(sock) == f"{nobody.pw_uid} 0\n".encode()
    assert server.stop() == 0
    assert group  # nobody's own group exists, so the first run used it


BAD_COMMAND_LINES = {
    "bind-not-an-address": (
        ["--bind", "nowhere"],
        'command line: --bind "nowhere": not HOST:PORT with a port 0-65535 (expected HOST:PORT, ',
    ),
    "bind-ipv6-without-brackets": (["--bind", "::1:0"], 'command line: --bind "::1:0": not HOST'),
    "bind-unix-without-path": (["--bind", "unix:"], 'command line: --bind "unix:": no address'),
    "bind-tls-udp": (["--bind", "tls:udp:127.0.0.1:0"], "TLS is for streams (tcp, unix), not udp"),
    "bind-tls-without-cert": (
        ["--bind", "tls:127.0.0.1:0"],
        'command line: --bind "tls:127.0.0.1:0" needs --tls-cert FILE and --tls-key FILE',
    ),
    "tls-cert-without-tls-bind": (
        ["--bind", "127.0.0.1:0", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
        "command line: --tls-cert is for a --bind tls:HOST:PORT listener",
    ),
    "tls-cert-missing": (
        ["--bind", "tls:127.0.0.1:0", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
        'command line: [[listen]] tls_cert: "c.pem": no such file',
    ),
    "bind-with-port": (
        ["--bind", "127.0.0.1:0", "--port", "0"],
        "command line: --port cannot be combined with --bind",
    ),
    "bind-newline": (["--bind", "a\nb"], r'command line: --bind "a\nb": not HOST'),
    "user-unknown": (["--user", "no_such_user_xyz"], 'server.user: no user "no_such_user_xyz" on'),
    "group-unknown": (
        ["--group", "no_such_group_xyz"],
        'server.group: no group "no_such_group_xyz"',
    ),
    "pidfile-a-directory": (["--pidfile", "."], 'command line: server.pidfile: "." is a directory'),
    "unknown-flag": (["--bogus"], "unrecognized arguments: --bogus (see forkserver --help)"),
    "port-not-a-number": (["--port", "80\x1b[2J"], r"invalid int value: '80\x1b[2J'"),
}


@pytest.mark.parametrize(("args", "says"), BAD_COMMAND_LINES.values(), ids=BAD_COMMAND_LINES)
def test_bad_command_line_exits_2_with_one_line(args: list[str], says: str, tmp_path: Path) -> None:
    for check in ([], ["--check"]):
        result = run_forkserver("--handler", ECHO, *args, *check, cwd=tmp_path, timeout=10)
        assert_config_refused(result)
        assert says in result.stderr
        assert result.stderr.removesuffix("\n").isprintable(), result.stderr


def test_help_names_every_value_and_the_status_command(tmp_path: Path) -> None:
    result = run_forkserver("--help", cwd=tmp_path)
    assert result.returncode == 0
    usage = result.stdout.split("\n\n")[0].splitlines()
    assert usage == [
        "usage: forkserver [-c FILE] [--check] [--bind ADDRESS]... [OPTIONS]",
        "       forkserver status [-h] (--url URL | -c FILE) [--timeout SECONDS]",
    ]
    options = dict(re.findall(r"^  (?:-\w(?: \S+)?, )?(--[\w-]+) ?([^ \n]*)", result.stdout, re.M))
    assert options == {
        "--help": "",
        "--config": "FILE",
        "--check": "",
        "--version": "",
        "--bind": "ADDRESS",
        "--host": "HOST",
        "--port": "PORT",
        "--unix": "PATH",
        "--backlog": "N",
        "--handler": "MODULE:ATTR",
        "--max-children": "N",
        "--spare-children": "N",
        "--graceful-timeout": "SECONDS",
        "--log-level": "{debug,info,warning,error,critical}",
        "--log-format": "{text,json}",
        "--log-file": "FILE",
        "--metrics": "HOST:PORT",
        "--pidfile": "FILE",
        "--idle-timeout": "SECONDS",
        "--user": "USER",
        "--group": "GROUP",
        "--tls-cert": "FILE",
        "--tls-key": "FILE",
    }
