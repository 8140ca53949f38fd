"""Issue 19's triangle with real processes: A - B direct loses 60 % per frame, the
2-hop path A - C - B 5 % per link (every direction), per-frame kernel loss (UDP GSO
off in the nodes, offloads off on the veths), default timers. After 10 s every one
of 60 one-second samples of A's route to B goes through C (the simulator's
test_triangle_stays_off_the_lossy_link, on processes)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshpipe_workers.labnet import Lab
from tests.netns import require_root

pytestmark = [pytest.mark.netns, pytest.mark.slow]

TIMING = {
    "hello_interval": 1.0,
    "neighbour_timeout": 4.0,
    "update_interval": 4.0,
    "route_expiry": 14.0,
}
EXTRA = "\n[workers]\nudp_offload = false\ncrypto = 1\n"
SAMPLES = 60


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require_root()
    # The line a - c - b, closed by the direct link a - b.
    with Lab(
        ["a", "c", "b"],
        tmp_path,
        netns=True,
        timing=TIMING,
        extra_config=EXTRA,
        extra_links=[("a", "b")],
    ) as lab:
        assert lab.topo is not None
        lab.topo.disable_offloads()
        lab.topo.set_loss("a", 60, peer="b")  # both directions of the direct link
        lab.topo.set_loss("c", 5)  # both directions of a - c and c - b
        yield lab


def test_route_stays_off_the_lossy_direct_link(lab: Lab) -> None:
    lab.start_all()
    c_sid = lab.nodes["c"].sid
    lab.wait_for(lambda: lab.route("a", "b"), 30, "a's route to b")
    time.sleep(10.0)
    samples: list[tuple[float, str]] = []
    start = time.monotonic()
    for k in range(SAMPLES):
        route = lab.route("a", "b")
        samples.append(
            (round(time.monotonic() - start, 1), route["next_hop"][:8] if route else "none")
        )
        time.sleep(max(0.0, start + k + 1 - time.monotonic()))
    direct = [s for s in samples if s[1] != c_sid[:8]]
    assert lab.topo is not None
    drops = lab.topo.loss_drops("a")
    via_c = SAMPLES - len(direct)
    print(f"\n{via_c} of {SAMPLES} samples via c; not via c: {direct}; a's drops {drops}")
    assert direct == []
