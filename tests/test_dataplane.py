"""Crypto shards (meshpipe/dataplane.py): sessions sharded by peer, wired as the
worker processes are, in the simulator."""

from __future__ import annotations

import collections
import hashlib
import ipaddress
import random
import struct

import pytest

from meshpipe.actions import BROADCAST, SendFrame
from meshpipe.dataplane import CryptoShard, ShardedNode, shard_of
from meshpipe.identity import Identity, overlay_ipv6
from meshpipe.msp import DATAPLANE_SPACE, StreamAccepted, StreamClosed, in_dataplane
from meshpipe.msp.wire import encode_rst
from meshpipe.node import InterfaceParams
from meshpipe.sim import LinkProfile
from tests.msp_sim import Line

MB = 1 << 20


def ipv6_packet(src: bytes, dst: bytes, payload: bytes) -> bytes:
    """A minimal IPv6/UDP-ish packet (next header 17) the tunnel can parse."""
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 64, src, dst) + payload


def test_shard_of_is_stable_and_spreads_sids() -> None:
    sids = [Identity.from_seed(bytes([i]) * 32).sid for i in range(200)]
    counts = collections.Counter(shard_of(bytes(s), 4) for s in sids)
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 25
    assert all(shard_of(bytes(s), 1) == 0 for s in sids)
    assert shard_of(bytes(sids[0]), 4) == shard_of(bytes(sids[0]), 4)


def test_dataplane_bit_marks_only_data_plane_streams() -> None:
    assert in_dataplane(encode_rst(DATAPLANE_SPACE | 5, 0))
    assert not in_dataplane(encode_rst(5, 0))
    assert not in_dataplane(b"\x02")


@pytest.mark.parametrize("shards", [1, 3])
def test_stream_and_ping_over_sharded_nodes_under_loss(shards: int) -> None:
    profile = LinkProfile(loss=0.05, delay=0.005, jitter=0.002, duplicate=0.01, mtu=1400)
    line = Line(seed=3, shards=shards, profile=profile)
    data = random.Random(2).randbytes(1 * MB)
    line.msp("D").listen(9)
    st = line.open("A", "D", 9)
    got: list[bytes] = []
    accepted = []
    sent = 0
    start = line.now
    while not (accepted and accepted[0].eof):
        assert line.now - start < 300
        if sent < len(data):
            line.act("A", lambda n, now: None)
            sent += st.write(data[sent : sent + 65536], line.now)
            if sent == len(data):
                st.shutdown(line.now)
            line.act("A", lambda n, now: None)
        line.sim.run_for(0.02)
        for ev in line.msp("D").events():
            if isinstance(ev, StreamAccepted):
                accepted.append(ev.stream)
        for s in accepted:
            chunk = s.read()
            if chunk:
                got.append(chunk)
    assert hashlib.sha256(b"".join(got)).digest() == hashlib.sha256(data).digest()
    # Every session has exactly one owner: the shard of the peer's SID.
    a = line.sharded("A")
    owners = [i for i, s in enumerate(a.shards) if s.sessions(line.now)]
    assert owners == [shard_of(bytes(line.sid("D")), shards)]
    assert line.stack("A").sessions() == []  # the control side holds no keys


def test_tunnel_packets_cross_sharded_nodes_and_forged_sources_drop() -> None:
    line = Line(seed=5, shards=2, tunnel_routes=[])
    a, d = line.sharded("A"), line.sharded("D")
    src, dst = overlay_ipv6(bytes(line.sid("A"))).packed, overlay_ipv6(bytes(line.sid("D"))).packed
    for i in range(20):
        pkt = ipv6_packet(src, dst, bytes([i]) * 1000)
        line.sim.call("A", lambda n, now, p=pkt: n.tun_in(bytes(line.sid("D")), p, now))
        line.sim.run_for(0.05)
    line.sim.run_for(1.0)
    assert len(d.tun_out) == 20 and d.tun_out[3] == ipv6_packet(src, dst, bytes([3]) * 1000)
    # The packets rode a data-plane stream: the control side's MSP never saw them.
    assert line.stack("D").msp.streams() == []
    forged = ipv6_packet(ipaddress.IPv6Address("fd00::99").packed, dst, b"x" * 100)
    line.sim.call("A", lambda n, now: n.tun_in(bytes(line.sid("D")), forged, now))
    line.sim.run_for(0.5)
    assert len(d.tun_out) == 20
    owner = d.shard(bytes(line.sid("A")))
    assert owner.all_counters()["tunnel.drop.forged_source"] == 1
    assert a.shard(bytes(line.sid("D"))).tunnel_streams


