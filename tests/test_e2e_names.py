"""Names and topology with real processes across A-B-C-D: DNS, resolve, ping by name.

A runs the DNS responder on port 53 of its namespace's own loopback, and its
namespace's resolver points at it (``/etc/netns/NS/resolv.conf``, which ``ip netns
exec`` mounts over /etc/resolv.conf; glibc's resolv.conf cannot name a port). So
``dig``, ``getent`` and ``ping -6 d.mesh`` inside A use the mesh's names, and the
host's resolver is untouched. A and D run the tunnel.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshpipe_workers.labnet import Lab
from tests.netns import require_root

pytestmark = pytest.mark.netns

TUNNEL = '\n[tunnel]\nenabled = true\nname = "mesh0"\nmtu = 1280\n'
DNS = '\n[dns]\nlisten = "127.0.0.1:53"\n'
NAMES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    for tool in ("dig", "ping", "getent"):
        assert shutil.which(tool), f"{tool} is missing (make debdeps-test)"
    with Lab(
        NAMES,
        tmp_path_factory.mktemp("names"),
        netns=True,
        node_config={"a": TUNNEL + DNS, "d": TUNNEL},
    ) as lab:
        assert lab.topo is not None
        etc = Path("/etc/netns") / lab.topo.ns("a")
        made_parent = not etc.parent.exists()
        etc.mkdir(parents=True, exist_ok=True)
        try:
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1\n")
            lab.start_all()
            lab.wait_for(lambda: (r := lab.route("a", "d")) and r["hops"] == 3, 30, "a's route")
            yield lab
        finally:
            shutil.rmtree(etc, ignore_errors=True)
            if made_parent:
                with contextlib.suppress(OSError):  # another test may be using it
                    etc.parent.rmdir()


def _ipv6(lab: Lab, name: str) -> str:
    ident = lab.cli(name, "id")
    assert ident is not None
    return str(ident["ipv6"])


def _topology(lab: Lab) -> dict[str, Any]:
    t = lab.cli("a", "topology")
    assert isinstance(t, dict)
    return t


def test_dig_resolve_and_ping_by_name(lab: Lab) -> None:
    assert lab.topo is not None
    d_ip = _ipv6(lab, "d")

    def dig(name: str, rtype: str = "AAAA") -> str:
        assert lab.topo is not None
        argv = ["dig", "@127.0.0.1", "-p", "53", "+short", "+time=2", "+tries=1", name, rtype]
        return str(lab.topo.run("a", argv, timeout=20).stdout.strip())

    # d's record crosses 3 hops after its neighbours are up.
    lab.wait_for(lambda: dig("d.mesh") == d_ip, 30, "dig d.mesh AAAA to answer D's address")
    d_sid = lab.nodes["d"].sid
    assert dig(f"{d_sid[:16]}.mesh") == d_ip
    assert dig(f"d.{d_sid[:16]}.mesh") == d_ip
    rev = lab.topo.run("a", ["dig", "@127.0.0.1", "+short", "-x", d_ip], timeout=20).stdout
    assert rev.strip() == f"d.{d_sid[:16]}.mesh.", rev
    nx = lab.topo.run("a", ["dig", "@127.0.0.1", "nobody.mesh", "AAAA"], timeout=20).stdout
    assert "status: NXDOMAIN" in nx, nx

    found = lab.cli("a", "resolve", "d")
    assert found and found[0]["sid"] == d_sid and found[0]["ipv6"] == d_ip
    assert found[0]["hops"] == 3

    got = lab.topo.run("a", ["getent", "ahostsv6", "d.mesh"], timeout=20)
    assert d_ip in got.stdout, got.stdout + got.stderr
    lab.wait_for(lambda: _tun_ready(lab), 15, "the TUN devices")
    res = lab.topo.run("a", ["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", "d.mesh"], timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    assert d_ip in res.stdout, res.stdout
    st = lab.cli("a", "status")
    assert st["counters"].get("dns.answer", 0) >= 4


def _tun_ready(lab: Lab) -> bool:
    assert lab.topo is not None
    for name in ("a", "d"):
        out = lab.topo.run(name, ["ip", "-6", "addr", "show", "dev", "mesh0"]).stdout
        if _ipv6(lab, name) not in out:
            return False
    return True


def test_topology_lists_the_line_then_forgets_a_stopped_node(lab: Lab) -> None:
    sids = {n: lab.nodes[n].sid for n in NAMES}

    def full() -> bool:
        t = _topology(lab)
        return len(t["nodes"]) == 4 and len(t["links"]) == 3

    lab.wait_for(full, 30, "a's topology to list 4 nodes and 3 links")
    t = _topology(lab)
    assert {(n["sid"], n["name"]) for n in t["nodes"]} == {(sids[n], n) for n in NAMES}
    pairs = {frozenset((lk["a"], lk["b"])) for lk in t["links"]}
    assert pairs == {frozenset((sids[x], sids[y])) for x, y in (("a", "b"), ("b", "c"), ("c", "d"))}
    assert all(lk["cost"] > 0 for lk in t["links"])
    dot = lab.run("a", "topology", "--dot").stdout
    assert dot.startswith("graph mesh {") and dot.count(" -- ") == 3, dot

    lab.stop("c")
    start = time.monotonic()

    def c_gone() -> bool:
        t = _topology(lab)
        nodes = {n["sid"] for n in t["nodes"]}
        ends = {e for lk in t["links"] for e in (lk["a"], lk["b"])}
        return sids["c"] not in nodes and sids["c"] not in ends

    lab.wait_for(c_gone, 30, "c and its links to leave a's topology")
    took = time.monotonic() - start
    print(f"c left a's topology {took:.1f} s after it stopped")
    assert took < 30
