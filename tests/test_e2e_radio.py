"""Real nodes on a simulated packet radio: pseudo-terminals throttled to 19,200 bit/s.

Two labs run side by side (no root needed: loopback UDP and ptys only):

* ``p`` and ``q`` linked by radio only;
* ``a`` -udp(loopback)- ``b`` -radio- ``c``: ``b`` routes between its two interfaces.

The idle test (slow: two minutes) measures the control traffic on both radio channels
and asserts it stays within 1% of the link rate (issue 18).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bench.radio_xfer import ROUTES_UP
from meshpipe import wire
from meshpipe.actions import BROADCAST
from meshpipe.config import RADIO_TIMING
from meshpipe.identity import Identity
from meshpipe.node import InterfaceParams, NodeCore, Timing
from meshpipe.sim import LinkProfile, SimMesh
from meshpipe_workers.labnet import Lab
from meshpipe_workers.radio import SendQueue, TokenBucket, priority
from meshpipe_workers.radio_channel import RadioChannel, radio_interface_toml
from tests.netns import loopback_ports

RATE = 19_200
BUDGET = RATE / 8 * 0.01  # 1% of the link rate: 24 bytes/s
TIMER_KEYS = ("hello_interval", "neighbour_timeout", "update_interval", "route_expiry")
IDLE_WINDOW = 120.0  # seconds; three hellos of every node and a route dump or two


@dataclass
class Radios:
    pair: Lab
    pair_air: RadioChannel
    mesh: Lab
    mesh_air: RadioChannel


@pytest.fixture(scope="module")
def radios(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Radios]:
    port = loopback_ports()  # p, q: none; a, b: port + 10, + 11
    work = tmp_path_factory.mktemp("radio")
    with RadioChannel(["p", "q"], RATE) as pair_air, RadioChannel(["b", "c"], RATE) as mesh_air:
        pair = Lab(
            ["p", "q"],
            work / "pair",
            netns=False,
            base_port=port,
            udp_nodes=[],
            node_config={n: radio_interface_toml(pair_air.path(n), RATE) for n in "pq"},
        )
        mesh = Lab(
            ["a", "b", "c"],
            work / "mesh",
            netns=False,
            base_port=port + 10,
            udp_nodes=["a", "b"],
            node_config={n: radio_interface_toml(mesh_air.path(n), RATE) for n in "bc"},
        )
        with pair, mesh:
            for lab in (pair, mesh):
                for name in lab.names:
                    lab.start(name, wait=False)
            pair.wait_for(
                lambda: pair.route("p", "q") and pair.route("q", "p"), ROUTES_UP, "p <-> q"
            )
            mesh.wait_for(
                lambda: (r := mesh.route("a", "c")) and r["hops"] == 2 and mesh.route("c", "a"),
                ROUTES_UP,
                "a's route to c over udp + radio",
            )
            yield Radios(pair, pair_air, mesh, mesh_air)


def test_radio_only_pair_routes_and_ping(radios: Radios) -> None:
    lab = radios.pair
    r = lab.route("p", "q")
    assert r is not None and r["hops"] == 1 and r["iface"] == "radio0"
    peers = lab.cli("p", "peers")
    assert [x["iface"] for x in peers] == ["radio0"]
    res = lab.cli("p", "ping", lab.nodes["q"].sid[:8], "--count", "3", "--interval", "0.3")
    # One loss allowed: the channel is CSMA, a ping can collide with a hello or a dump.
    assert res["received"] >= 2 and res["hops"] == 1, res


def test_udp_radio_mesh_routes_and_ping(radios: Radios) -> None:
    lab = radios.mesh
    r = lab.route("a", "c")
    assert r is not None and r["hops"] == 2 and r["iface"] == "udp0"
    back = lab.route("c", "a")
    assert back is not None and back["hops"] == 2 and back["iface"] == "radio0"
    res = lab.cli("a", "ping", lab.nodes["c"].sid[:8], "--count", "3", "--interval", "0.3")
    assert res["received"] >= 2 and res["hops"] == 2, res  # one may collide
    st = lab.cli("b", "status")
    roles = sorted(w["role"] for w in st["supervisor"]["workers"])
    crypto = [r for r in roles if r.startswith("crypto:")]
    assert len(crypto) >= 1  # "auto": one per core
    assert sorted(set(roles) - set(crypto)) == ["control", "interface:udp0:0", "radio:radio0"]


@pytest.mark.slow
def test_idle_radio_control_traffic_within_one_percent(radios: Radios) -> None:
    before = [radios.pair_air.stats(), radios.mesh_air.stats()]
    time.sleep(IDLE_WINDOW)
    after = [radios.pair_air.stats(), radios.mesh_air.stats()]
    for label, b, a in zip(("p-q radio", "b-c radio"), before, after, strict=True):
        rate = (a.get("air.bytes", 0) - b.get("air.bytes", 0)) / IDLE_WINDOW
        kinds = {
            k[len("air.bytes.") :]: round((v - b.get(k, 0)) / IDLE_WINDOW, 1)
            for k, v in a.items()
            if k.startswith("air.bytes.") and v > b.get(k, 0)
        }
        print(
            f"\nidle control traffic on the {label}: {rate:.1f} bytes/s "
            f"({rate * 8 / RATE:.2%} of {RATE} bit/s; budget {BUDGET:.0f} bytes/s): {kinds}"
        )
        assert 0 < rate <= BUDGET


# -- the pieces, without processes ------------------------------------------------------------


def _radio_core(seed: int, both: bool) -> NodeCore:
    radio = InterfaceParams(
        "radio0", 251, BROADCAST, (), Timing(**{k: getattr(RADIO_TIMING, k) for k in TIMER_KEYS})
    )
    ifaces = [InterfaceParams("lan0", 1400, BROADCAST), radio] if both else [radio]
    ident = Identity.from_seed(bytes([seed]) * 32)
    return NodeCore(ident, ifaces, Timing(), now=0.0, rng=random.Random(seed))


def test_core_per_interface_timing() -> None:
    """A radio interface keeps its own hello and dump schedule beside a fast LAN, and a
    radio-only link holds its route through many slow update periods without flapping."""
    mesh = SimMesh(3, record_frames=True)
    for i, (name, both) in enumerate([("a", True), ("b", True), ("c", False), ("d", False)]):
        mesh.add_node(name, _radio_core(i + 1, both))
    mesh.connect("a", "b", LinkProfile(delay=0.01))
    mesh.connect("a", "b", LinkProfile(delay=0.05), a_iface=1, b_iface=1)
    mesh.connect("c", "d", LinkProfile(delay=0.05))
    mesh.run_for(300.0)
    sent: Counter[tuple[str, int, int]] = Counter()
    assert mesh.frame_log is not None
    for _t, src, _dst, frame in mesh.frame_log:  # src is (node, iface); one receiver a link
        name, iface = src  # type: ignore[misc]
        sent[(name, iface, wire.frame_kind(frame))] += len(frame)
    hellos_lan = sent[("a", 0, wire.KIND_HELLO)]
    hellos_radio = sent[("a", 1, wire.KIND_HELLO)]
    assert hellos_radio * 5 < hellos_lan  # 1 s on the LAN, 10 s on the radio
    for name, iface in [("a", 1), ("c", 0), ("d", 0)]:
        idle = (sent[(name, iface, wire.KIND_HELLO)] + sent[(name, iface, wire.KIND_ROUTING)]) / 300
        assert idle < BUDGET / 2, (name, idle)  # a node's share of a two-node link's budget
    c, d = mesh.node_as("c", NodeCore), mesh.node_as("d", NodeCore)
    assert [r.sid for r in c.routes()] == [d.sid] and [r.sid for r in d.routes()] == [c.sid]
    changes = [e for _, e in mesh.events.get("c", []) if e.name in ("route.changed", "peer.down")]
    assert len(changes) == 1  # the route came up once and stayed


def test_send_queue_priorities_and_drops() -> None:
    counters: Counter[str] = Counter()
    q = SendQueue(1000, counters)
    bulk = bytes([0x13]) + bytes(299)  # DATA frames (kind byte 0x13)
    ack = bytes([0x13]) + bytes(70)
    hello = bytes([0x11]) + bytes(150)
    assert [priority(f) for f in (hello, ack, bulk)] == [0, 1, 2]
    for _ in range(3):
        assert q.push(bulk, priority(bulk))
    assert not q.push(bulk, priority(bulk))  # full: the new bulk frame is dropped
    assert q.push(hello, priority(hello))  # a hello pushes out the newest bulk frame
    assert q.push(ack, priority(ack))
    assert counters["drop.queue_full.bulk"] == 2 and q.bytes <= 1000
    assert [q.pop() for _ in range(len(q))] == [hello, ack, bulk, bulk]
    assert q.bytes == 0 and q.peek() is None


def test_token_bucket_paces_to_the_rate() -> None:
    b = TokenBucket(rate=1920.0, burst=600.0, now=0.0)
    sent, t = 0, 0.0
    while t < 10.0:
        if b.take(250, t):
            sent += 250
        t += b.wait_for(250, t) or 0.001
    assert 1920 * 10 <= sent <= 1920 * 10 + 600  # the rate plus one burst, never more
