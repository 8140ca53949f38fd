"""Fragments below the session (meshpipe/fragments.py): properties of split and join,
and sealed tunnel messages crossing sharded nodes in fragments."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from meshpipe import fragments
from meshpipe.fragments import HEADER, TYPE_FRAGMENT, Reassembler, ReassemblyParams, split
from meshpipe.identity import overlay_ipv6
from meshpipe.sim import LinkProfile
from tests.msp_sim import Line

SRC = b"s" * 32

packets = st.binary(min_size=1, max_size=3000)
rooms = st.integers(fragments.HEADER_LEN + 1, 700)


def _check_held(r: Reassembler) -> None:
    held = sum(p.size for p in r._parts.values())
    assert r.held() == held <= r.params.total


@given(packets, rooms, st.integers(0, 2**32 - 1), st.randoms(use_true_random=False))
def test_fragments_reordered_and_duplicated_join_once(
    packet: bytes, room: int, message: int, rnd: random.Random
) -> None:
    pieces = split(packet, room, message)
    assert all(len(p) <= room for p in pieces)
    if len(pieces) == 1:
        return  # fits: the sender sends the packet itself
    shuffled = pieces + rnd.sample(pieces, k=rnd.randint(0, len(pieces)))
    rnd.shuffle(shuffled)
    r = Reassembler()
    got = [j for p in shuffled if (j := r.push(SRC, p, 0.0)) is not None]
    # The first copy of each completes it; a late duplicate opens a new partial at most.
    assert got[0] == packet
    assert all(j == packet for j in got)
    _check_held(r)


@given(packets, rooms, st.data())
def test_a_lost_fragment_loses_only_its_message(
    packet: bytes, room: int, data: st.DataObject
) -> None:
    pieces = split(packet, room, 1)
    if len(pieces) == 1:
        return
    lost = data.draw(st.integers(0, len(pieces) - 1))
    r = Reassembler(ReassemblyParams(timeout=1.0))
    assert all(r.push(SRC, p, 0.0) is None for i, p in enumerate(pieces) if i != lost)
    # The next message still gets through, and the stale partial times out.
    assert [r.push(SRC, p, 2.0) for p in split(packet, room, 2)][-1] == packet
    assert r.partials() == 0 and r.held() == 0
    assert r.counters["frag.drop.timeout"] == 1


@given(st.lists(packets, min_size=1, max_size=6), rooms, st.randoms(use_true_random=False))
def test_interleaved_messages_of_several_sources_all_join(
    msgs: list[bytes], room: int, rnd: random.Random
) -> None:
    tagged = []
    for n, m in enumerate(msgs):
        src = bytes([n % 3]) * 32
        tagged += [(src, p, n) for p in split(m, room, n)]
    rnd.shuffle(tagged)
    r = Reassembler()
    done: dict[int, bytes] = {}
    for src, p, n in tagged:
        if fragments.is_fragment(p):
            j = r.push(src, p, 0.0)
            if j is not None:
                done[n] = j
        else:
            done[n] = p
    multi = {n for n, m in enumerate(msgs) if len(split(m, room, n)) > 1}
    assert {n: done[n] for n in multi} == {n: msgs[n] for n in multi}
    assert r.held() == 0


@settings(max_examples=60)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2**32 - 1), st.binary(max_size=900))))
def test_an_attackers_fragments_that_never_complete_stay_bounded(
    junk: list[tuple[int, int, bytes]],
) -> None:
    params = ReassemblyParams(per_source=4000, total=20000, partials_per_source=4)
    r = Reassembler(params)
    for src_n, message, piece in junk:
        frag = HEADER.pack(TYPE_FRAGMENT, message, 0, 1000) + piece
        assert r.push(bytes([src_n]) * 32, frag, 0.0) is None
        _check_held(r)
        assert all(r.budget.held(bytes([s]) * 32) <= params.per_source for s in range(41))
        assert all(n <= params.partials_per_source for n in r._per_source.values())
    # A real peer's message still joins beside them.
    packet = random.Random(1).randbytes(3000)
    got = [r.push(SRC, p, 0.0) for p in split(packet, 1000, 7)]
    assert got[-1] == packet


@given(st.binary(max_size=64))
def test_malformed_fragments_are_counted_drops(blob: bytes) -> None:
    r = Reassembler()
    for data in (blob, bytes([TYPE_FRAGMENT]) + blob):
        r.push(SRC, data, 0.0)  # never raises
    _check_held(r)


def test_disagreeing_fragments_are_dropped() -> None:
    r = Reassembler()
    a, b, c = split(b"x" * 30, 19, 5)
    assert r.push(SRC, a, 0.0) is None
    assert r.push(SRC, struct.pack("!BIHH", TYPE_FRAGMENT, 5, 1, 4) + b"y" * 10, 0.0) is None
    assert r.counters["frag.drop.mismatch"] == 1
    assert r.push(SRC, struct.pack("!BIHH", TYPE_FRAGMENT, 5, 1, 3) + b"y" * 9, 0.0) is None
    assert r.counters["frag.drop.mismatch"] == 2
    assert r.push(SRC, b, 0.0) is None and r.push(SRC, c, 0.0) == b"x" * 30


def _ipv6(src: bytes, dst: bytes, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 64, src, dst) + payload


def _tunnel_over(line: Line, sizes: list[int], wait: float = 2.0) -> list[bytes]:
    a, d = line.sid("A"), line.sid("D")
    ip_a, ip_d = overlay_ipv6(bytes(a)).packed, overlay_ipv6(bytes(d)).packed
    sent = []
    for i, size in enumerate(sizes):
        pkt = _ipv6(ip_a, ip_d, random.Random(i).randbytes(size))
        sent.append(pkt)
        line.sim.call("A", lambda n, now, p=pkt: n.tun_in(bytes(d), p, now))
        line.sim.run_for(0.05)
    line.sim.run_for(wait)
    return sent


def test_large_tunnel_messages_are_sealed_once_and_cross_three_hops_in_fragments() -> None:
    line = Line(seed=7, shards=2, tunnel_routes=[], mtu=1400)
    line.sim.run_for(3.0)
    sent = _tunnel_over(line, [60000, 20000, 1000, 9000])
    d = line.sharded("D")
    assert d.tun_out == sent
    a_shard = line.sharded("A").shard(bytes(line.sid("D")))
    d_shard = d.shard(bytes(line.sid("A")))
    # One seal per message (a 60 kB one in one packet), many frames.
    assert a_shard.all_counters()["frag.tx.packets"] >= 3
    assert d_shard.all_counters()["frag.joined"] >= 3
    # Transit shards forwarded them unopened.
    for m in ("B", "C"):
        assert all(s.reassembler.counters["frag.rx"] == 0 for s in line.sharded(m).shards)


def test_small_mtu_path_under_loss_loses_whole_packets_only() -> None:
    profile = LinkProfile(loss=0.05, delay=0.005, jitter=0.002, duplicate=0.02, mtu=300)
    line = Line(seed=9, shards=1, tunnel_routes=[], mtu=300, profile=profile)
    line.sim.run_for(3.0)
    sent = _tunnel_over(line, [1200] * 60, wait=5.0)
    got = line.sharded("D").tun_out
    assert got and all(p in sent for p in got)  # whatever arrives is whole and exact
    assert len(got) >= 15
    shard = line.sharded("D").shard(bytes(line.sid("A")))
    assert shard.reassembler.held() <= shard.reassembler.params.total


def test_a_link_worker_joins_fragments_for_us_into_one_data_frame() -> None:
    from meshpipe import wire
    from meshpipe.fragments import join_frame

    me, peer = b"m" * 32, b"p" * 32
    packet = random.Random(3).randbytes(5000)
    frames = [wire.encode_data(me, peer, f, 60) for f in split(packet, 1334, 4)]
    r = Reassembler()
    got = [join_frame(r, f, me, 0.0) for f in frames]
    assert got[:-1] == [None] * (len(frames) - 1)
    assert got[-1] == wire.encode_data(me, peer, packet, 60)
    other = wire.encode_data(b"o" * 32, peer, split(packet, 1334, 5)[0])
    assert join_frame(r, other, me, 0.0) == other  # in transit: never joined here
