"""The IP tunnel over the simulated 19,200 bit/s packet radio (255-byte MTU).

Mesh ``a`` -udp(veth)- ``b`` -radio(pty)- ``c``, each node in its own network
namespace so that the three TUN devices and their ``fd00::/8`` routes do not
collide; the radio is a pseudo-terminal channel (plain file descriptors, so it
crosses namespaces). ``a`` and ``c`` keep the default TUN MTU of 1280, so a
1,048-byte ICMPv6 echo rides MSP datagram mode, sealed once and cut below the session
into 7 radio frames of at most 255 bytes (meshpipe/fragments.py), which ``c`` joins
before it opens the packet (and the reply the same way back).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import pytest

from bench.radio_xfer import ROUTES_UP
from meshpipe_workers.labnet import Lab
from meshpipe_workers.radio_channel import RadioChannel, radio_interface_toml
from tests.netns import require_root

pytestmark = pytest.mark.netns

RATE = 19_200
PAYLOAD = 1000  # ICMPv6 echo data: 1,048-byte IPv6 packets, many radio frames each
COUNT = 5
TUNNEL = '\n[tunnel]\nenabled = true\nname = "mesh0"\n'  # default MTU 1280


@dataclass
class Mesh:
    lab: Lab
    air: RadioChannel


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    require_root()
    with RadioChannel(["b", "c"], RATE) as air:
        radio = {n: radio_interface_toml(air.path(n), RATE) for n in "bc"}
        lab = Lab(
            ["a", "b", "c"],
            tmp_path_factory.mktemp("radio-tunnel"),
            netns=True,
            udp_nodes=["a", "b"],  # the b-c veth stays unused: b and c talk by radio
            node_config={"a": TUNNEL, "b": radio["b"], "c": radio["c"] + TUNNEL},
        )
        with lab:
            lab.start_all()
            lab.wait_for(
                lambda: (r := lab.route("a", "c")) and r["hops"] == 2 and lab.route("c", "a"),
                ROUTES_UP,
                "a's route to c over udp + radio",
            )
            for name in ("a", "c"):
                lab.wait_for(partial(_has_overlay_address, lab, name), 15, f"{name}'s TUN")
            yield Mesh(lab, air)


def _ipv6(lab: Lab, name: str) -> str:
    ident = lab.cli(name, "id")
    assert ident is not None
    return str(ident["ipv6"])


def _has_overlay_address(lab: Lab, name: str) -> bool:
    assert lab.topo is not None
    out = lab.topo.run(name, ["ip", "-6", "addr", "show", "dev", "mesh0"]).stdout
    return _ipv6(lab, name) in out


def test_ping6_through_the_tunnel_over_the_radio(mesh: Mesh) -> None:
    lab = mesh.lab
    assert lab.topo is not None
    r = lab.route("c", "a")
    assert r is not None and r["hops"] == 2 and r["iface"] == "radio0"
    assert [p["iface"] for p in lab.cli("c", "peers")] == ["radio0"]  # c has no UDP at all
    dst = _ipv6(lab, "c")
    # Each echo and reply take about 1.1 s of air apiece at 19,200 bit/s: a request
    # every 3 s keeps the half-duplex channel (and the 2 s radio queue) from backing up.
    air0 = mesh.air.stats()
    t0 = time.monotonic()
    res = lab.topo.run(
        "a",
        ["ping", "-6", "-c", str(COUNT), "-i", "3", "-W", "10", "-s", str(PAYLOAD), dst],
        timeout=COUNT * 3 + 30,
    )
    took = time.monotonic() - t0
    air1 = mesh.air.stats()
    frames = air1.get("air.frames", 0) - air0.get("air.frames", 0)
    st = {n: lab.cli(n, "status") or {} for n in "abc"}
    # On a loss, say where: the tunnel stages at both ends and the radio workers' drops.
    diag = "\n".join(
        [
            res.stdout + res.stderr,
            *(f"{n} tunnel {st[n].get('tunnel')}" for n in "ac"),
            *(f"{n} workers {[w.get('counters') for w in st[n].get('workers', [])]}" for n in "bc"),
        ]
    )
    m = re.search(r"(\d+) received", res.stdout)
    received = int(m.group(1)) if m else 0
    assert received >= COUNT - 1, diag  # one loss allowed: the air is shared with hellos
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", res.stdout)
    assert rtt is not None, diag
    print(
        f"\nping -6 -s {PAYLOAD} a -> c over udp + 19,200 bit/s radio (tunnel MTU 1280): "
        f"{received}/{COUNT} replies, rtt min/avg/max {rtt.group(1)}/{rtt.group(2)}/"
        f"{rtt.group(3)} ms ({took:.0f} s, {frames} radio frames)"
    )
    tun_c = st["c"]["tunnel"]["stages"]
    assert tun_c["from_mesh"]["packets"] >= received and tun_c["to_mesh"]["packets"] >= received
    # Each 1,048-byte packet crossed the air as 5 or more frames each way (the radio's
    # data MTU counts the header compression: 218 bytes of a datagram a frame).
    assert frames >= received * 2 * 5, (frames, diag)
