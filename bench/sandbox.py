"""What each connection's sandbox costs: connections/s and p50 as ratios to no sandbox.

    python -m bench.sandbox                          # defaults: about 3 minutes
    python -m bench.sandbox --rounds 1 --duration 2 --concurrency 8
    python -m bench.sandbox --per-child 2000         # the per-child steps alone

Variants, each ``python -m forkserver`` serving the echo handler, forking on
accept (bench.compare's setup, one config file each): ``off`` (no
``[sandbox]``), ``landlock`` (read-only ``/usr``), ``seccomp`` (a deny list of
the usual hardening names), ``both``, ``network-none`` and ``all`` (the three
together).  Rounds alternate the order; medians are reported, and conn/s and
p50 of each variant divided by ``off``'s at the same concurrency, from the
same run.  The load is bench.compare's churn generator.

The floor: ``floor-off`` is bench/peers/needsfloor.py (the least a Python
server keeping forkserver's promises can do per connection) and
``floor-both`` the same with Landlock and seccomp, each child making only
the three calls, the ruleset and the BPF (the ``seccomp`` variant's,
compiled by forkserver) built once in its parent: what the sandbox costs
where nothing else does.  Their ratios are to ``floor-off``.  With
``--variants off,both,floor-off,floor-both``, ``both``'s ratio beside
``floor-both``'s says how much of the cost is the kernel's.

``--per-child N`` measures, in this process and without a server, what each
step costs a child: N children each time the step alone and report it
through a pipe (median); seccomp both ways, the parent's BPF loaded with one
``prctl`` and libseccomp's ``seccomp_load`` in the child.  A network
namespace also costs its teardown, after the child exits, in a kernel worker:
not in these numbers (the server variants show it in conn/s).
Results go to ``--out`` as ``sandbox-<time>.json`` and ``sandbox-latest.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .build import cache_dir
from .common import int_list, metadata, write_results
from .compare import NO_COMPILER, Generator, _fmt, _round, columns, ratios, summarize
from .servers import ServerSpec, forkserver_spec, python_needs_spec

# What a service that needs none of them would deny: kernel, namespace and
# debugging interfaces an attacker in the handler would reach for.
DENY = [
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
    "chroot", "unshare", "setns", "bpf", "perf_event_open", "userfaultfd", "keyctl",
    "add_key", "request_key", "kexec_load", "init_module", "finit_module",
    "delete_module", "reboot", "swapon", "swapoff", "open_by_handle_at",
]  # fmt: skip
LANDLOCK = {"landlock": "on", "read": ["/usr"]}
SECCOMP = {"syscalls_deny": DENY}
NETWORK = {"network": "none"}
VARIANTS: dict[str, dict[str, Any]] = {
    "off": {},
    "landlock": LANDLOCK,
    "seccomp": SECCOMP,
    "both": {**LANDLOCK, **SECCOMP},
    "network-none": NETWORK,
    "all": {**LANDLOCK, **SECCOMP, **NETWORK},
}
BASELINE = "off"
# bench/peers/needsfloor.py without and with the same Landlock rule and
# seccomp filter: "{bpf}" is the seccomp variant's program, as a file.
FLOORS: dict[str, list[str]] = {
    "floor-off": [],
    "floor-both": ["--landlock-read", "/usr", "--seccomp", "{bpf}"],
}
FLOOR_BASELINE = "floor-off"


def _toml(values: dict[str, Any]) -> str:
    def literal(v: Any) -> str:
        return "[" + ", ".join(f'"{x}"' for x in v) + "]" if isinstance(v, list) else f'"{v}"'

    return "[sandbox]\n" + "".join(f"{k} = {literal(v)}\n" for k, v in values.items())


def specs(names: list[str], directory: Path, max_children: int, backlog: int) -> list[ServerSpec]:
    """One forkserver per variant, its [sandbox] in a config file of its own
    (and the floors, bench/peers/needsfloor.py, with their options)."""
    out = []
    bpf = directory / "seccomp.bpf"
    for name in names:
        if name in FLOORS:
            if not bpf.exists() and any("{bpf}" in a for a in FLOORS[name]):
                from forkserver.sandbox.seccomp import Program

                bpf.write_bytes(Program(tuple(DENY), (), kill=False).code)
            base = python_needs_spec(backlog)
            extra = [a.format(bpf=bpf) for a in FLOORS[name]]
            out.append(dataclasses.replace(base, name=name, argv=[*base.argv, *extra]))
            continue
        base = forkserver_spec(max_children, backlog)
        argv = list(base.argv)
        if VARIANTS[name]:
            path = directory / f"{name}.toml"
            path.write_text(_toml(VARIANTS[name]))
            argv += ["--config", str(path)]
        out.append(dataclasses.replace(base, name=name, argv=argv))
    return out


# -- the per-child steps -----------------------------------------------------------------


def _in_child(step: Callable[[], None], n: int) -> float:
    """Median microseconds *step* takes in a fresh child, timed by the child itself
    (fork and wait are left out: on a shared machine they vary more than the steps)."""
    samples = []
    read_end, write_end = os.pipe()
    try:
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                status = 0
                try:
                    started = time.perf_counter_ns()
                    step()
                    os.write(write_end, (time.perf_counter_ns() - started).to_bytes(8, "little"))
                except BaseException:
                    status = 1
                os._exit(status)
            _, status = os.waitpid(pid, 0)
            if status:
                raise RuntimeError("the step failed in the child")
            samples.append(int.from_bytes(os.read(read_end, 8), "little"))
    finally:
        os.close(read_end)
        os.close(write_end)
    return statistics.median(samples) / 1e3


def per_child(n: int) -> dict[str, float]:
    """Microseconds each step takes in a child (median of *n* children)."""
    import pyseccomp

    from forkserver.sandbox import calls, landlock
    from forkserver.sandbox.seccomp import Program

    version = landlock.abi()
    ruleset = landlock.build(("/usr",), (), version)
    program = Program(tuple(DENY), (), kill=False)

    def libseccomp_in_child() -> None:
        rules = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        for name in DENY:
            rules.add_rule(pyseccomp.ERRNO(1), name)
        rules.load()

    # As a child makes them: calls prepared in the parent (calls.run_prepared).
    nnp = calls.prepare_no_new_privs()
    restrict = landlock.prepare_restrict_self(ruleset)
    load = program.prepared()

    def landlock_step() -> None:
        calls.run_prepared([nnp, restrict])

    def seccomp_step() -> None:
        calls.run_prepared([nnp, load])

    steps: dict[str, Callable[[], None]] = {
        "no_new_privs": lambda: calls.run_prepared([nnp]),
        "landlock (no_new_privs + restrict_self)": landlock_step,
        "seccomp, parent's BPF (no_new_privs + prctl)": seccomp_step,
        "seccomp, seccomp_load in the child": libseccomp_in_child,
        'network "none" (unshare)': calls.leave_network,
    }
    out = {name: _in_child(step, n) for name, step in steps.items()}
    os.close(ruleset)
    return out


# -- reporting ---------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    lines = []
    summary, rel = result.get("summary", {}), result.get("ratios", {})
    if summary:
        rows = []
        for name, levels in summary.items():
            for c, row in levels.items():
                r = rel.get(name, {}).get(c, {})
                rows.append(
                    [
                        name,
                        c,
                        _fmt(row["conn_per_s"], ",.0f"),
                        _fmt(row["p50_ms"], ".3f"),
                        _fmt(r.get("conn_per_s"), ".2f"),
                        _fmt(r.get("p50_ms"), ".2f"),
                        _fmt(row["children_us_per_conn"], ".0f"),
                        str(row["errors_total"]),
                    ]
                )
        head = ["sandbox", "c", "conn/s", "p50 ms", "conn/s ÷ base", "p50 ÷ base"]
        head += ["child us", "err"]
        lines += columns(head, rows, text_columns=1)
        lines.append("base: off, and floor-off for the floors")
    costs = result.get("per_child_us")
    if costs:
        lines += ["", "per child, each step as timed in the child (median us):"]
        lines += [f"  {name:<46} {value:8.1f}" for name, value in costs.items()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.sandbox", description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"from: {', '.join([*VARIANTS, *FLOORS])} (all but the floors)",
    )
    p.add_argument("--concurrency", type=int_list, default=[8], help="1,8,32 (8)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, medians reported (3)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (5)")
    p.add_argument("--payload", type=int, default=64, help="bytes per connection (64)")
    p.add_argument("--max-children", type=int, default=256, help="(256)")
    p.add_argument("--backlog", type=int, default=128, help="(128)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load after start (1)")
    p.add_argument("--generator", choices=("c", "python"), default="c")
    p.add_argument(
        "--per-child", type=int, default=1000, metavar="N", help="children per step; 0: skip"
    )
    p.add_argument("--no-servers", action="store_true", help="only the per-child steps")
    p.add_argument("--out", type=Path, default=cache_dir() / "results")
    return p


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict[str, Any]:
    result = metadata("bench.sandbox", argv)
    if args.per_child > 0:
        result["per_child_us"] = per_child(args.per_child)
    if args.no_servers:
        return result
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS and n not in FLOORS]
    if unknown:
        known = ", ".join([*VARIANTS, *FLOORS])
        raise ValueError(f"unknown variant {unknown[0]} (from: {known})")
    if BASELINE not in names:
        names.insert(0, BASELINE)
    if any(n in FLOORS for n in names) and FLOOR_BASELINE not in names:
        names.append(FLOOR_BASELINE)
    load = Generator(prefer_c=args.generator == "c")
    if args.generator == "c" and load.binary is None:
        print(NO_COMPILER, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as directory:
        servers = specs(names, Path(directory), args.max_children, args.backlog)
        result["settings"] = {
            "variants": {n: VARIANTS.get(n) or FLOORS.get(n) for n in names},
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "duration": args.duration,
            "payload": args.payload,
            "generator": load.name,
        }
        runs: list[dict[str, Any]] = []
        for index in range(args.rounds):
            _round(servers, index, args, load, runs)
    result["summary"] = summarize(runs, names, args.concurrency)
    for levels in result["summary"].values():
        for row in levels.values():
            row.pop("cdf_ms", None)
    summary = result["summary"]
    result["ratios"] = ratios({n: v for n, v in summary.items() if n not in FLOORS}, BASELINE)
    floors = {n: v for n, v in summary.items() if n in FLOORS}
    if floors:
        result["ratios"].update(ratios(floors, FLOOR_BASELINE))
    result["runs"] = [{k: v for k, v in r.items() if k != "cdf_ms"} for r in runs]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rounds < 1 or not args.concurrency or args.duration <= 0:
        print("bench.sandbox: need --rounds >= 1, a concurrency, --duration > 0", file=sys.stderr)
        return 2
    try:
        result = run(args, argv)
    except ValueError as exc:
        print(f"bench.sandbox: {exc}", file=sys.stderr)
        return 2
    path = write_results("sandbox", result, args.out)
    print(table(result))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
