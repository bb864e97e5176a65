"""Scraping a server's metrics listener, read with prometheus_client's own parser."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from forkserver.testing.pytest_plugin import ServerProcess

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_url(server: ServerProcess) -> str:
    """``http://HOST:PORT`` of the metrics listener the server reported."""
    line = server.wait_for_log(r"metrics on http://\S+/metrics")
    m = re.search(r"(http://\S+)/metrics", line)
    assert m is not None
    return m.group(1)


def scrape(base: str) -> Samples:
    """Every sample of ``BASE/metrics``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):  # the reference parser
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def health(base: str) -> tuple[int, bytes]:
    """``GET BASE/healthz``: (status, body), a 503 included."""
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def answering_pid(base: str) -> int:
    """The pid of the parent whose scrape child answered ``BASE/children``."""
    with urllib.request.urlopen(f"{base}/children", timeout=10) as reply:
        return int(json.load(reply)["pid"])
