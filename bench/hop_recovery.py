"""Per-hop recovery on and off: the tunnel on a clean line and under per-frame loss.

Run as root with the repository's venv (see bench/README.md):

    .venv/bin/python -m bench.hop_recovery [--runs 3] [--seconds 5] [--json]

Three namespaces a - b - c (2 hops, ``meshpipe_workers.labnet.Lab``), [tunnel] on in
every node, ``iperf3`` TCP from a to c's overlay address, each node restarted with
``hop_recovery = "auto"`` (the default) and then ``"off"``:

- clean: the default config (UDP GSO on, veth offloads on), no loss: what recovery
  costs where there is nothing to recover;
- lossy: UDP GSO off in the nodes, GSO/TSO/GRO off on the veths and an nftables
  ``numgen random`` drop of ``--loss`` % (default 10) on every link direction, so
  single frames are lost; then 100 ``meshpipe ping`` at 40% per link direction.

Medians of ``--runs`` runs, with the ratio auto/off.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/hop_recovery.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Row,
    add_common_args,
    exit_on_signals,
    log,
    print_table,
    repeat,
    require_root,
    to_json,
)
from meshpipe_workers.labnet import Lab

NAMES = ["a", "b", "c"]
PAIRS = [("a", "c"), ("c", "a")]
# As in tests/test_e2e_hop_recovery.py: lab neighbours that survive 40% hello loss.
TIMING = {
    "hello_interval": 0.5,
    "neighbour_timeout": 6.0,
    "update_interval": 2.0,
    "route_expiry": 14.0,
}
TUNNEL = '\n[tunnel]\nenabled = true\nname = "mesh0"\nmtu = 1280\n'
MODES = ("auto", "off")


def set_loss(lab: Lab, percent: float) -> None:
    assert lab.topo is not None
    for name in lab.names:
        lab.topo.set_loss(name, percent, directions=("out",))


def ping_replies(lab: Lab, count: int) -> float:
    res = lab.run(
        "a",
        "ping",
        lab.nodes["c"].sid,
        "-n",
        str(count),
        "-i",
        "0.1",
        "--json",
        timeout=count * 0.1 + 60,
    )
    return float(json.loads(res.stdout)["received"]) if res.stdout else 0.0


def measure(lossy: bool, args: argparse.Namespace, rows: list[Row]) -> None:
    extra = "\n[workers]\nudp_offload = false\n" if lossy else ""
    case = f"{args.loss:g}% per frame" if lossy else "clean"
    with (
        tempfile.TemporaryDirectory(prefix="hoprec-") as tmp,
        Lab(NAMES, tmp, netns=True, timing=TIMING, extra_config=extra + TUNNEL) as lab,
    ):
        assert lab.topo is not None
        if lossy:
            lab.topo.disable_offloads()
        for mode in MODES:
            lab.set_interface_key("hop_recovery", f'"{mode}"')
            lab.restart_all()
            lab.wait_routes(PAIRS, hops=2)
            if lossy:
                set_loss(lab, args.loss)
                time.sleep(3)
            samples = repeat(
                lambda _i: lab.tunnel_iperf3("a", "c", args.seconds),
                args.runs,
                f"{case}, {mode}",
            )
            rows.append(Row(f"tunnel TCP, 2 hops, {case}", mode, samples))
            if lossy:
                set_loss(lab, 40)
                time.sleep(8)
                got = ping_replies(lab, 100)
                log(f"  40% per frame, {mode}: {got:.0f}/100 ping replies")
                rows.append(Row("ping, 2 hops, 40% per frame", mode, [got], unit="replies"))
                set_loss(lab, 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.hop_recovery", description=__doc__)
    add_common_args(p)
    p.add_argument("--seconds", type=int, default=5, help="iperf3 duration")
    p.add_argument("--loss", type=float, default=10.0, help="per-frame loss per link, %%")
    args = p.parse_args(argv)
    require_root()
    rows: list[Row] = []
    with exit_on_signals():
        measure(False, args, rows)
        measure(True, args, rows)
    if args.json:
        print(to_json(rows, "auto", ["off"], loss=args.loss, seconds=args.seconds))
    else:
        print_table(rows, "auto", ["off"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
