"""The benchmarks of issues 12, 14-17, one after the other, and their figures side by side.

`python tests/bench/run.py [--only A,B,C1,C2,D,E,F,G,H] [--profile]` runs A (submit
throughput against a bare Litestar app, and a burst's p99), B (end to end
against arq peers on httpx and on aiohttp), C1 (worker CPU per finished job at
real load, against the arq + httpx peer), C2 (the most in-flight jobs one
worker keeps polled every second, against plain GETs), D (Redis memory per
kept finished job) and E (issue 14: 1,000 `Prefer: wait` reads and 1,000
event streams on one API process while a worker finishes their jobs), F
(issue 16: 500 failed webhooks recovered by one call while another tenant's
webhooks keep arriving) and G (issue 17: detection delay and polls per job,
learned poll timing against the interval rule, at two scales of run, after
RunComfy's speed halves, and with a queue where RunComfy runs 4 at once) and
H (issue 15: the worker's memory while it copies a 500 MiB output into an S3
store), each on its own private Redis, emulator and processes on 127.0.0.1, and prints
each section as it ends, then every goal and key figure in one summary.
`--profile` also samples the API (A) and the worker (C2, at the step it
missed) with py-spy and prints their hottest functions. The whole
run takes about eight minutes on 2 cores (G alone about two and a half:
`python tests/bench/run.py --only G`).
"""

import argparse
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import bench_cost
import bench_e2e
import bench_learn
import bench_load
import bench_outputs
import bench_poll
import bench_recover
import bench_submit
import bench_watch
from harness import ROOT, Section, machine, run_async, table

PROFILE_S = 8.0


def revision() -> str:
    """The commit measured, and whether service/ had changes on top of it."""
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "service"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"{head or '?'}{' + uncommitted changes in service/' if dirty else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only", default="A,B,C1,C2,D,E,F,G,H", help="comma list of benchmarks to run"
    )
    parser.add_argument("--profile", action="store_true", help="profile the API (A), worker (C2)")
    args = parser.parse_args()
    profile_s = PROFILE_S if args.profile else 0.0
    benches: dict[str, Callable[[], Awaitable[Section]]] = {
        "A": lambda: bench_submit.run(profile_s=profile_s),
        "B": bench_e2e.run,
        "C1": bench_load.run,
        "C2": lambda: bench_poll.run(profile_s=profile_s),
        "D": bench_cost.run,
        "E": bench_watch.run,
        "F": bench_recover.run,
        "G": bench_learn.run,
        "H": bench_outputs.run,
    }
    chosen = [name.strip().upper() for name in args.only.split(",") if name.strip()]
    started = time.monotonic()
    print("runcomfy-gateway benchmarks (issues 12, 14, 15, 16 and 17)")
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows = [*machine(), ("revision", revision()), ("load average at start", load)]
    print("\n".join(table(["machine", ""], rows)))
    sections: list[Section] = []
    for name in chosen:
        print(flush=True)
        section = run_async(benches[name]())
        sections.append(section)
        print(section.render(), flush=True)
    print()
    print("Summary")
    print("=======")
    rows = [
        (g.name, g.actual, g.target, "met" if g.met else "NOT met")
        for s in sections
        for g in s.goals
    ]
    print("\n".join(table(["goal", "measured", "target", "verdict"], rows)))
    print()
    figures = [(s.title.split(".")[0], name, value) for s in sections for name, value in s.summary]
    print("\n".join(table(["", "key figure", "value"], figures)))
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    print(f"\n(took {time.monotonic() - started:.0f} s; load average at the end {load})")


if __name__ == "__main__":
    main()