def test_a_restarted_shard_recovers_the_tunnel() -> None:
    """A crypto worker killed and restarted loses its sessions and streams; the peer's
    stream is reset and both sides handshake again."""
    line = Line(seed=6, shards=2, tunnel_routes=[])
    a, d = line.sharded("A"), line.sharded("D")
    sa, sd = bytes(line.sid("A")), bytes(line.sid("D"))
    ip_a, ip_d = overlay_ipv6(sa).packed, overlay_ipv6(sd).packed

    def exchange(tag: int) -> None:
        line.sim.call("A", lambda n, now: n.tun_in(sd, ipv6_packet(ip_a, ip_d, bytes([tag])), now))
        line.sim.call("D", lambda n, now: n.tun_in(sa, ipv6_packet(ip_d, ip_a, bytes([tag])), now))
        line.sim.run_for(0.2)

    exchange(1)
    assert len(a.tun_out) == 1 and len(d.tun_out) == 1
    k = shard_of(sd, 2)
    old = a.shards[k]
    fresh = CryptoShard(
        Identity.from_seed(b"6-A".ljust(32, b".")),
        [1400],
        line.now,
        rng=random.Random(9),
        epoch_ns=10**19,  # a later process start: greater handshake timestamps
        tunnel_routes=[],
    )
    fresh.set_forwarding(
        {dst: (hop[0], hop[1], 1400) for dst, hop in old.fwd.table.items()}, full=True
    )
    a.shards[k] = fresh
    for i in range(2, 8):
        exchange(i)
    line.sim.run_for(2.0)
    exchange(9)
    assert a.tun_out[-1][-1:] == b"\x09" and d.tun_out[-1][-1:] == b"\x09"
    closed = [ev for ev in line.msp("D").events() if isinstance(ev, StreamClosed)]
    assert closed == []  # the reset hit D's data-plane stream, not the control side's


def test_transit_frames_are_forwarded_by_a_shard_without_opening() -> None:
    ident = Identity.from_seed(b"b" * 32)
    shard = CryptoShard(ident, [1400, 1400], 0.0)
    other, far = Identity.from_seed(b"x" * 32).sid, Identity.from_seed(b"y" * 32).sid
    shard.set_forwarding({bytes(far): (1, ("198.18.1.2", 7000), 1400)}, full=True)
    from meshpipe import wire

    frame = wire.encode_data(bytes(far), bytes(other), b"\x03" + b"z" * 200, 10)
    out = shard.on_frame(frame, 0.0)
    assert out == [SendFrame(1, ("198.18.1.2", 7000), wire.with_hop_limit(frame, 9))]
    assert shard.on_frame(b"\x31junk", 0.0) == []
    assert shard.counters["drop.malformed"] == 1
    assert shard.sessions(0.0) == []


def test_sharded_node_speaks_the_simulator_protocol() -> None:
    node = ShardedNode(
        Identity.from_seed(b"q" * 32), [InterfaceParams("sim", 1400, BROADCAST)], shards=2
    )
    t = node.next_deadline()
    assert 0.0 <= t < 1.0
    sent = []
    while t < 1.0:  # other timers (records, recovery) may come before the first hellos
        sent += [a for a in node.on_timer(t) if isinstance(a, SendFrame)]
        t = node.next_deadline()
    assert sent  # first hellos
