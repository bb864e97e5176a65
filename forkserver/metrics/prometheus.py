"""The snapshot rendered: Prometheus text format 0.0.4, and the JSON of ``/children``."""

from __future__ import annotations

import time

from .snapshot import parent_stats, process_stats

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

    from .snapshot import ProcStats, Snapshot

__all__ = ["CONTENT_TYPE", "JSON_TYPE", "render_children", "render_prometheus"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JSON_TYPE = "application/json"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    # Counts, sizes and timestamps: always finite, so repr() is the format.
    return str(value) if isinstance(value, int) else repr(value)


def _family(
    out: list[str],
    name: str,
    kind: str,
    help_text: str,
    samples: Iterable[tuple[dict[str, str] | None, float]],
) -> None:
    out.append(f"# HELP {name} {_escape_help(help_text)}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            out.append(f"{name} {_number(value)}")


# The connection histograms: name, snapshot key, help.
_HISTOGRAMS = (
    (
        "forkserver_connection_cpu_seconds",
        "cpu",
        "CPU time (user + system) of each connection's child, from wait4 at its reap.",
    ),
    (
        "forkserver_connection_max_rss_bytes",
        "max_rss",
        "Peak resident set size of each connection's child (pages inherited from the "
        "parent included), from wait4 at its reap.",
    ),
    (
        "forkserver_connection_duration_seconds",
        "duration",
        "Seconds from each connection's fork (a spare: from taking it) to its child's reap.",
    ),
)


def _histogram(
    out: list[str], name: str, help_text: str, bounds: list[float], counts: list[int], total: float
) -> None:
    out.append(f"# HELP {name} {_escape_help(help_text)}")
    out.append(f"# TYPE {name} histogram")
    cumulative = 0
    for le, count in zip([*map(repr, map(float, bounds)), "+Inf"], counts, strict=True):
        cumulative += count
        out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
    out.append(f"{name}_sum {total!r}")
    out.append(f"{name}_count {cumulative}")


def render_prometheus(snap: Snapshot, with_process_stats: bool = True) -> str:
    """*snap* in Prometheus text format 0.0.4.

    With *with_process_stats*, adds the children's total RSS and USS and the
    parent's RSS and start time, read through psutil (children that are gone
    are left out of the sums).
    """
    out: list[str] = []
    _family(
        out,
        "forkserver_connections_accepted_total",
        "counter",
        "Connections accepted from the listeners, including those then refused.",
        [(None, snap["accepted"])],
    )
    _family(
        out,
        "forkserver_connections_refused_total",
        "counter",
        "Accepted connections closed unserved, by reason.",
        [({"reason": reason}, n) for reason, n in sorted(snap["refused"].items())],
    )
    _family(
        out,
        "forkserver_fork_failures_total",
        "counter",
        "fork() calls that failed (for a connection or for a spare).",
        [(None, snap["fork_failures"])],
    )
    _family(
        out,
        "forkserver_children_exited_total",
        "counter",
        'Children reaped, by how they ended: "ok" (exit status 0), "error" '
        '(another exit status), "signal" (killed by a signal).',
        [({"how": how}, snap["exited"][how]) for how in ("ok", "error", "signal")],
    )
    idle = sum(1 for c in snap["children"] if c["state"] == "idle")
    busy = len(snap["children"]) - idle
    _family(
        out,
        "forkserver_children",
        "gauge",
        'Live children: "busy" serving a connection, "idle" spares waiting for one.',
        [({"state": "busy"}, busy), ({"state": "idle"}, idle)],
    )
    _family(
        out,
        "forkserver_max_children",
        "gauge",
        "The max_children setting.",
        [(None, snap["max_children"])],
    )
    _family(
        out,
        "forkserver_spare_children",
        "gauge",
        "The spare_children setting.",
        [(None, snap["spare_children"])],
    )
    for name, key, help_text in _HISTOGRAMS:
        if key in snap["costs"]:
            _histogram(out, name, help_text, *snap["costs"][key])
    if with_process_stats:
        stats = process_stats([c["pid"] for c in snap["children"]], snap["pid"])
        known = [s for s in stats.values() if s is not None]
        _family(
            out,
            "forkserver_children_rss_bytes",
            "gauge",
            "Resident set size summed over the live children (shared pages counted in each).",
            [(None, sum(s[0] for s in known))],
        )
        _family(
            out,
            "forkserver_children_uss_bytes",
            "gauge",
            "Unique set size summed over the live children: memory only they hold.",
            [(None, sum(s[1] for s in known if s[1] is not None))],
        )
        parent = parent_stats(snap["pid"])
        _family(
            out,
            "forkserver_parent_rss_bytes",
            "gauge",
            "Resident set size of the parent.",
            [(None, parent[0])] if parent else [],
        )
        _family(
            out,
            "forkserver_parent_start_time_seconds",
            "gauge",
            "When the parent process started, as a Unix timestamp.",
            [(None, parent[1])] if parent else [],
        )
    out.append("")
    return "\n".join(out)


# -- JSON for `forkserver status` -------------------------------------------------


def render_children(snap: Snapshot, with_process_stats: bool = True) -> str:
    """*snap* as the JSON document ``forkserver status`` reads.

    ``{"pid", "uptime", "parent_rss", "max_children", "spare_children",
    "children": [{"pid", "peer", "age", "state", "rss", "uss", "cpu"}]}``;
    sizes in bytes, times in seconds, null where unknown.  Children that are
    gone by the time psutil looks are left out.
    """
    import json

    stats: dict[int, ProcStats | None] = {}
    parent = None
    if with_process_stats:
        stats = process_stats([c["pid"] for c in snap["children"]], snap["pid"])
        parent = parent_stats(snap["pid"])
    children = []
    for child in snap["children"]:
        if with_process_stats and child["pid"] not in stats:
            continue
        got = stats.get(child["pid"])
        rss, uss, cpu = got if got is not None else (None, None, None)
        children.append({**child, "rss": rss, "uss": uss, "cpu": cpu})
    document = {
        "pid": snap["pid"],
        "uptime": max(0.0, time.time() - parent[1]) if parent else None,
        "parent_rss": parent[0] if parent else None,
        "max_children": snap["max_children"],
        "spare_children": snap["spare_children"],
        "children": children,
    }
    return json.dumps(document, indent=1) + "\n"
