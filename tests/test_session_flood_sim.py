"""A hostile node floods a node with junk handshake inits under fresh SIDs while an
honest node establishes a session through it and rekeys (ShardedNodes, simulator)."""

from __future__ import annotations

import collections
import random
import struct

from meshpipe import wire
from meshpipe.actions import BROADCAST, Action, LinkAddr, SendFrame
from meshpipe.identity import overlay_ipv6
from meshpipe.session import INIT_LEN, TYPE_INIT, SessionParams
from meshpipe.sim import LinkProfile
from tests.msp_sim import Line

RATE = 5000.0  # junk inits per second
TICK = 0.01


class Flooder:
    """A neighbour that sends ``RATE`` junk IK first messages a second to ``target``,
    each under a fresh random source SID, from ``start`` to ``stop``."""

    def __init__(self, target: bytes, start: float, stop: float, seed: int = 11) -> None:
        self.target = target
        self.start, self.stop = start, stop
        self.rng = random.Random(seed)
        self.at = start
        self.sent = 0

    def on_frame(self, iface: int, src: LinkAddr, frame: bytes, now: float) -> list[Action]:
        return []

    def on_timer(self, now: float) -> list[Action]:
        out: list[Action] = []
        while self.at <= now and self.at < self.stop:
            for _ in range(round(RATE * TICK)):
                init = bytes([TYPE_INIT]) + self.rng.randbytes(INIT_LEN - 1)
                frame = wire.encode_data(self.target, self.rng.randbytes(32), init, 64)
                out.append(SendFrame(0, BROADCAST, frame))
                self.sent += 1
            self.at += TICK
        return out

    def next_deadline(self) -> float:
        return self.at if self.at < self.stop else float("inf")


def ipv6_packet(src: bytes, dst: bytes, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), 17, 64, src, dst) + payload


def test_honest_session_and_rekeys_through_a_flood_of_junk_inits() -> None:
    params = SessionParams(rekey_after_time=5.0, reject_after_time=40.0)
    line = Line(seed=21, shards=2, tunnel_routes=[], session_params=params)
    sa, sd = bytes(line.sid("A")), bytes(line.sid("D"))
    flooder = Flooder(sd, line.now, line.now + 14.0)
    line.sim.add_node("X", flooder)
    line.sim.connect("X", "D", LinkProfile(mtu=1400))
    line.sim.run_for(1.0)  # D is under load before A says anything
    a, d = line.sharded("A"), line.sharded("D")
    ip_a, ip_d = overlay_ipv6(sa).packed, overlay_ipv6(sd).packed
    t0 = line.now
    sent = 0
    first = None
    while line.now < t0 + 12.0:
        pkt = ipv6_packet(ip_a, ip_d, b"%d" % sent)
        line.sim.call("A", lambda n, now, p=pkt: n.tun_in(sd, p, now))
        sent += 1
        line.sim.run_for(0.1)
        if first is None and d.tun_out:
            first = line.now - t0
    line.sim.run_for(1.0)
    assert flooder.sent >= 60_000
    assert first is not None and first < 1.0, first
    # Everything A sent arrived (the first packets waited for the handshake).
    assert len(d.tun_out) == sent
    dc = d.shard(sa).all_counters()
    ac = a.shard(sd).all_counters()
    assert ac["session.handshake.cookie_rx"] >= 1
    assert dc["session.handshake.cookie_ok"] >= 1
    assert ac["session.rekeyed"] + dc["session.rekeyed"] >= 2
    assert ac["session.expired"] == 0
    total: collections.Counter[str] = collections.Counter()
    for s in d.shards:
        total.update(s.all_counters())
    assert total["session.drop.cookie_required"] > 50_000
    assert total["session.drop.cookie_unroutable"] > 50_000
    assert total["session.handshake.cookie_tx"] <= 5  # only to A, who is routable
    assert total["session.under_load"] >= 2  # every shard
    # Memory stays under the caps: no peer, no handshake state for junk.
    for s in d.shards:
        sm = s.session
        assert len(sm._buckets) <= params.max_rate_sources
        assert sm.handshakes_in_progress() == 0
        assert len(sm._peers) <= 1
