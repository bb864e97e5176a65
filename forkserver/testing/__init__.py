"""Run a real forkserver from tests and benchmarks, and check what it leaves behind.

- ``process``: a server subprocess in its own session: its log, readiness,
  the addresses it reports, stop and kill.  No pytest: ``bench/`` uses it.
- ``leaks``: unreaped children, processes left running, killing them all.
- ``config``: settings as TOML, handler names, the environment a server gets.
- ``pytest_plugin``: the ``forkserver`` fixture (the ``pytest11`` entry point).
"""
