"""forkserver/proxy_protocol.py: the spec's examples, every rejection, round trips, fuzzing."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from forkserver.proxy_protocol import (
    MAX_LENGTH,
    MAX_V1,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse,
)
from tests.helpers.fuzz import fuzz_timeout

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
# The examples per property come from the hypothesis profile (tests/helpers/fuzz.py):
# a few seconds each in `make test`, many more with FORKSERVER_FUZZ=1.
fuzz = fuzz_timeout


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return SIG + struct.pack("!BBH", ver_cmd, fam, size) + body


TCP4_BLOCK = bytes([127, 0, 0, 1, 127, 0, 0, 2]) + struct.pack("!HH", 1234, 80)
TCP6_BLOCK = bytes(15) + b"\x01" + bytes(15) + b"\x02" + struct.pack("!HH", 1234, 80)
UNIX_BLOCK = b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0")

# -- the spec's examples ----------------------------------------------------


def test_spec_v1_example_before_http() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    data = line + b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    assert parse(data) == ProxyHeader(
        len(line), 1, False, socket.AF_INET, ("192.168.0.1", 56324), ("192.168.0.11", 443)
    )


@pytest.mark.parametrize(
    ("line", "length"),
    [
        (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", 56),
        (b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n", 104),
        (b"PROXY UNKNOWN\r\n", 15),
        (b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n", 107),
    ],
)
def test_spec_v1_longest_lines(line: bytes, length: int) -> None:
    header = parse(line + b"payload")
    assert header is not None
    assert header.length == len(line) == length


def test_v1_tcp6_and_unknown_fields() -> None:
    header = parse(b"PROXY TCP6 2001:DB8::1 ::1 0 65535\r\n")
    assert header == ProxyHeader(36, 1, False, socket.AF_INET6, ("2001:db8::1", 0), ("::1", 65535))
    # UNKNOWN: whatever precedes the CRLF is ignored and the real peer is used.
    unknown = ProxyHeader(20, 1, True, None, None, None)
    assert parse(b"PROXY UNKNOWN junk\r\nrest") == unknown


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            v2(0x21, 0x11, TCP4_BLOCK),
            ProxyHeader(28, 2, False, socket.AF_INET, ("127.0.0.1", 1234), ("127.0.0.2", 80)),
        ),
        (
            v2(0x21, 0x12, TCP4_BLOCK),  # UDP reports the IP family too
            ProxyHeader(28, 2, False, socket.AF_INET, ("127.0.0.1", 1234), ("127.0.0.2", 80)),
        ),
        (
            v2(0x21, 0x21, TCP6_BLOCK),
            ProxyHeader(52, 2, False, socket.AF_INET6, ("::1", 1234), ("::2", 80)),
        ),
        (
            v2(0x21, 0x22, TCP6_BLOCK),
            ProxyHeader(52, 2, False, socket.AF_INET6, ("::1", 1234), ("::2", 80)),
        ),
        (
            v2(0x21, 0x31, UNIX_BLOCK),
            ProxyHeader(232, 2, False, socket.AF_UNIX, "/run/a.sock", "/run/b.sock"),
        ),
        (
            v2(0x21, 0x32, UNIX_BLOCK),
            ProxyHeader(232, 2, False, socket.AF_UNIX, "/run/a.sock", "/run/b.sock"),
        ),
        # TLVs after the addresses are counted in the length and skipped.
        (
            v2(0x21, 0x11, TCP4_BLOCK + b"\x04\x00\x02ab"),
            ProxyHeader(33, 2, False, socket.AF_INET, ("127.0.0.1", 1234), ("127.0.0.2", 80)),
        ),
        # LOCAL: the family and any address block are ignored, not assumed empty.
        (v2(0x20, 0x00, b""), ProxyHeader(16, 2, True, None, None, None)),
        (v2(0x20, 0x11, TCP4_BLOCK), ProxyHeader(28, 2, True, None, None, None)),
        (v2(0x20, 0x21, b"short"), ProxyHeader(21, 2, True, None, None, None)),
        # PROXY with UNSPEC: no usable address, so the real peer is used.
        (v2(0x21, 0x00, b"whatever"), ProxyHeader(24, 2, True, None, None, None)),
        # A path filling all 108 bytes has no NUL; an abstract name decodes as "".
        (
            v2(0x21, 0x31, b"p" * 108 + b"\0abstract".ljust(108, b"\0")),
            ProxyHeader(232, 2, False, socket.AF_UNIX, "p" * 108, ""),
        ),
    ],
)
def test_v2_headers(data: bytes, expected: ProxyHeader) -> None:
    assert parse(data) == expected
    assert parse(data + b"\r\n\r\n\x00more") == expected


def test_v2_longest_header() -> None:
    data = v2(0x21, 0x11, TCP4_BLOCK + bytes(65535 - 12))
    assert len(data) == MAX_LENGTH
    assert parse(data[:-1]) is None
    header = parse(data + b"x")
    assert header is not None
    assert header.length == MAX_LENGTH


# -- incomplete and malformed -----------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"P",
        b"PRO",
        b"PROXY",
        b"PROXY TCP",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\r",
        b"PROXY UNKNOWN",
        b"PROXY UNKNOWN anything \xff",
        b"\r",
        b"\r\n\r\n",
        SIG,
        SIG + b"\x21\x11\x00",
        v2(0x21, 0x11, TCP4_BLOCK)[:-1],
        v2(0x20, 0x00, b"", length=100),
    ],
)
def test_incomplete(data: bytes) -> None:
    assert parse(data) is None


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"GET / HTTP/1.0\r\n", "not a PROXY protocol header"),
        (b"\x16\x03\x01", "not a PROXY protocol header"),
        (b"\r\n\r\nX", "not a PROXY protocol header"),
        (b"proxy TCP4", "not a PROXY protocol header"),
        # v1 grammar
        (b"PROXY TCP5 ", "expected TCP4, TCP6 or UNKNOWN"),
        (b"PROXY  TCP4", "expected TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4\r\n", "expected TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UNKNOWNX\r\n", "expected TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UNKNOWN\n", "CR or LF"),
        (b"PROXY UNKNOWN\rX", "CR or LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n", "CR or LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\n\r\n", "CR or LF"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443\r\r\n", "CR or LF"),
        (b"PROXY UNKNOWN " + b"x" * (MAX_V1 - 14), "no CRLF in the first 107 bytes"),
        (b"PROXY UNKNOWN " + b"x" * (MAX_V1 - 15) + b"\r\n", "no CRLF in the first 107 bytes"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 443 \r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4  5.6.7.8 80 443\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 443\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 123456 443\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 443\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 -1\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 443\r\n", "port out of range"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 80 99999\r\n", "port out of range"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 80 443\r\n", "malformed"),
        (b"PROXY TCP4 1.2.3.x", "not an address or port"),
        (b"PROXY TCP6 fe80::1%", "not an address or port"),
        (b"PROXY TCP4 256.2.3.4 5.6.7.8 80 443\r\n", "does not appear to be"),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 80 443\r\n", "does not appear to be"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 80 443\r\n", "does not appear to be"),
        (b"PROXY TCP6 1::2::3 ::1 80 443\r\n", "does not appear to be"),
        (b"PROXY TCP4 ::1 ::2 80 443\r\n", "TCP4 needs IPv4"),
        (b"PROXY TCP4 1.2.3.4 ::2 80 443\r\n", "TCP4 needs IPv4"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 80 443\r\n", "TCP6 needs IPv6"),
        # v2, rejected as soon as the offending byte arrives
        (SIG + b"\x11", "unsupported version 1"),
        (SIG + b"\x31\x11", "unsupported version 3"),
        (SIG + b"\x22", "unknown command 0x2"),
        (SIG + b"\x2f", "unknown command 0xf"),
        (SIG + b"\x21\x13", "unknown family/protocol 0x13"),
        (SIG + b"\x21\x41", "unknown family/protocol 0x41"),
        (SIG + b"\x20\x10", "unknown family/protocol 0x10"),
        (v2(0x21, 0x11, b"", length=11), "shorter than the 12-byte address block"),
        (v2(0x21, 0x21, TCP4_BLOCK), "shorter than the 36-byte address block"),
        (v2(0x21, 0x31, TCP6_BLOCK), "shorter than the 216-byte address block"),
    ],
)
def test_rejected(data: bytes, match: str) -> None:
    with pytest.raises(ProxyHeaderError, match=match):
        parse(data)
    with pytest.raises(ProxyHeaderError, match=match):  # more data changes nothing
        parse(data + bytes(300))


def test_error_is_a_value_error() -> None:
    assert issubclass(ProxyHeaderError, ValueError)


# -- encoding and round trips -----------------------------------------------


def test_encode_examples() -> None:
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    line = encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert line == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode_v1(("::1", 1), ("2001:db8::2", 2)) == b"PROXY TCP6 ::1 2001:db8::2 1 2\r\n"
    assert encode_v2(("127.0.0.1", 1234), ("127.0.0.2", 80)) == v2(0x21, 0x11, TCP4_BLOCK)
    assert encode_v2(("::1", 1234), ("::2", 80)) == v2(0x21, 0x21, TCP6_BLOCK)
    assert encode_v2("/run/a.sock", "/run/b.sock") == v2(0x21, 0x31, UNIX_BLOCK)
    assert encode_v2(None, None, local=True, tlvs=b"\x04\x00\x00") == v2(0x20, 0, b"\x04\0\0")


@pytest.mark.parametrize(
    ("encode", "match"),
    [
        (lambda: encode_v1(("1.2.3.4", 1), None), "both addresses or neither"),
        (lambda: encode_v1(("1.2.3.4", 1), ("::1", 2)), "mixed families"),
        (lambda: encode_v1(("1.2.3.4", 65536), ("1.2.3.4", 1)), "port out of range"),
        (lambda: encode_v1(("example.com", 1), ("1.2.3.4", 1)), "does not appear to be"),
        (lambda: encode_v2(None, None), "not two IP or two unix addresses"),
        (lambda: encode_v2("/a", ("1.2.3.4", 1)), "not two IP or two unix addresses"),
        (lambda: encode_v2(("1.2.3.4", 1), ("::1", 2)), "mixed families"),
        (lambda: encode_v2(("1.2.3.4", -1), ("1.2.3.4", 1)), "port out of range"),
        (lambda: encode_v1(("fe80::1%eth0", 1), ("::1", 2)), "scoped IPv6 address"),
        (lambda: encode_v2(("::1", 1), ("fe80::1%2", 2)), "scoped IPv6 address"),
        (lambda: encode_v2("/" + "a" * 108, "/b"), "at most 108 bytes"),
        (lambda: encode_v2("/a\0b", "/b"), "at most 108 bytes"),
        (lambda: encode_v2("/a", "/b", tlvs=bytes(65535 - 215)), "limit 65535"),
    ],
)
def test_encode_rejects(encode, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode()


ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
# Any byte string without NUL is a path; fsdecode/fsencode round-trip it exactly.
paths = st.binary(max_size=108).map(lambda b: os.fsdecode(b.replace(b"\0", b"x")))
tlvs = st.binary(max_size=64)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid encoded header of any kind, and what parse() must make of it."""
    kind = draw(st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-unix", "local"]))
    if kind == "v1-unknown":
        return b"PROXY UNKNOWN\r\n", ProxyHeader(15, 1, True, None, None, None)
    if kind == "local":
        data = encode_v2(None, None, local=True, tlvs=draw(tlvs))
        return data, ProxyHeader(len(data), 2, True, None, None, None)
    src: tuple[str, int] | str
    dst: tuple[str, int] | str
    if kind == "v2-unix":
        src, dst, family = draw(paths), draw(paths), socket.AF_UNIX
    else:
        ip, family = (ipv4, socket.AF_INET) if kind.endswith("4") else (ipv6, socket.AF_INET6)
        src, dst = (draw(ip), draw(ports)), (draw(ip), draw(ports))
    if kind.startswith("v1"):
        assert isinstance(src, tuple)
        assert isinstance(dst, tuple)
        data = encode_v1(src, dst)
        return data, ProxyHeader(len(data), 1, False, family, src, dst)
    data = encode_v2(src, dst, tlvs=draw(tlvs))
    return data, ProxyHeader(len(data), 2, False, family, src, dst)


@fuzz
@given(headers(), st.binary(max_size=64))
def test_round_trip_and_every_prefix(header: tuple[bytes, ProxyHeader], rest: bytes) -> None:
    data, expected = header
    assert len(data) <= (MAX_V1 if expected.version == 1 else MAX_LENGTH)
    for i in range(len(data)):
        assert parse(data[:i]) is None, data[:i]
    assert parse(data) == expected
    assert parse(data + rest) == expected


@fuzz
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: b"PROXY " + b),
        st.binary(max_size=300).map(lambda b: SIG + b),
        st.builds(lambda h, b: h[0][:16] + b, headers(), st.binary(max_size=300)),
    )
)
def test_random_bytes_only_ever_raise_proxy_header_error(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    if header is not None:
        assert 0 < header.length <= len(data)
        assert header.version in (1, 2)


@fuzz
@given(headers(), st.data())
def test_one_byte_changed_is_never_a_crash(header: tuple[bytes, ProxyHeader], data) -> None:
    encoded, _ = header
    i = data.draw(st.integers(0, len(encoded) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != encoded[i]))
    mutated = encoded[:i] + bytes([byte]) + encoded[i + 1 :]
    try:
        result = parse(mutated)
    except ProxyHeaderError:
        return
    assert result is None or 0 < result.length <= len(mutated)


@fuzz
@given(headers(), st.data())
def test_more_data_never_changes_a_verdict(header: tuple[bytes, ProxyHeader], data) -> None:
    # The parent peeks again after None; a verdict once given must not change.
    encoded, _ = header
    i = data.draw(st.integers(0, len(encoded) - 1))
    mutated = encoded[:i] + data.draw(st.binary(max_size=3)) + encoded[i + 1 :]
    verdict: ProxyHeader | type[ProxyHeaderError] | None = None
    for end in range(len(mutated) + 1):
        try:
            result: ProxyHeader | type[ProxyHeaderError] | None = parse(mutated[:end])
        except ProxyHeaderError:
            result = ProxyHeaderError
        if verdict is not None:
            assert result == verdict, mutated[:end]
        verdict = result
