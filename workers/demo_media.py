"""The media part of `make demo`: a trace, and a live stream through a lossy link.

As root, the b - c link of the demo's namespaces drops 15 % of the frames each way
(nftables ``numgen random`` rules inside b and c); a 64 kbit/s stream crosses it in
deadline mode (200 ms budget), then in reliable mode for comparison. Without root
there is nothing to inject loss with (the nodes share the host's loopback), so the
stream runs over a clean path and the demo says so.
"""

from __future__ import annotations

from collections.abc import Callable

from meshpipe_workers import livestream
from meshpipe_workers.labnet import Lab

LOSS_PERCENT = 15
BUDGET_MS = 200
SECONDS = 5.0
# Per-frame loss needs single frames: no UDP GSO in the nodes (nftables would see a
# GSO batch as one packet).
NODE_CONFIG = "\n[workers]\nudp_offload = false\n"


def show_trace(lab: Lab, banner: Callable[[str], None]) -> None:
    banner("trace from a to d: every hop with its SID, name and RTT (meshpipe trace)")
    print(lab.cli_text("a", "trace", lab.nodes["d"].sid[:16]), end="")


def show_live_stream(lab: Lab, banner: Callable[[str], None]) -> None:
    topo = lab.topo
    lossy = topo is not None
    where = f"the b - c link drops {LOSS_PERCENT}% each way" if lossy else "no loss"
    banner(f"a live 64 kbit/s stream a -> d, deadline mode {BUDGET_MS} ms; {where}")
    if topo is not None:
        topo.disable_offloads()
        topo.set_loss("b", LOSS_PERCENT, peer="c", directions=("out",))
        topo.set_loss("c", LOSS_PERCENT, peer="b", directions=("out",))
    else:
        print("  (loss injection needs root: nftables in network namespaces; skipped)")
    try:
        args = ["--mode", "deadline", "--budget-ms", str(BUDGET_MS)]
        run = livestream.stream(lab, "a", "d", 5200, args, SECONDS)
        print(f"  deadline: {run.summary()}")
        for g in run.gaps[:3]:
            print(f"    d's msp listen reported on stderr: {g}")
        run = livestream.stream(lab, "a", "d", 5201, ["--mode", "reliable"], SECONDS)
        over = sum(1 for t in run.lateness() if t > BUDGET_MS / 1000)
        print(f"  reliable: {run.summary()}; {over} records later than {BUDGET_MS} ms")
        if topo is not None:
            drops = sum(sum(topo.loss_drops(n).values()) for n in ("b", "c"))
            print(f"  nftables dropped {drops} frames on the b - c link")
    finally:
        if topo is not None:
            topo.clear_loss()


__all__ = ["NODE_CONFIG", "show_live_stream", "show_trace"]
