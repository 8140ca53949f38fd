"""The metric families of workers/metrics.py, without a node: names, labels, values, and
the text format as `promtool check metrics` (Debian's prometheus package) sees it."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from meshpipe_workers.metrics import PSS_MAX_AGE, MemoryReader, families, role_labels

PEER = "ab" * 32


def snap() -> dict[str, Any]:
    return {
        "sid": "cd" * 32,
        "name": "a",
        "version": "0.1.0",
        "uptime_s": 12.5,
        "workers": [
            {
                "role": "control",
                "worker": 0,
                "iface": "",
                "counters": {"hello.tx": 7},
                "queues": {},
            },
            {
                "role": "interface",
                "worker": 0,
                "iface": "udp0",
                "counters": {"tx.gso_sends": 3},
                "queues": {"rx": [128, 2], "crypto": [0, 0]},
            },
            {
                "role": "crypto",
                "worker": 1,
                "iface": "",
                "counters": {"session.handshake.restart_probe": 1},
                "queues": {"in": [64, 0]},
                "sessions": 2,
                "tunnel_peers": 1,
            },
        ],
        "neighbours": [
            {
                "peer": PEER,
                "iface": "udp0",
                "loss_in": 0.1,
                "loss_out": 0.0,
                "rtt_s": 0.002,
                "cost": 300,
            }
        ],
        "routes": [{"peer": PEER, "iface": "udp0", "hops": 1, "metric": 300}],
        "streams": {"reliable": 2},
        "services_local": 1,
        "services_known": 3,
        "supervisor": {
            "pid": 10,
            "workers": [
                {"role": "control", "pid": 11, "restarts": 0},
                {"role": "interface:udp0:0", "pid": 12, "restarts": 2},
                {"role": "crypto:1", "pid": None, "restarts": 1},
            ],
        },
    }


class Fixed(Collector):
    def __init__(self, fams: list[Metric]) -> None:
        self.fams = fams

    def collect(self) -> Iterable[Metric]:
        return self.fams


def exposition(s: dict[str, Any]) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Fixed(families(s, lambda pid: (pid * 1000, pid * 500))))
    return generate_latest(reg)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for smp in fam.samples:
            out[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value
    return out


def test_families_carry_the_documented_names_and_labels() -> None:
    got = samples(exposition(snap()))
    assert got[("meshpipe_neighbours", ())] == 1
    assert got[("meshpipe_routes", ())] == 1
    nb = (("iface", "udp0"), ("peer", PEER))
    assert got[("meshpipe_neighbour_loss_in_ratio", nb)] == pytest.approx(0.1)
    assert got[("meshpipe_neighbour_rtt_seconds", nb)] == pytest.approx(0.002)
    assert got[("meshpipe_neighbour_cost", nb)] == 300
    assert got[("meshpipe_route_hops", nb)] == 1
    ifw = (("iface", "udp0"), ("role", "interface"), ("worker", "0"))
    assert got[("meshpipe_events_total", (*ifw[:1], ("name", "tx.gso_sends"), *ifw[1:]))] == 3
    assert got[("meshpipe_queue_depth_bytes", (*ifw[:1], ("queue", "rx"), *ifw[1:]))] == 128
    assert got[("meshpipe_queue_dropped_total", (*ifw[:1], ("queue", "rx"), *ifw[1:]))] == 2
    cw = (("iface", ""), ("role", "crypto"), ("worker", "1"))
    assert got[("meshpipe_sessions", cw)] == 2
    assert got[("meshpipe_streams", (("mode", "reliable"),))] == 2
    assert got[("meshpipe_streams", (("mode", "datagram"),))] == 0
    assert got[("meshpipe_worker_restarts_total", ifw)] == 2
    assert got[("meshpipe_worker_rss_bytes", ifw)] == 12000
    assert got[("meshpipe_worker_pss_bytes", ifw)] == 6000
    assert got[("meshpipe_worker_up", cw)] == 0  # waiting for its restart: no pid
    sup = (("iface", ""), ("role", "supervisor"), ("worker", "0"))
    assert got[("meshpipe_worker_up", sup)] == 1
    assert all(name.startswith("meshpipe_") for name, _ in got)


def test_promtool_accepts_the_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing (Debian prometheus is in the Makefile's DEB_TEST)")
        pytest.skip("promtool not installed")
    text = exposition(snap())
    assert (
        b"# HELP meshpipe_neighbours " in text and b"# TYPE meshpipe_events_total counter" in text
    )
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_an_empty_node_still_exposes_every_family() -> None:
    s = snap()
    s.update(workers=[], neighbours=[], routes=[], streams={}, supervisor={})
    got = samples(exposition(s))
    assert got[("meshpipe_neighbours", ())] == 0 and got[("meshpipe_routes", ())] == 0


def test_role_labels_and_memory() -> None:
    assert role_labels("interface:udp0:1") == ["interface", "1", "udp0"]
    assert role_labels("radio:r0") == ["radio", "0", "r0"]
    assert role_labels("crypto:3") == ["crypto", "3", ""]
    assert role_labels("control") == ["control", "0", ""]
    now = [0.0]
    reader = MemoryReader(lambda: now[0])
    mem = reader(os.getpid())
    assert mem is not None and mem[0] > 1 << 20 and 0 < mem[1] <= mem[0] * 1.01
    assert reader(os.getpid())[1] == mem[1]  # type: ignore[index]  # PSS cached
    now[0] = PSS_MAX_AGE + 1.0  # past the cache age, whatever the comparison
    # A fresh anonymous mapping, touched: 16 MiB more of both (a bytearray could reuse
    # heap pages an earlier test left resident, and then PSS would not move)
    big = mmap.mmap(-1, 16 << 20)
    for off in range(0, len(big), mmap.PAGESIZE):
        big[off] = 1
    later = reader(os.getpid())
    assert later is not None and later[1] > mem[1] + (8 << 20)
    assert reader(2**22 + 12345) is None
    reader.forget_except(set())
    assert reader.pss == {}
