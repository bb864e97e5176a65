"""``forkserver status``: a table of a running server's live children.

Asks the server's metrics listener for ``/children`` (see metrics/) and
prints one row per child: pid, peer, age, state, memory and CPU time, under
a line of totals.  The address is ``--url`` or the ``metrics`` setting
("HOST:PORT") of the config given with ``--config``.

Exit status: 0 with the table printed, 1 when the server cannot be reached or
gives an answer that is not a child list (one line on stderr), 2 for a usage
or configuration error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError
from .metrics import CHILDREN_PATH, METRICS_PATH, TIMEOUT, parse_address

__all__ = ["StatusError", "children_url", "fetch", "format_table", "main"]

MAX_ANSWER = 64 << 20  # a /children answer is ~150 bytes per child
# Wildcard listen addresses, and where on this host to reach them.
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class StatusError(Exception):
    """The server could not be asked, or its answer is not a child list."""


def children_url(url: str) -> str:
    """The /children URL for a metrics listener given as ``http://HOST:PORT``
    (a path ending in /metrics or /children is allowed) or ``HOST:PORT``."""
    from urllib.parse import urlsplit

    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f'--url: "{url}" is not http://HOST:PORT')
    path = parts.path.rstrip("/")
    for suffix in (METRICS_PATH, CHILDREN_PATH):
        path = path.removesuffix(suffix)
    return f"{parts.scheme}://{parts.netloc}{path}{CHILDREN_PATH}"


def url_from_config(path: str) -> str:
    """The /children URL for the ``metrics`` setting of config *path*;
    raises ConfigError."""
    from .config import load

    settings = load(path)
    address = getattr(settings, "metrics", "")
    if not address:
        raise ConfigError(f"{path}: server.metrics is not set: the server has no metrics listener")
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise ConfigError(f"{path}: server.metrics: {exc}") from None
    host = _LOOPBACK.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{CHILDREN_PATH}"


def fetch(url: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """GET *url* and return its child list document; raises StatusError."""
    import json
    import urllib.error
    import urllib.request
    from http.client import HTTPException

    # Straight to the server: an http_proxy set for the web must not catch it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as answer:
            body = answer.read(MAX_ANSWER + 1)
    except urllib.error.HTTPError as exc:
        raise StatusError(f"{url}: the server answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise StatusError(f"cannot reach {url}: {_why(exc.reason)}") from None
    except (OSError, HTTPException) as exc:
        raise StatusError(f"cannot reach {url}: {_why(exc)}") from None
    if len(body) > MAX_ANSWER:
        raise StatusError(f"{url}: the answer is larger than {MAX_ANSWER >> 20} MiB")
    try:
        document: dict[str, Any] = json.loads(body)
        _check_document(document)
    except (ValueError, TypeError) as exc:
        raise StatusError(f"{url}: not a forkserver child list ({exc})") from None
    return document


def _why(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


_NUMBERS: dict[str, type | tuple[type, ...]] = {
    "pid": int,
    "age": (int, float),
    "rss": int,
    "uss": int,
    "cpu": (int, float),
}


def _check_document(document: Any) -> None:
    """Raise TypeError unless *document* has the fields we print."""
    if not isinstance(document, dict) or not isinstance(document.get("children"), list):
        raise TypeError("expected an object with a children list")
    for child in document["children"]:
        if not isinstance(child, dict):
            raise TypeError("a child is not an object")
        for key in ("pid", "peer", "age", "state", "rss", "uss", "cpu"):
            if key not in child:
                raise TypeError(f"a child has no {key}")
        for key, kind in _NUMBERS.items():
            value = child[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                if value is None and key in ("rss", "uss", "cpu"):
                    continue
                raise TypeError(f"{key} is {value!r}")


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            return f"{int(n)} B" if n < 1024 else f"{value:.1f} {unit}"
    raise AssertionError("not reached")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _cpu(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"


def _printable(text: str) -> str:
    # A Unix socket path may hold newlines or escapes: keep the table a table.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text) or "-"


def _total(children: list[dict[str, Any]], key: str) -> float | None:
    known = [c[key] for c in children if c[key] is not None]
    return sum(known) if known else None


def format_table(document: dict[str, Any]) -> str:
    """The summary line and one row per child, oldest first, as printed."""
    children = sorted(document["children"], key=lambda c: -c["age"])
    busy = sum(1 for c in children if c["state"] == "busy")
    summary = f"forkserver pid {document.get('pid', '?')}"
    if document.get("uptime") is not None:
        summary += f", up {_duration(document['uptime'])}"
    summary += f": {len(children)} children ({busy} busy, {len(children) - busy} idle"
    if document.get("max_children") is not None:
        summary += f", max {document['max_children']}"
    summary += (
        f"); children RSS {_size(_total(children, 'rss'))}"
        f", USS {_size(_total(children, 'uss'))}, CPU {_cpu(_total(children, 'cpu'))}"
    )
    if document.get("parent_rss") is not None:
        summary += f"; parent RSS {_size(document['parent_rss'])}"
    lines = [summary]
    if not children:
        lines.append("no live children")
        return "\n".join(lines) + "\n"
    header = ("PID", "PEER", "AGE", "STATE", "RSS", "USS", "CPU")
    rows = [
        (
            str(c["pid"]),
            _printable(c["peer"]),
            _duration(c["age"]),
            str(c["state"]),
            _size(c["rss"]),
            _size(c["uss"]),
            _cpu(c["cpu"]),
        )
        for c in children
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = (False, True, False, True, False, False, False)  # text columns align left
    for row in [header, *rows]:
        cells = [
            cell.ljust(w) if is_left else cell.rjust(w)
            for cell, w, is_left in zip(row, widths, left, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forkserver status",
        description="Print the live children of a running forkserver "
        "(read from its metrics listener).",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="the metrics listener: http://HOST:PORT (or HOST:PORT)")
    where.add_argument(
        "-c", "--config", metavar="FILE", help="read the address from server.metrics in FILE"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=TIMEOUT,
        metavar="SECONDS",
        help=f"give up on the server after this long (default {TIMEOUT:g})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``forkserver status [--url URL | --config FILE]``; returns the exit status."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        url = children_url(args.url) if args.url else url_from_config(args.config)
    except (ConfigError, ValueError) as exc:
        print(f"forkserver status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        document = fetch(url, args.timeout)
    except StatusError as exc:
        print(f"forkserver status: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    sys.stdout.write(format_table(document))
    return EXIT_OK
