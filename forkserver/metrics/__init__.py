"""Metrics: counted by the parent, reported by a child forked for each scrape.

The parent only counts (``Server.accepted``, ``refused``, ``fork_failures``,
the child table's ``exited_*``) and computes nothing for metrics.  A connection
to the metrics listener is forked like any other; that scrape child holds a
copy-on-write image of the parent's counters and child table as they were at
fork time, reads them with :func:`snapshot`, asks the kernel about each live
child through psutil, answers with :func:`serve_metrics`, and exits:

* ``GET /metrics``: Prometheus text format 0.0.4 (:func:`render_prometheus`);
* ``GET /children``: JSON for ``forkserver status`` (:func:`render_children`);
* ``GET /healthz``: 200 while serving, 503 from the moment a stop begins
  (the parent keeps the metrics listener open until its children are done).

The modules follow those steps: ``snapshot.py`` (what the child reads),
``prometheus.py`` (how it is written out), ``http.py`` (the one request).

Only the scrape child imports psutil and json: psutil imports threading, whose
at-fork hook would cost every child of the parent (see log.py).  At module
level this package imports nothing the parent has not imported already.
"""

from __future__ import annotations

from ..addresses import parse_address
from .http import (
    CHILDREN_PATH,
    HEALTHZ_PATH,
    LINGER,
    MAX_HEAD,
    MAX_LINGER,
    METRICS_PATH,
    TIMEOUT,
    serve_metrics,
)
from .prometheus import CONTENT_TYPE, JSON_TYPE, render_children, render_prometheus
from .snapshot import process_stats, snapshot

TYPE_CHECKING = False
if TYPE_CHECKING:  # the types, for callers' annotations (re-exported explicitly)
    from .snapshot import ChildInfo as ChildInfo
    from .snapshot import ChildTableView as ChildTableView
    from .snapshot import ChildView as ChildView
    from .snapshot import ProcStats as ProcStats
    from .snapshot import ServerView as ServerView
    from .snapshot import SettingsView as SettingsView
    from .snapshot import Snapshot as Snapshot

__all__ = [
    "CHILDREN_PATH",
    "CONTENT_TYPE",
    "HEALTHZ_PATH",
    "JSON_TYPE",
    "LINGER",
    "MAX_HEAD",
    "MAX_LINGER",
    "METRICS_PATH",
    "TIMEOUT",
    "parse_address",
    "process_stats",
    "render_children",
    "render_prometheus",
    "serve_metrics",
    "snapshot",
]
