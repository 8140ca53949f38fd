"""A node with every ``[limits]`` value halved still works: routes, tunnel, streams.

Two nodes in namespaces (a - b) with the tunnel on and two crypto workers each, their
rings, stream windows, reassembly budgets and caches at half their defaults (what a
small router would lower them to). The rings really are the smaller size.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import fields

import pytest

from meshpipe.config import LimitsSection
from meshpipe_workers.labnet import Lab
from meshpipe_workers.ring import HEADER_SIZE
from tests.netns import require_root

pytestmark = pytest.mark.netns

HALVED = {f.name: getattr(LimitsSection(), f.name) // 2 for f in fields(LimitsSection)}
CONFIG = (
    '[tunnel]\nenabled = true\nname = "mesh0"\n\n[workers]\ncrypto = 2\n\n[limits]\n'
    + "".join(f"{k} = {v}\n" for k, v in HALVED.items())
)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    with Lab(["a", "b"], tmp_path_factory.mktemp("limits"), netns=True, extra_config=CONFIG) as lab:
        lab.start_all()
        lab.wait_for(lambda: lab.route("a", "b") is not None, 30, "a's route to b")
        yield lab


def test_rings_have_the_halved_size(lab: Lab) -> None:
    pid = lab.cli("a", "status")["supervisor"]["pid"]
    rings = glob.glob(f"/dev/shm/meshpipe-{pid}-*")
    assert len(rings) == 13  # 1 interface, 2 crypto workers, tunnel
    assert {os.path.getsize(r) for r in rings} == {HEADER_SIZE + HALVED["ring_bytes"]}


def test_ping_and_tunnel_traffic_with_halved_limits(lab: Lab) -> None:
    res = lab.cli("a", "ping", lab.nodes["b"].sid[:8], "--count", "3", "--interval", "0.1")
    assert res["received"] == 3
    assert lab.tunnel_iperf3("a", "b", 3) > 0.0
    st = lab.cli("b", "status")
    assert sum(w["role"] == "crypto" for w in st["workers"]) == 2
    dropped = sum(w.get("in_queue_dropped", 0) for w in st["workers"])
    assert dropped == 0, st["workers"]
