"""Routing control traffic and convergence against mesh size, in the simulator.

For each size: a random geometric mesh (about six links per node, UDP timing:
hello 1 s, update interval 4 s), cold start to converged (every node's forwarding
path to every other arrives, loop-free at every step), steady-state bytes per
second per link direction (routing frames, hellos, and what the busiest node hears
from all its neighbours together), then 5 % of the nodes stop at once and the time
until the rest has converged again. ``--radio`` adds a 100-node mesh on radio timing
(hello 10 s, update 30 s, 255-byte frames, 19.2 kbit/s links).

Simulated figures are deterministic (the seed fixes the run); the CPU seconds are
the median of ``--runs``, on whatever machine this is (say when it is busy).

    .venv/bin/python bench/routing_scale.py --sizes 50,200,1000 --runs 1 --radio
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_common_args, log
from meshpipe.simscale import ScaleResult, radio_timing, run_scale

RADIO = radio_timing()


def measure(n: int, runs: int, radio: bool) -> ScaleResult:
    results = []
    for i in range(runs):
        log(f"routing_scale: {n} nodes{' (radio)' if radio else ''}, run {i + 1}/{runs}")
        if radio:
            r = run_scale(
                n,
                seed=n,
                timing=RADIO,
                mtu=255,
                bandwidth_bps=19200,
                converge_limit=20 * RADIO.update_interval,
                measure_s=120.0,
            )
        else:
            r = run_scale(n, seed=n, converge_limit=80.0, measure_s=12.0)
        results.append(r)
    return replace(results[0], cpu_s=statistics.median(r.cpu_s for r in results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.set_defaults(runs=3)
    parser.add_argument("--sizes", default="50,200", help="comma-separated node counts")
    parser.add_argument("--radio", action="store_true", help="add the 100-node radio mesh")
    args = parser.parse_args()
    rows = [(f"udp {n}", measure(int(n), args.runs, False)) for n in args.sizes.split(",")]
    if args.radio:
        rows.append(("radio 100", measure(100, args.runs, True)))
    if args.json:
        print(json.dumps([{"mesh": name, **asdict(r)} for name, r in rows], indent=2))
        return
    head = (
        "mesh", "links", "deg", "converge s", "cold B/link", "routing B/s", "max",
        "hello B/s", "heard B/s", "failed", "recover s", "loops", "CPU s",
    )
    print(" | ".join(head))
    for name, r in rows:
        print(
            f"{name} | {r.links} | {r.mean_degree:.1f} | {r.converge_s:.0f} | "
            f"{r.converge_routing_bytes:.0f} | {r.routing_bps:.0f} | {r.routing_bps_max:.0f} | "
            f"{r.hello_bps:.0f} | {r.heard_bps_max:.0f} | {r.failed} | {r.recover_s:.0f} | "
            f"{r.loops} | {r.cpu_s:.0f}"
        )


if __name__ == "__main__":
    main()
