"""The IP tunnel with real processes and TUN devices across A-B-C-D (3 hops).

A and D run the tunnel. D is the gateway for 198.18.200.0/24 (a veth pair inside D's
namespace stands for the LAN behind it: this kernel has no dummy devices); A has
the IPv4 address 198.18.201.1 on its TUN device, which D routes back to A. Both are
configured the way WireGuard's allowed-ips would be: each prefix names the node
that may use it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meshpipe.dataplane import shard_of
from meshpipe_workers.labnet import Lab
from tests.netns import require_root

pytestmark = pytest.mark.netns

LAN_D = "198.18.200.0/24"
HOST_BEHIND_D = "198.18.200.1"
ADDR_A = "198.18.201.1"


def _tunnel_config(a_sid: str, d_sid: str) -> str:
    return f"""
[tunnel]
enabled = true
name = "mesh0"
mtu = 1280
addresses = {{ADDRESSES}}

[[tunnel.route]]
prefix = "{LAN_D}"
via = "{d_sid}"

[[tunnel.route]]
prefix = "{ADDR_A}/32"
via = "{a_sid}"
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    with Lab(["a", "b", "c", "d"], tmp_path_factory.mktemp("tunnel"), netns=True) as lab:
        text = _tunnel_config(lab.nodes["a"].sid, lab.nodes["d"].sid)
        for name, addresses in (("a", f'["{ADDR_A}/32"]'), ("d", "[]")):
            cfg = lab.nodes[name].config
            cfg.write_text(cfg.read_text() + text.replace("{ADDRESSES}", addresses))
        assert lab.topo is not None
        ns_d = lab.topo.ns("d")
        for args in (
            ["link", "add", "lan0", "type", "veth", "peer", "name", "lan1"],
            ["addr", "add", f"{HOST_BEHIND_D}/24", "dev", "lan0"],
            ["link", "set", "lan0", "up"],
            ["link", "set", "lan1", "up"],
        ):
            subprocess.run(["ip", "-n", ns_d, *args], check=True)
        lab.start_all()
        lab.wait_for(lambda: (r := lab.route("a", "d")) and r["hops"] == 3, 30, "a's route to d")
        for name in ("a", "d"):
            lab.wait_for(lambda n=name: _has_overlay_address(lab, n), 15, f"{name}'s TUN device")
        yield lab


def _ipv6(lab: Lab, name: str) -> str:
    ident = lab.cli(name, "id")
    assert ident is not None
    return str(ident["ipv6"])


def _has_overlay_address(lab: Lab, name: str) -> bool:
    assert lab.topo is not None
    out = lab.topo.run(name, ["ip", "-6", "addr", "show", "dev", "mesh0"]).stdout
    return _ipv6(lab, name) in out


