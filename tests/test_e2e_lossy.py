"""MSP across A-B-C-D with kernel burst loss: 10% of the batches on every link dropped.

nftables sees a UDP GSO batch (and a TCP TSO segment) as one packet, so with the
default config each drop takes a run of up to ~45 frames. Before the fix for issue 19
2 MiB took 87-125 s here against kernel TCP's 1-26 s (see bench/lossy.py, which this
reuses; bench/README.md has the figures).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench.common import BenchError, make_payload, route_line
from bench.msp_goodput import MSP_PORT, NAMES, Payload, msp_run, tcp_run
from meshpipe_workers.labnet import Lab
from tests.netns import require_root

pytestmark = [pytest.mark.netns, pytest.mark.slow]

LOSS = 10.0  # percent of what each node sends on each link
TCP_TIMEOUT = 60.0
MSP_TIMEOUT = 90.0
# MSP must finish within this, or within 20x TCP's time if TCP was slower (TCP varies
# from 0.5 to 300 s at this loss); before the fix MSP took 87-125 s.
MSP_BOUND = 60.0


def test_msp_stream_survives_burst_loss_within_bound_of_tcp(tmp_path: Path) -> None:
    require_root()
    payload = Payload(tmp_path / "payload.bin", 2 * 1024 * 1024, "")
    payload.sha256 = make_payload(payload.path, payload.size)
    with Lab(NAMES, tmp_path / "lab", netns=True) as lab:
        topo = lab.topo
        assert topo is not None
        route_line(topo)
        lab.start_all()
        lab.wait_for(lambda: (r := lab.route("a", "d")) and r["hops"] == 3, 60, "a's route to d")
        lab.cli("a", "ping", lab.nodes["d"].sid, "--count", "1")  # the session, unhurried
        for name in NAMES:
            topo.set_loss(name, LOSS, directions=["out"])
        try:
            tcp_s = payload.size * 8 / (tcp_run(topo, "a", "d", payload, TCP_TIMEOUT) * 1e6)
        except (BenchError, subprocess.TimeoutExpired):
            tcp_s = TCP_TIMEOUT  # TCP stalled in its own backoff: still a reference
        # Byte-exact (sha256) or msp_run raises.
        mbit = msp_run(lab, "a", "d", payload, MSP_PORT, MSP_TIMEOUT)
        msp_s = payload.size * 8 / (mbit * 1e6)
        drops = sum(sum(topo.loss_drops(n).values()) for n in NAMES)
        assert drops > 0  # the loss really happened
        assert msp_s <= max(MSP_BOUND, 20 * tcp_s), f"MSP {msp_s:.1f} s, TCP {tcp_s:.1f} s"
