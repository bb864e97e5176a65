"""TLS material for the tests, made with the openssl command, and TLS clients."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .clients import connect, recv_to_eof


@dataclass(frozen=True)
class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost, a client
    certificate from the same CA, and one from a CA the server does not know."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    def listener(self, **settings: Any) -> dict[str, Any]:
        return {"tls_cert": str(self.server_cert), "tls_key": str(self.server_key), **settings}

    def client_context(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


def _make_ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=cwd,
    )  # fmt: skip


def _make_leaf(name: str, ca: str, cn: str, extensions: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
        cwd=cwd,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


def make_pki(d: Path) -> Pki:
    """Make the certificates in directory *d*; skips the test without openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed: it makes the test certificates")
    _make_ca("ca", d)
    _make_ca("rogue-ca", d)
    _make_leaf(
        "server", "ca", "127.0.0.1",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", d,
    )  # fmt: skip
    _make_leaf("client", "ca", "test-client", "extendedKeyUsage=clientAuth\n", d)
    _make_leaf("rogue", "rogue-ca", "rogue-client", "extendedKeyUsage=clientAuth\n", d)
    return Pki(
        d, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem",
        d / "client.key", d / "rogue.pem", d / "rogue.key",
    )  # fmt: skip


def tls_connect(
    address: Any, ctx: ssl.SSLContext, hostname: str = "127.0.0.1", **wrap: Any
) -> ssl.SSLSocket:
    raw = connect(address)
    try:
        return ctx.wrap_socket(raw, server_hostname=hostname, **wrap)
    finally:
        raw.close()  # detached by wrap_socket: this only matters if wrapping failed


def tls_line(sock: ssl.SSLSocket, line: bytes) -> bytes:
    """Send one line to a TlsLine handler and read its reply to the end."""
    sock.sendall(line)
    return recv_to_eof(sock)
