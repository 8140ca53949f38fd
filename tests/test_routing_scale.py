"""Routing at scale (issue 18): random geometric meshes of about six links per node,
cold start, steady state, 5 % of the nodes failing at once.

Bounds, in update intervals of the timing used (UDP defaults: 4 s; radio: 30 s):

* CONVERGE_INTERVALS: from a cold start every node routes to every other (the
  forwarding path arrives), loop-free at every simulator step;
* the same bound after 5 % of the nodes stop at once (the rest routes around them
  and nobody keeps a route to a stopped node or another component);
* steady-state routing traffic per link direction at most UDP_ROUTING_BPS on UDP
  intervals, and at most RADIO_SHARE of a 19.2 kbit/s radio on radio intervals.

The 200-node mesh and the radio mesh are marked slow (they run in CI); checks of
genuine signatures are answered by identity.signed_memo (forgeries still meet
Ed25519).
"""

from __future__ import annotations

import pytest

from meshpipe.node import Timing
from meshpipe.simscale import ScaleResult, radio_timing, run_scale

CONVERGE_INTERVALS = 20
UDP_ROUTING_BPS = 5000 / 8  # bytes per second per link direction
RADIO_BPS = 19200 / 8
RADIO_SHARE = 0.05
RADIO_TIMING = radio_timing()


def check_udp(r: ScaleResult) -> None:
    interval = Timing().update_interval
    assert r.loops == 0 and r.loop_walks > 0
    assert 5.0 <= r.mean_degree <= 7.0
    assert r.converge_s <= CONVERGE_INTERVALS * interval
    assert r.recover_s <= CONVERGE_INTERVALS * interval
    assert r.routing_bps_max <= UDP_ROUTING_BPS


def test_50_node_udp_mesh_converges_recovers_and_stays_quiet() -> None:
    check_udp(run_scale(50, seed=50, converge_limit=80.0, measure_s=12.0))


@pytest.mark.slow
def test_200_node_udp_mesh_converges_recovers_and_stays_quiet() -> None:
    check_udp(run_scale(200, seed=200, converge_limit=80.0, measure_s=12.0))


# The 1,000-node mesh is measured by bench/routing_scale.py, not here: its cold start
# costs minutes of CPU in this pure-Python simulator (bench/README.md, routing_scale).


@pytest.mark.slow
def test_100_node_radio_mesh_stays_within_5_percent() -> None:
    r = run_scale(
        100,
        seed=100,
        timing=RADIO_TIMING,
        mtu=255,
        bandwidth_bps=19200,
        converge_limit=CONVERGE_INTERVALS * RADIO_TIMING.update_interval,
        measure_s=120.0,
    )
    assert r.loops == 0
    assert r.converge_s <= CONVERGE_INTERVALS * RADIO_TIMING.update_interval
    assert r.recover_s <= CONVERGE_INTERVALS * RADIO_TIMING.update_interval
    # Routing frames on the busiest link direction plus the mean hello traffic.
    assert r.routing_bps_max + r.hello_bps <= RADIO_SHARE * RADIO_BPS
