"""The serving parent, as collaborating objects with one job each.

``loop`` (epoll, a callback per fd, one deadline heap), ``signals`` (the
table of handled signals), ``accept`` (from a readable listener to a child),
``fork`` (fork() and what a child closes), ``children`` (the child table,
reaped by pidfd), ``spares`` (``spare_children``), ``refusals``, ``stop``,
``reload`` (SIGHUP and SIGUSR2) and ``scrape`` (the metrics listener).
``forkserver.server.Server`` builds them and runs the loop.
"""
