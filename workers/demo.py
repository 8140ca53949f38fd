"""`make demo`: four real meshpipe nodes in a line on this machine.

As root they live in network namespaces joined by veth pairs (198.18.0.0/15) and
find each other by LAN multicast; otherwise they share loopback and use configured
unicast peers. The demo prints what each node sees and stops everything cleanly.
"""

from __future__ import annotations

import os
import sys
import tempfile

from meshpipe_workers.labnet import Lab

NAMES = ["a", "b", "c", "d"]


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def main() -> int:
    netns = os.geteuid() == 0
    with (
        tempfile.TemporaryDirectory(prefix="meshpipe-demo-") as tmp,
        Lab(NAMES, tmp, netns=netns) as lab,
    ):
        where = (
            "network namespaces linked by veth (198.18.0.0/15), multicast discovery"
            if netns
            else "loopback UDP with configured peers (run as root for namespaces)"
        )
        banner(f"starting 4 nodes in a line a - b - c - d: {where}")
        lab.start_all()
        for name in NAMES:
            print(f"  {name}: {lab.nodes[name].sid}")
        banner("waiting until a has a route to d")
        lab.wait_for(lambda: lab.route("a", "d"), 60, "a's route to d")
        lab.wait_for(
            lambda: all(len(lab.cli(n, "routes") or []) == len(NAMES) - 1 for n in NAMES),
            60,
            "every node to reach every other",
        )
        for name in NAMES:
            banner(f"node {name}: neighbours")
            print(lab.cli_text(name, "peers"), end="")
            banner(f"node {name}: routes")
            print(lab.cli_text(name, "routes"), end="")
        r = lab.route("a", "d")
        assert r is not None
        banner("result")
        via, b_sid = r["next_hop"][:16], lab.nodes["b"].sid[:16]
        print(f"  a reaches d in {r['hops']} hops via {via} (b is {b_sid})")
        banner("stopping")
    print("demo finished cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
