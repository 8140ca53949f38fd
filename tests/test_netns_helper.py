"""tests.netns: a 4-node line A-B-C-D of network namespaces, built and torn down."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys

import pytest

from tests.netns import (
    LOCK_DIR,
    UNDERLAY,
    Topology,
    cleanup_stale,
    default_prefix,
    line_topology,
    list_namespaces,
    require_root,
)

pytestmark = pytest.mark.netns

NAMES = ["a", "b", "c", "d"]
PORT = 7999

# A one-shot UDP echo server: prints "ready" once bound, echoes one datagram.
ECHO_SERVER = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.bind((sys.argv[1],int(sys.argv[2])))\n"
    "s.settimeout(20)\n"
    "print('ready',flush=True)\n"
    "data,peer=s.recvfrom(2048)\n"
    "s.sendto(data,peer)\n"
)
ECHO_CLIENT = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "s.settimeout(5)\n"
    "s.sendto(b'meshpipe-echo',(sys.argv[1],int(sys.argv[2])))\n"
    "data,peer=s.recvfrom(2048)\n"
    "print(data.decode(),peer[0])\n"
)
# Connecting a UDP socket needs a route; fails at once without one.
ROUTE_PROBE = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "try:\n"
    "    s.connect((sys.argv[1],9))\n"
    "except OSError as e:\n"
    "    print('unreachable',e.errno)\n"
    "else:\n"
    "    print('reachable')\n"
)


def _ours(prefix: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(prefix + "-")]


@pytest.fixture
def prefix() -> str:
    require_root()
    return default_prefix()


def test_line_of_four(prefix: str) -> None:
    with line_topology(NAMES, prefix) as topo:
        assert sorted(_ours(prefix)) == sorted(f"{prefix}-{n}" for n in NAMES)
        assert topo.ns("b") == f"{prefix}-b"
        assert topo.addresses("a") == ["198.18.1.1"]
        assert topo.addresses("b") == ["198.18.1.2", "198.18.2.1"]
        assert topo.addresses("c") == ["198.18.2.2", "198.18.3.1"]
        assert topo.addresses("d") == ["198.18.3.2"]
        assert topo.address_towards("c", "b") == "198.18.2.2"

        # What the kernel has configured matches, and only 198.18.0.0/15 and loopback.
        for name in NAMES:
            res = topo.run(name, ["ip", "-o", "-4", "addr", "show"], timeout=10)
            assert res.returncode == 0, res.stderr
            addrs = [line.split()[3].split("/")[0] for line in res.stdout.splitlines()]
            assert "127.0.0.1" in addrs
            underlay = sorted(a for a in addrs if a != "127.0.0.1")
            assert underlay == sorted(topo.addresses(name))
            assert all(ipaddress.ip_address(a) in UNDERLAY for a in underlay)

        # UDP echo across the B-C veth link.
        server = topo.exec(
            "c",
            [sys.executable, "-c", ECHO_SERVER, "198.18.2.2", str(PORT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        res = topo.run(
            "b", [sys.executable, "-c", ECHO_CLIENT, "198.18.2.2", str(PORT)], timeout=15
        )
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["meshpipe-echo", "198.18.2.2"]
        assert server.wait(10) == 0

        # Namespaces are isolated: A has no route to C without an overlay.
        res = topo.run("a", [sys.executable, "-c", ROUTE_PROBE, "198.18.2.2"], timeout=10)
        assert res.stdout.startswith("unreachable"), res.stdout + res.stderr

    assert _ours(prefix) == []


def test_teardown_on_error_kills_processes(prefix: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), line_topology(NAMES, prefix) as topo:
        sleeper = topo.exec("d", ["sleep", "600"])
        assert _ours(prefix)
        raise RuntimeError("boom")
    assert _ours(prefix) == []
    assert sleeper.poll() is not None


def test_stale_namespaces_are_removed(prefix: str) -> None:
    # A leftover of a "crashed run": a prefix no live process holds (pid digits
    # that are not a live process: pid_max is at most 2**22), with a process still
    # running inside it. And a namespace outside our name pattern, never touched.
    stale = f"mp{2**22 + os.getpid()}-x"
    foreign = f"meshpipe-keep-{os.getpid()}"
    leftover: subprocess.Popen[bytes] | None = None
    try:
        for ns in (stale, foreign):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        leftover = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"])
        assert stale in cleanup_stale()
        assert stale not in list_namespaces()
        assert foreign in list_namespaces()
        assert leftover.wait(5) != 0  # killed by the cleanup
    finally:
        if leftover is not None and leftover.poll() is None:
            leftover.kill()
            leftover.wait()
        for ns in (stale, foreign):
            if ns in list_namespaces():
                subprocess.run(["ip", "netns", "del", ns], check=False)
        # The lock file the cleanup made for the made-up prefix (no process can own it).
        (LOCK_DIR / f"{stale.split('-')[0]}.lock").unlink(missing_ok=True)


def test_live_prefix_is_not_removed(prefix: str) -> None:
    with line_topology(["x", "y"], prefix):
        assert cleanup_stale() == []
        assert len(_ours(prefix)) == 2
    assert _ours(prefix) == []


@pytest.mark.parametrize(
    ("names", "bad_prefix"),
    [(["a", "a"], None), ([], None), (["a b"], None), (["a"], "other")],
)
def test_rejects_bad_arguments(names: list[str], bad_prefix: str | None) -> None:
    with pytest.raises(ValueError), line_topology(names, bad_prefix or default_prefix()):
        pass


def _pings(topo: Topology, src: str, dst_addr: str, count: int) -> int:
    """How many of ``count`` quick pings from ``src`` to ``dst_addr`` got a reply."""
    res = topo.run(
        src, ["ping", "-n", "-q", "-c", str(count), "-i", "0.01", "-W", "1", dst_addr], timeout=30
    )
    m = re.search(r"(\d+) received", res.stdout)
    assert m is not None, res.stdout + res.stderr
    return int(m.group(1))


def test_kernel_loss_rules(prefix: str) -> None:
    with line_topology(["a", "b", "c"], prefix) as topo:
        b_addr = topo.address_towards("b", "a")
        assert _pings(topo, "a", b_addr, 5) == 5
        # All of a's sent frames on its link to b are dropped, and counted.
        topo.set_loss("a", 100, peer="b", directions=["out"])
        assert _pings(topo, "a", b_addr, 5) == 0
        assert topo.loss_drops("a")[("veth1", "out")] >= 5
        # Requests lost on b's way in from a (ARP may add a drop or two).
        topo.set_loss("a", 0, peer="b")
        topo.set_loss("b", 100, peer="a", directions=["in"])
        assert _pings(topo, "a", b_addr, 3) == 0
        drops = topo.loss_drops("b")
        assert list(drops) == [("veth1", "in")] and drops[("veth1", "in")] >= 3
        # Partial loss drops some, not all; clear_loss removes every rule.
        topo.set_loss("b", 50, peer="a", directions=["in"])
        got = _pings(topo, "a", b_addr, 100)
        assert 15 < got < 85
        topo.clear_loss()
        assert topo.loss_drops("b") == {}
        assert _pings(topo, "a", b_addr, 5) == 5
        with pytest.raises(ValueError):
            topo.set_loss("a", 101)
        with pytest.raises(ValueError):
            topo.set_loss("a", 10, directions=["sideways"])
        with pytest.raises(KeyError):
            topo.set_loss("a", 10, peer="c")


def test_disable_offloads(prefix: str) -> None:
    with line_topology(["a", "b", "c"], prefix) as topo:
        topo.disable_offloads()
        for name in ("a", "b", "c"):
            for link in topo.links_of(name):
                out = topo.run(name, ["ethtool", "-k", link.ifname], timeout=10).stdout
                for feature in (
                    "generic-segmentation-offload",
                    "tcp-segmentation-offload",
                    "generic-receive-offload",
                ):
                    assert re.search(rf"^{feature}: off", out, re.M), (name, feature, out)
