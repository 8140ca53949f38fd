"""Real `meshpipe run` processes in four network namespaces A - B - C - D."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from meshpipe_workers.labnet import Lab
from tests.netns import require_root

pytestmark = pytest.mark.netns

# Lab timing: hello 0.5 s, neighbour timeout 2.5 s, update interval 2 s. A dead node's
# routes are retracted once its neighbours time it out, and the retraction travels as a
# triggered update: the bound is the neighbour timeout plus a few seconds of slack.
RETRACT_BOUND = 2.5 + 3.0
CONVERGE_BOUND = 30.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    with Lab(["a", "b", "c", "d"], tmp_path_factory.mktemp("line"), netns=True) as lab:
        lab.start_all()
        lab.wait_for(lambda: lab.route("a", "d"), CONVERGE_BOUND, "a's route to d")
        yield lab


def test_route_to_d_is_three_hops_via_b(lab: Lab) -> None:
    route = lab.wait_for(
        lambda: (r := lab.route("a", "d")) and r["hops"] == 3 and r, CONVERGE_BOUND, "3-hop route"
    )
    assert route["next_hop"] == lab.nodes["b"].sid
    ident = lab.cli("a", "id")
    assert ident["sid"] == lab.nodes["a"].sid
    assert ident["ipv6"].startswith("fd")
    for r in lab.cli("a", "routes"):
        assert set(r) >= {"sid", "next_hop", "hops", "metric"}


def test_logs_are_json_with_stable_events(lab: Lab) -> None:
    events = {e.get("event") for e in lab.log_events("b")}
    assert {"node.start", "peer.up", "route.changed"} <= events
    assert all(e.get("node") == lab.nodes["b"].sid[:8] for e in lab.log_events("b") if "event" in e)


def test_garbage_frames_are_counted_and_node_survives(lab: Lab) -> None:
    """Random and truncated frames at B's UDP port: dropped, counted, B keeps routing."""
    assert lab.topo is not None
    b_addr = lab.topo.addresses("b")[0]
    rng = random.Random(7)
    payloads = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 300))) for _ in range(300)]
    payloads += [bytes([0x11]), bytes([0x12, 0x80]), bytes([0x13]) + b"\x00" * 40]  # truncated
    script = (
        "import socket,sys,json\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "for h in json.load(sys.stdin): s.sendto(bytes.fromhex(h),(sys.argv[1],int(sys.argv[2])))\n"
    )
    proc = lab.topo.run(
        "a",
        [sys.executable, "-c", script, b_addr, str(lab.base_port)],
        input=json.dumps([p.hex() for p in payloads]),
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr

    def dropped() -> int:
        st = lab.cli("b", "status") or {"counters": {}}
        return sum(v for k, v in st["counters"].items() if k.startswith("drop."))

    lab.wait_for(lambda: dropped() >= 250, 10, "drops to be counted")
    assert lab.route("a", "d") is not None


def test_interface_worker_sigkill_is_restarted(lab: Lab) -> None:
    st = lab.cli("b", "status")
    iface = next(w for w in st["supervisor"]["workers"] if w["role"].startswith("interface"))
    os.kill(iface["pid"], signal.SIGKILL)

    def restarted() -> bool:
        s = lab.cli("b", "status") or {}
        ws = {w["role"]: w for w in s.get("supervisor", {}).get("workers", [])}
        w = ws.get(iface["role"])
        return bool(w and w["restarts"] >= 1 and w["pid"] and w["pid"] != iface["pid"])

    lab.wait_for(restarted, 15, "the interface worker to be restarted")
    assert any(e.get("event") == "worker.restarted" for e in lab.log_events("b"))
    lab.wait_for(
        lambda: (r := lab.route("a", "d")) and r["hops"] == 3, CONVERGE_BOUND, "routes back"
    )


def test_node_failure_retracts_route_and_restart_restores_it(lab: Lab) -> None:
    lab.wait_for(lambda: lab.route("a", "d"), CONVERGE_BOUND, "a's route to d")
    lab.kill("c")
    t0 = time.monotonic()
    lab.wait_for(lambda: lab.route("a", "d") is None, RETRACT_BOUND + 5, "route to d retracted")
    assert time.monotonic() - t0 <= RETRACT_BOUND + 1.0  # +1 s for CLI polling
    lab.start("c")
    lab.wait_for(
        lambda: (r := lab.route("a", "d")) and r["hops"] == 3, CONVERGE_BOUND, "route back"
    )
