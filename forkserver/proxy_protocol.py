"""HAProxy's PROXY protocol, versions 1 and 2: parse the header a proxy puts first.

The parent peeks at a new connection and calls parse() on what it saw: None means
"a header may still be coming, peek again", ProxyHeaderError means "this cannot be a
header, drop the connection", and a ProxyHeader says how many bytes to consume.
Spec: https://www.haproxy.org/download/2.1/doc/proxy-protocol.txt

Choices where the spec leaves room:
- v1 "PROXY UNKNOWN" and v2 PROXY with family UNSPEC are reported as local (use the
  real peer), like the v2 LOCAL command; whatever follows UNKNOWN is ignored.
- v2 LOCAL ignores the address block whatever its family and length.
- v2 UDP is reported as AF_INET/AF_INET6 like TCP; the header has no socket type field.
- v1 leading zeros (in ports and IPv4 octets) are rejected, as the spec says; TCP6
  accepts the dotted tail glibc's inet_ntop writes for "::ffff:1.2.3.4". Zone ids
  ("%eth0") are rejected.
- v2 TLVs are skipped without being interpreted, so a CRC32C TLV is not checked.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import struct
from dataclasses import dataclass

__all__ = [
    "MAX_LENGTH",
    "MAX_V1",
    "ProxyHeader",
    "ProxyHeaderError",
    "encode_v1",
    "encode_v2",
    "parse",
]

MAX_V1 = 107  # the longest v1 line, CRLF included
MAX_LENGTH = 16 + 65535  # the longest v2 header; no header of either version is longer

_V1_SIG = b"PROXY"
_V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
# A v1 line so far must be a prefix of one of these, or start with one.
_V1_STARTS = (b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN ", b"PROXY UNKNOWN\r\n")
_V1_TCP = re.compile(
    rb"PROXY TCP([46]) ([0-9a-fA-F.:]+) ([0-9a-fA-F.:]+) (0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4})"
)
_V1_TCP_CHARS = re.compile(rb"[0-9a-fA-F.: ]*")

_LOCAL, _PROXY = 0x20, 0x21
# v2 family/protocol byte -> (socket family, address block size); UNSPEC has none.
_V2_FAMILIES: dict[int, tuple[int | None, int]] = {
    0x00: (None, 0),
    0x11: (socket.AF_INET, 12),
    0x12: (socket.AF_INET, 12),
    0x21: (socket.AF_INET6, 36),
    0x22: (socket.AF_INET6, 36),
    0x31: (socket.AF_UNIX, 216),
    0x32: (socket.AF_UNIX, 216),
}
_UNIX_PATH = 108  # sizeof(sun_path) in the spec's address block

Address = tuple[str, int] | str | None
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProxyHeaderError(ValueError):
    """Not a valid PROXY header; the message says why, for a log line."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header: consume `length` bytes, then the client's own data follows."""

    length: int
    version: int  # 1 or 2
    local: bool  # no client address was sent: use the real peer
    family: int | None  # AF_INET, AF_INET6 or AF_UNIX; None when local
    source: Address  # (host, port) for IP, a path for AF_UNIX, None when local
    destination: Address


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of data; None if data is a proper prefix of a header that
    may still be valid (read more); raises ProxyHeaderError if it cannot be one."""
    if _V2_SIG.startswith(data[:12]):  # b"" too: either version may follow
        return _parse_v2(data)
    if _V1_SIG.startswith(data[:5]):
        return _parse_v1(data)
    raise ProxyHeaderError(f"not a PROXY protocol header: {data[:16]!r}")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, MAX_V1)
    line = data[:MAX_V1] if end < 0 else data[: end + 2]
    # What precedes the CRLF (or a CR that may begin one); the spec forbids ending the
    # line on a lone CR or LF, so neither may appear in it.
    text = line[:end] if end >= 0 else line.removesuffix(b"\r")
    if b"\r" in text or b"\n" in text:
        raise ProxyHeaderError(f"PROXY v1: CR or LF before the final CRLF: {line!r}")
    if not any(line[: len(s)] == s[: len(line)] for s in _V1_STARTS):
        raise ProxyHeaderError(f"PROXY v1: expected TCP4, TCP6 or UNKNOWN: {line[:16]!r}")
    if end < 0:
        if text.startswith(b"PROXY TCP") and not _V1_TCP_CHARS.fullmatch(text, 11):
            raise ProxyHeaderError(f"PROXY v1: not an address or port: {line!r}")
        if len(line) == MAX_V1:
            raise ProxyHeaderError(f"PROXY v1: no CRLF in the first {MAX_V1} bytes")
        return None
    if text.startswith(b"PROXY UNKNOWN"):
        return ProxyHeader(end + 2, 1, True, None, None, None)
    m = _V1_TCP.fullmatch(text)
    if m is None:
        raise ProxyHeaderError(f"PROXY v1: malformed line: {line!r}")
    version = int(m[1])
    try:
        src, dst = ipaddress.ip_address(m[2].decode()), ipaddress.ip_address(m[3].decode())
    except ValueError as e:
        raise ProxyHeaderError(f"PROXY v1: {e}") from None
    if src.version != version or dst.version != version:
        raise ProxyHeaderError(f"PROXY v1: TCP{version} needs IPv{version} addresses: {line!r}")
    sport, dport = int(m[4]), int(m[5])
    if sport > 65535 or dport > 65535:
        raise ProxyHeaderError(f"PROXY v1: port out of range 0-65535: {line!r}")
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    return ProxyHeader(end + 2, 1, False, family, (str(src), sport), (str(dst), dport))


def _parse_v2(data: bytes) -> ProxyHeader | None:
    # Check each fixed byte as soon as it arrives, so garbage is dropped early.
    if len(data) > 12 and data[12] not in (_LOCAL, _PROXY):
        version, command = data[12] >> 4, data[12] & 0xF
        if version != 2:
            raise ProxyHeaderError(f"PROXY v2: unsupported version {version}")
        raise ProxyHeaderError(f"PROXY v2: unknown command {command:#x}")
    if len(data) > 13 and data[13] not in _V2_FAMILIES:
        raise ProxyHeaderError(f"PROXY v2: unknown family/protocol {data[13]:#04x}")
    if len(data) < 16:
        return None
    length = 16 + struct.unpack_from("!H", data, 14)[0]
    family, size = _V2_FAMILIES[data[13]]
    local = data[12] == _LOCAL or family is None
    if not local and length - 16 < size:
        raise ProxyHeaderError(
            f"PROXY v2: length {length - 16} is shorter than the {size}-byte address block"
        )
    if len(data) < length:
        return None
    if local:
        return ProxyHeader(length, 2, True, None, None, None)
    block = data[16 : 16 + size]  # whatever follows, up to `length`, is TLVs: skipped
    src: Address
    dst: Address
    if family == socket.AF_UNIX:
        src, dst = _unix_path(block[:_UNIX_PATH]), _unix_path(block[_UNIX_PATH:])
    else:
        n = (size - 4) // 2
        sport, dport = struct.unpack_from("!HH", block, 2 * n)
        src = (str(ipaddress.ip_address(block[:n])), sport)
        dst = (str(ipaddress.ip_address(block[n : 2 * n])), dport)
    return ProxyHeader(length, 2, False, family, src, dst)


def _unix_path(raw: bytes) -> str:
    # NUL-terminated unless it fills all 108 bytes; an abstract name (leading NUL) is "".
    return os.fsdecode(raw.split(b"\0", 1)[0])


def encode_v1(source: tuple[str, int] | None, destination: tuple[str, int] | None) -> bytes:
    """The v1 line for these (host, port) pairs of one family; None, None -> UNKNOWN."""
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    if source is None or destination is None:
        raise ValueError("encode_v1: give both addresses or neither")
    src, dst = _ip_pair(source, destination)
    return f"PROXY TCP{src.version} {src} {dst} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(
    source: tuple[str, int] | str | None,
    destination: tuple[str, int] | str | None,
    *,
    local: bool = False,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header (stream protocol) for two IP (host, port) pairs or two AF_UNIX paths.

    local=True sends the LOCAL command with family UNSPEC and ignores the addresses;
    tlvs (already encoded) follow the address block.
    """
    if local:
        command, fam, block = _LOCAL, 0x00, b""
    elif isinstance(source, str) and isinstance(destination, str):
        command, fam = _PROXY, 0x31
        block = b"".join(_unix_block(p) for p in (source, destination))
    elif isinstance(source, tuple) and isinstance(destination, tuple):
        src, dst = _ip_pair(source, destination)
        command, fam = _PROXY, 0x11 if src.version == 4 else 0x21
        block = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    else:
        raise ValueError(
            f"encode_v2: not two IP or two unix addresses: {source!r}, {destination!r}"
        )
    body = block + tlvs
    if len(body) > 65535:
        raise ValueError(f"encode_v2: {len(body)} bytes of addresses and TLVs, limit 65535")
    return _V2_SIG + struct.pack("!BBH", command, fam, len(body)) + body


def _ip_pair(source: tuple[str, int], destination: tuple[str, int]) -> tuple[_IP, _IP]:
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        raise ValueError(f"mixed families: {source!r} -> {destination!r}")
    # Neither version of the header has room for an IPv6 zone id.
    if "%" in f"{src}{dst}":
        raise ValueError(f"scoped IPv6 address: {source!r} -> {destination!r}")
    if not (0 <= source[1] <= 65535 and 0 <= destination[1] <= 65535):
        raise ValueError(f"port out of range 0-65535: {source!r} -> {destination!r}")
    return src, dst


def _unix_block(path: str) -> bytes:
    raw = os.fsencode(path)
    if len(raw) > _UNIX_PATH or b"\0" in raw:
        raise ValueError(f"not a unix socket path of at most {_UNIX_PATH} bytes: {path!r}")
    return raw.ljust(_UNIX_PATH, b"\0")