def _ping(lab: Lab, name: str, *args: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    assert lab.topo is not None
    return lab.topo.run(name, ["ping", "-c", str(count), "-i", "0.2", "-W", "2", *args], timeout=30)


def _counters(lab: Lab, name: str) -> dict[str, Any]:
    st = lab.cli(name, "status")
    assert st is not None
    return dict(st["counters"])


def _iperf(
    lab: Lab,
    *client_args: str,
    seconds: int = 3,
    during: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """iperf3 from a to d's overlay address; ``during()`` runs 2.5 s into the flow."""
    assert lab.topo is not None
    server = lab.topo.exec(
        "d", ["iperf3", "-s", "-1", "-B", _ipv6(lab, "d")], stdout=subprocess.DEVNULL
    )
    try:
        time.sleep(0.5)
        client = lab.topo.exec(
            "a",
            ["iperf3", "-c", _ipv6(lab, "d"), "-t", str(seconds), "-J", *client_args],
            stdout=subprocess.PIPE,
            text=True,
        )
        if during is not None:
            time.sleep(2.5)
            during()
        stdout, _ = client.communicate(timeout=seconds + 40)
        assert client.returncode == 0, stdout[-2000:]
        out: dict[str, Any] = json.loads(stdout)
        return out
    finally:
        server.wait(10)


def test_ping6_between_overlay_addresses_across_three_hops(lab: Lab) -> None:
    res = _ping(lab, "a", "-6", _ipv6(lab, "d"), count=5)
    assert res.returncode == 0, res.stdout + res.stderr
    assert " 0% packet loss" in res.stdout or " 20% packet loss" in res.stdout, res.stdout

    def stages() -> dict[str, Any]:  # the workers report every second
        st = lab.cli("a", "status")
        assert st is not None
        return dict(st["tunnel"]["stages"])

    lab.wait_for(
        lambda: (
            stages()["to_mesh"].get("packets", 0) >= 4
            and stages()["from_mesh"].get("packets", 0) >= 4
        ),
        5,
        "tunnel stage counters",
    )
    assert {"tun_read", "to_mesh", "from_mesh", "tun_write"} <= set(stages())


def test_iperf3_tcp_through_the_tunnel(lab: Lab) -> None:
    out = _iperf(lab)
    received = out["end"]["sum_received"]
    assert received["bytes"] > 1_000_000, received
    print(f"tunnel TCP a->d: {received['bits_per_second'] / 1e6:.1f} Mbit/s")


def test_iperf3_udp_through_the_tunnel(lab: Lab) -> None:
    out = _iperf(lab, "-u", "-b", "10M", "-l", "1200")
    s = out["end"]["sum"]
    assert s["packets"] > 1000, s
    assert s["lost_percent"] < 20, s
    print(f"tunnel UDP a->d: loss {s['lost_percent']:.2f}% jitter {s['jitter_ms']:.3f} ms")


def test_ipv4_prefix_routed_to_d_reaches_the_host_behind_it(lab: Lab) -> None:
    res = _ping(lab, "a", HOST_BEHIND_D)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"from {HOST_BEHIND_D}" in res.stdout


def test_unrouted_destination_gets_icmp_unreachable(lab: Lab) -> None:
    before = _counters(lab, "a").get("tunnel.icmp.unreachable", 0)
    res = _ping(lab, "a", "-6", "fd00::dead:beef", count=1)
    assert res.returncode != 0
    assert "destination unreachable" in res.stdout.lower(), res.stdout
    lab.wait_for(  # the TUN worker reports its counters every second
        lambda: _counters(lab, "a").get("tunnel.icmp.unreachable", 0) > before,
        5,
        "tunnel.icmp.unreachable",
    )


def test_forged_inner_source_is_dropped_and_counted(lab: Lab) -> None:
    """A sends from an address it owns locally but may not use in the mesh."""
    assert lab.topo is not None
    forged = "198.18.202.1"
    lab.topo.run("a", ["ip", "addr", "add", f"{forged}/32", "dev", "mesh0"], check=True)
    try:
        before = _counters(lab, "d").get("tunnel.drop.forged_source", 0)
        res = _ping(lab, "a", "-I", forged, HOST_BEHIND_D, count=3)
        assert res.returncode != 0, res.stdout  # no reply: D dropped every request
        lab.wait_for(
            lambda: _counters(lab, "d").get("tunnel.drop.forged_source", 0) >= before + 3,
            5,
            "d to count the forged packets",
        )
    finally:
        lab.topo.run("a", ["ip", "addr", "del", f"{forged}/32", "dev", "mesh0"])
    assert _ping(lab, "a", HOST_BEHIND_D, count=1).returncode == 0  # the real source works


def test_killed_tun_worker_is_restarted_and_traffic_resumes(lab: Lab) -> None:
    def tun_worker() -> dict[str, Any] | None:
        st = lab.cli("a", "status") or {}
        workers = st.get("supervisor", {}).get("workers", [])
        return next((w for w in workers if w["role"] == "tun" and w["pid"]), None)

    old = tun_worker()
    assert old is not None
    os.kill(old["pid"], signal.SIGKILL)
    new = lab.wait_for(
        lambda: (w := tun_worker()) and w["pid"] != old["pid"] and w,
        15,
        "the supervisor to restart the TUN worker",
    )
    assert new["restarts"] >= 1
    lab.wait_for(lambda: _has_overlay_address(lab, "a"), 10, "a's TUN device again")
    dst = _ipv6(lab, "d")
    lab.wait_for(
        lambda: _ping(lab, "a", "-6", dst, count=1).returncode == 0, 15, "ping after restart"
    )
    events = [e["event"] for e in lab.log_events("a")]
    assert "worker.restarted" in events


@pytest.mark.parametrize("node", ["a", "d"])
def test_killed_crypto_worker_is_restarted_and_iperf3_continues(lab: Lab, node: str) -> None:
    """SIGKILL the crypto worker that owns the a-d session (on the sender, then on the
    receiver) in the middle of an iperf3 TCP flow: it is restarted, the session is
    handshaken again, the tunnel streams are reset and reopened, and TCP recovers."""
    assert lab.topo is not None
    peer = "d" if node == "a" else "a"

    def owner() -> dict[str, Any] | None:
        st = lab.cli(node, "status") or {}
        workers = st.get("supervisor", {}).get("workers", [])
        crypto = sorted((w for w in workers if w["role"].startswith("crypto:")), key=_role)
        k = shard_of(bytes.fromhex(lab.nodes[peer].sid), len(crypto))
        return crypto[k] if crypto and crypto[k]["pid"] else None

    old = owner()
    assert old is not None
    result = _iperf(lab, seconds=8, during=lambda: os.kill(old["pid"], signal.SIGKILL))
    intervals = [i["sum"]["bytes"] for i in result["intervals"]]
    # Bytes flowed again after the kill (the counters say why not, if they did not).
    assert sum(intervals[-2:]) > 0, (intervals, _crypto_counters(lab))
    new = lab.wait_for(lambda: (w := owner()) and w["pid"] != old["pid"] and w, 10, "restart")
    assert new["restarts"] >= old["restarts"] + 1
    assert "worker.restarted" in [e["event"] for e in lab.log_events(node)]


def _crypto_counters(lab: Lab) -> dict[str, Any]:
    out = {}
    for name in ("a", "d"):
        st = lab.cli(name, "status") or {}
        for w in st.get("workers", []):
            if w["role"] == "crypto" and w.get("sessions"):
                c = w["counters"]
                out[name] = {k: v for k, v in c.items() if k.startswith(("session.", "msp."))}
    return out


def _role(w: dict[str, Any]) -> int:
    return int(str(w["role"]).split(":")[1])
