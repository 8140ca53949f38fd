"""meshpipe.session: managers back to back over a tiny fake network."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpipe.actions import Event
from meshpipe.identity import Identity, Sid
from meshpipe.session import (
    COOKIE_LEN,
    INIT_EXT_LEN,
    INIT_LEN,
    PROLOGUE,
    RESP_LEN,
    TRANSPORT_OVERHEAD,
    TYPE_COOKIE,
    TYPE_INIT,
    TYPE_RESP,
    TYPE_TRANSPORT,
    Plaintext,
    SessionManager,
    SessionOut,
    SessionParams,
    Transmit,
)

EPOCH = 1_700_000_000 * 10**9

# (src name, dst name, payload) -> payload to deliver, or None to drop
Tap = Callable[[str, str, bytes], bytes | None]


def ident(name: str) -> Identity:
    return Identity.from_seed(name.encode().ljust(32, b"."))


class Net:
    """Session managers joined by a fake network with a fixed one-way delay."""

    def __init__(
        self,
        names: tuple[str, ...] = ("a", "b"),
        params: SessionParams | None = None,
        delay: float = 0.01,
        jitter: float = 0.0,
        seed: int = 1,
        routable: Callable[[bytes], bool] | None = None,
    ) -> None:
        self.params = params or SessionParams()
        self.routable = routable
        self.delay = delay
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.now = 0.0
        self.ids = {n: ident(n) for n in names}
        self.by_sid = {bytes(i.sid): n for n, i in self.ids.items()}
        self.m: dict[str, SessionManager] = {}
        self.received: dict[str, list[tuple[str, bytes]]] = {n: [] for n in names}
        self.events: dict[str, list[Event]] = {n: [] for n in names}
        self.wire: list[
            tuple[str, str, bytes, float]
        ] = []  # every packet sent: src, dst, payload, t
        self.tap: Tap | None = None
        self.nowhere: list[Transmit] = []  # sent to SIDs of no node in the net
        self._heap: list[tuple[float, int, str, bytes, bytes]] = []
        self._seq = itertools.count()
        for n in names:
            self.start(n, EPOCH)

    def start(self, name: str, epoch_ns: int) -> None:
        """(Re)start a node: a fresh manager with the same identity."""
        self.m[name] = SessionManager(
            self.ids[name],
            self.now,
            random.Random(f"{name}{epoch_ns}"),
            epoch_ns,
            self.params,
            random_bytes=self.rng.randbytes,
            routable=self.routable,
        )

    def sid(self, name: str) -> Sid:
        return self.ids[name].sid

    def handle(self, name: str, outs: list[SessionOut]) -> None:
        for o in outs:
            if isinstance(o, Transmit):
                if bytes(o.dst) not in self.by_sid:  # a SID nobody here owns
                    self.nowhere.append(o)
                    continue
                dst = self.by_sid[bytes(o.dst)]
                self.wire.append((name, dst, o.payload, self.now))
                payload: bytes | None = o.payload
                if self.tap is not None:
                    payload = self.tap(name, dst, o.payload)
                if payload is None:
                    continue
                t = self.now + self.delay + self.rng.random() * self.jitter
                heapq.heappush(
                    self._heap, (t, next(self._seq), dst, bytes(self.sid(name)), payload)
                )
            elif isinstance(o, Plaintext):
                self.received[name].append((self.by_sid[bytes(o.src)], o.payload))
            else:
                assert isinstance(o, Event)
                self.events[name].append(o)

    def send(self, src: str, dst: str, data: bytes) -> None:
        self.handle(src, self.m[src].send(self.sid(dst), data, self.now))

    def deliver(
        self, dst: str, src_sid: bytes, payload: bytes, ingress: object = None
    ) -> list[SessionOut]:
        """Hand a packet to ``dst`` now, as if from ``src_sid`` (by ``ingress``)."""
        outs = self.m[dst].on_packet(src_sid, payload, self.now, ingress)
        self.handle(dst, outs)
        return outs

    def run_until(self, t: float) -> None:
        while True:
            nxt_pkt = self._heap[0][0] if self._heap else math.inf
            name, nxt_tmr = min(
                ((n, m.next_deadline()) for n, m in self.m.items()), key=lambda x: x[1]
            )
            nxt = min(nxt_pkt, nxt_tmr)
            if nxt > t:
                break
            assert nxt >= self.now - 1e-9
            self.now = max(self.now, nxt)
            if nxt_pkt <= nxt_tmr:
                _, _, dst, src, payload = heapq.heappop(self._heap)
                self.handle(dst, self.m[dst].on_packet(src, payload, self.now))
            else:
                before = nxt_tmr
                self.handle(name, self.m[name].on_timer(self.now))
                assert self.m[name].next_deadline() > before, "timer did not advance"
        self.now = t

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def c(self, name: str, key: str) -> int:
        return self.m[name].counters[key]

    def drops(self, name: str) -> dict[str, int]:
        return {k: v for k, v in self.m[name].counters.items() if ".drop." in k and v}

    def payloads(self, name: str, kind: int) -> list[tuple[str, str, bytes, float]]:
        return [w for w in self.wire if w[2][0] == kind and w[0] == name]


def hold(into: list[bytes], pred: Callable[[str, str, bytes], bool] | None = None) -> Tap:
    """A tap that takes matching packets off the wire into ``into``."""

    def tap(src: str, dst: str, payload: bytes) -> bytes | None:
        if pred is None or pred(src, dst, payload):
            into.append(payload)
            return None
        return payload

    return tap


def established(net: Net) -> Net:
    net.send("a", "b", b"hello")
    net.run_for(1.0)
    assert net.received["b"] == [("a", b"hello")]
    return net


# ---------------------------------------------------------------- basics


def test_handshake_and_data_both_ways() -> None:
    net = Net()
    net.send("a", "b", b"hello")
    assert net.m["a"].sessions()[0]["state"] == "handshaking"
    net.run_for(1.0)
    assert net.received["b"] == [("a", b"hello")]
    net.send("b", "a", b"world")
    net.send("a", "b", b"")  # an empty payload is a keepalive, never delivered
    net.send("a", "b", b"again")
    net.run_for(1.0)
    assert net.received["a"] == [("b", b"world")]
    assert net.received["b"] == [("a", b"hello"), ("a", b"again")]
    assert [e.name for e in net.events["a"]] == ["session.established"]
    assert [e.name for e in net.events["b"]] == ["session.established"]
    assert net.events["a"][0].fields == {"peer": net.sid("b").short, "initiator": True}
    # Wire sizes: init 113, resp 57, transport = 29 + plaintext.
    inits, resps = net.payloads("a", TYPE_INIT), net.payloads("b", TYPE_RESP)
    assert [len(w[2]) for w in inits] == [INIT_LEN] == [113]
    assert [len(w[2]) for w in resps] == [RESP_LEN] == [57]
    data = [w for w in net.payloads("a", TYPE_TRANSPORT) if len(w[2]) > TRANSPORT_OVERHEAD]
    assert len(data[0][2]) == TRANSPORT_OVERHEAD + len(b"hello")
    assert all(not d for d in (net.drops("a"), net.drops("b")))
    for who, peer, init in (("a", "b", True), ("b", "a", False)):
        (row,) = net.m[who].sessions()
        assert row["peer"] == str(net.sid(peer))
        assert row["state"] == "established"
        assert row["initiator"] is init
        assert row["rekeys"] == 0
        assert set(row) >= {
            "peer",
            "state",
            "age_s",
            "rx_packets",
            "rx_bytes",
            "tx_packets",
            "tx_bytes",
            "last_handshake_s",
            "rekeys",
            "initiator",
        }
    assert net.m["a"].sessions()[0]["tx_packets"] == 2
    assert net.m["a"].sessions()[0]["tx_bytes"] == len(b"hello") + len(b"again")
    assert net.m["b"].sessions()[0]["rx_packets"] == 2


def test_responder_waits_for_confirmation_then_sends_queued() -> None:
    net = Net()
    net.send("a", "b", b"x")
    # Deliver only the init, then have b send before a's first transport arrives.
    net.run_until(0.011)  # init arrived at b, resp in flight
    assert net.m["b"].sessions()[0]["state"] == "confirming"
    net.send("b", "a", b"early")
    assert net.m["b"].sessions()[0]["queued"] == 1
    net.run_for(1.0)
    assert net.received["a"] == [("b", b"early")]
    assert net.c("b", "session.handshake.init_tx") == 0  # no second handshake needed


def test_nothing_sent_to_self_or_bad_sid() -> None:
    net = Net()
    me = net.m["a"]
    assert me.send(net.sid("a"), b"x", 0.0) == []
    assert me.send(b"\x01" * 31, b"x", 0.0) == []
    assert me.send(bytes(range(32)), b"x", 0.0) == []  # not a curve point
    assert me.counters["session.drop.bad_destination"] == 3
    assert me.send(net.sid("b"), b"x" * 140_000, 0.0) == []  # above MAX_SEALED_PLAINTEXT
    assert me.counters["session.drop.too_large"] == 1


# ---------------------------------------------------------------- attacks


def _last_data(net: Net, src: str) -> bytes:
    return [w[2] for w in net.payloads(src, TYPE_TRANSPORT) if len(w[2]) > TRANSPORT_OVERHEAD][-1]


def test_bit_flips_are_bad_tags() -> None:
    net = established(Net())
    held: list[bytes] = []
    net.tap = hold(held)
    net.send("a", "b", b"precious")
    net.tap = None
    (pkt,) = held
    a = bytes(net.sid("a"))
    flips = 0
    # Every bit of the counter and of the ciphertext+tag: the AD covers the header.
    for byte in range(5, len(pkt)):
        for bit in range(8):
            bad = bytearray(pkt)
            bad[byte] ^= 1 << bit
            assert net.deliver("b", a, bytes(bad)) == []
            flips += 1
    d = net.drops("b")
    # A flipped counter may name one already seen (caught before decryption).
    assert d.get("session.drop.replay", 0) <= 1
    assert d.get("session.drop.bad_tag", 0) + d.get("session.drop.replay", 0) == flips
    assert net.received["b"] == [("a", b"hello")]
    net.deliver("b", a, pkt)  # the genuine packet still gets through
    assert net.received["b"] == [("a", b"hello"), ("a", b"precious")]


def test_replays_are_dropped() -> None:
    net = established(Net())
    pkt = _last_data(net, "a")
    a = bytes(net.sid("a"))
    for _ in range(5):
        assert net.deliver("b", a, pkt) == []
    assert net.c("b", "session.drop.replay") == 5
    # Replayed handshake messages change nothing either.
    init = net.payloads("a", TYPE_INIT)[0][2]
    resp = net.payloads("b", TYPE_RESP)[0][2]
    assert net.deliver("b", a, init) == []
    assert net.c("b", "session.drop.replayed_init") == 1
    assert net.deliver("a", bytes(net.sid("b")), resp) == []
    assert net.c("a", "session.drop.unknown_index") == 1  # that handshake is finished
    net.send("a", "b", b"still fine")
    net.run_for(0.1)
    assert net.received["b"][-1] == ("a", b"still fine")


def test_forged_sources_are_dropped() -> None:
    net = established(Net(names=("a", "b", "c")))
    a, b, c = (bytes(net.sid(n)) for n in "abc")
    pkt = _last_data(net, "a")
    # c replays a's transport packet claiming to be c: the keys belong to a.
    assert net.deliver("b", c, pkt) == []
    assert net.c("b", "session.drop.forged_source") == 1
    # c's genuine init to b, but the DATA frame claims a as the source.
    outs = net.m["c"].send(b, b"i am a", net.now)
    (init,) = [o.payload for o in outs if isinstance(o, Transmit)]
    assert net.deliver("b", a, init) == []
    assert net.c("b", "session.drop.forged_source") == 2
    # A source that is not even a curve point.
    bad_sid = bytes(range(32))
    with pytest.raises(ValueError):
        Sid(bad_sid).x25519_public()
    assert net.deliver("b", bad_sid, init) == []
    assert net.c("b", "session.drop.forged_source") == 3
    # An init that claims to come from b itself.
    assert net.deliver("b", b, init) == []
    assert net.c("b", "session.drop.forged_source") == 4
    # A response to a's pending handshake from the wrong node.
    held: list[bytes] = []
    net.tap = hold(held, lambda s, d, p: p[0] == TYPE_RESP)
    net.send("a", "c", b"to c")
    net.run_for(0.1)
    net.tap = None
    (resp,) = held
    assert net.deliver("a", b, resp) == []
    assert net.c("a", "session.drop.forged_source") == 1
    net.deliver("a", c, resp)  # the genuine one still completes the handshake
    net.run_for(0.1)
    assert net.received["b"] == [("a", b"hello")]
    assert net.received["c"] == [("a", b"to c")]


def test_unknown_index_and_malformed() -> None:
    net = established(Net())
    a = bytes(net.sid("a"))
    pkt = bytearray(_last_data(net, "a"))
    pkt[1:5] = b"\xff\xff\xff\xfe"
    assert net.deliver("b", a, bytes(pkt)) == []
    assert net.c("b", "session.drop.unknown_index") == 1
    for junk in (b"", b"\x03" * 28, b"\x01" * 112, b"\x01" * 114, b"\x02" * 56, b"\x09abc"):
        assert net.deliver("b", a, junk) == []
    assert net.c("b", "session.drop.malformed") == 6
    assert net.m["b"].on_packet(b"short", b"\x03" * 40, net.now) == []
    assert net.c("b", "session.drop.malformed") == 7


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_fuzz_never_raises_and_never_delivers_garbage(data: st.DataObject) -> None:
    net = _FUZZ_NET
    a = bytes(net.sid("a"))
    valid = [w[2] for w in net.wire]
    kind = data.draw(st.sampled_from(["random", "typed", "mutated"]))
    if kind == "random":
        pkt = data.draw(st.binary(max_size=200))
    elif kind == "typed":
        t = data.draw(st.sampled_from([TYPE_INIT, TYPE_RESP, TYPE_TRANSPORT, TYPE_COOKIE]))
        size = data.draw(
            st.sampled_from(
                [INIT_LEN - 1, RESP_LEN - 1, INIT_EXT_LEN - 1, COOKIE_LEN - 1, 28, 29, 57, 150]
            )
        )
        pkt = bytes([t]) + data.draw(st.binary(min_size=size, max_size=size))
    else:
        base = bytearray(data.draw(st.sampled_from(valid)))
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(base) - 1))
            base[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(base) + 3))
        pkt = bytes(base[:cut]) + data.draw(st.binary(max_size=3))
    src = data.draw(st.sampled_from([a, bytes(net.sid("b")), bytes(32), b"\x07" * 33]))
    for who in ("a", "b"):
        before = len(net.received[who])
        outs = net.m[who].on_packet(src, pkt, net.now)
        # Nothing unauthenticated is ever answered or delivered; the one exception is
        # a restart probe (our own handshake init to a source we hold no keys for).
        if pkt not in valid:
            assert not any(isinstance(o, Plaintext) for o in outs), pkt
        assert all(
            not isinstance(o, Transmit) or pkt[0] == TYPE_INIT or o.payload[0] == TYPE_INIT
            for o in outs
        )
        assert len(net.received[who]) == before
        assert net.m[who].counters["session.drop.internal_error"] == 0


def _fuzz_net() -> Net:
    net = established(Net())
    net.send("b", "a", b"reply")
    net.run_for(1.0)
    return net


_FUZZ_NET = _fuzz_net()


# ---------------------------------------------------------------- rekeying


def _stream(net: Net, seconds: float, rate: float, both: bool = True) -> tuple[int, int]:
    """Send numbered packets a->b (and b->a) at ``rate`` per second."""
    n = 0
    step = 1.0 / rate
    end = net.now + seconds
    while net.now < end:
        net.send("a", "b", b"ab%d" % n)
        if both:
            net.send("b", "a", b"ba%d" % n)
        n += 1
        net.run_for(step)
    net.run_for(2.0)
    return n, n if both else 0


def test_rekey_by_count_under_continuous_traffic_loses_nothing() -> None:
    # Rekeys this frequent exceed the default init rate limit (5/s per source).
    p = SessionParams(rekey_after_messages=20, init_rate=100.0, init_burst=100.0)
    net = Net(params=p, delay=0.02)
    sent, _ = _stream(net, 20.0, 200.0)
    assert [p for _, p in net.received["b"]] == [b"ab%d" % i for i in range(sent)]
    assert [p for _, p in net.received["a"]] == [b"ba%d" % i for i in range(sent)]
    rekeys = net.c("a", "session.rekeyed")
    assert rekeys >= sent // 20 // 2, rekeys
    assert net.c("b", "session.rekeyed") == rekeys
    assert net.m["a"].sessions()[0]["rekeys"] == rekeys
    assert not net.drops("a") and not net.drops("b")
    # Crossing rekeys were settled by the SID tie-break, never a livelock.
    low, high = sorted("ab", key=lambda n: bytes(net.sid(n)))
    assert net.c(low, "session.handshake.tie_lost") == 0
    assert net.c(high, "session.handshake.tie_won") == 0


def test_rekey_by_count_one_way_with_jitter() -> None:
    net = Net(params=SessionParams(rekey_after_messages=50), delay=0.02, jitter=0.01, seed=5)
    sent, _ = _stream(net, 10.0, 300.0, both=False)
    assert sorted(p for _, p in net.received["b"]) == sorted(b"ab%d" % i for i in range(sent))
    assert net.c("a", "session.rekeyed") >= 10
    assert not net.drops("b"), net.drops("b")


def test_rekey_by_time_and_expiry() -> None:
    p = SessionParams(rekey_after_time=30.0, reject_after_time=45.0)
    net = Net(params=p)
    sent, _ = _stream(net, 200.0, 5.0)
    assert len(net.received["b"]) == sent and len(net.received["a"]) == sent
    assert net.c("a", "session.rekeyed") >= 5
    assert not net.drops("a") and not net.drops("b")
    assert net.c("a", "session.expired") == 0
    # Idle: the keys expire and are forgotten on both sides.
    net.run_for(60.0)
    assert net.c("a", "session.expired") == 1 and net.c("b", "session.expired") == 1
    assert net.m["a"].sessions() == [] and net.m["b"].sessions() == []
    assert net.m["a"].next_deadline() == math.inf
    assert net.events["a"][-1] == Event("session.expired", {"peer": net.sid("b").short})
    net.send("b", "a", b"new")
    net.run_for(1.0)
    assert net.received["a"][-1] == ("b", b"new")
    assert net.events["a"][-1].name == "session.established"


def test_previous_keys_decrypt_in_flight_packets() -> None:
    net = established(Net(params=SessionParams(rekey_after_messages=3)))
    held: list[bytes] = []
    net.tap = hold(held, lambda s, d, p: s == "b" and p[0] == TYPE_TRANSPORT)
    net.send("b", "a", b"old keys")  # held back in flight
    net.tap = None
    for i in range(4):
        net.send("a", "b", b"%d" % i)  # a hits the count and rekeys
    net.run_for(1.0)
    assert net.c("a", "session.rekeyed") == 1
    net.deliver("a", bytes(net.sid("b")), held[0])
    assert net.received["a"] == [("b", b"old keys")]


# ---------------------------------------------------------------- failures


def test_handshake_backoff_and_give_up() -> None:
    net = Net()
    net.tap = lambda s, d, p: None  # everything lost
    for i in range(70):
        net.send("a", "b", b"%d" % i)
    assert net.c("a", "session.drop.queue_full") == 70 - 64
    net.run_for(70.0)
    times = [w[3] for w in net.payloads("a", TYPE_INIT)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 1.0 <= gaps[0] <= 1.25 and 2.0 <= gaps[1] <= 2.5 and 4.0 <= gaps[2] <= 5.0
    assert all(8.0 <= g <= 10.0 for g in gaps[3:])
    assert 60.0 <= times[-1] + gaps[-1] <= 70.0
    assert net.c("a", "session.handshake.failed") == 1
    assert net.c("a", "session.drop.handshake_timeout") == 64
    assert net.events["a"][-1] == Event(
        "session.handshake_failed", {"peer": net.sid("b").short, "dropped": 64}
    )
    assert net.m["a"].sessions() == [] and net.m["a"].next_deadline() == math.inf
    net.tap = None
    net.send("a", "b", b"later")
    net.run_for(1.0)
    assert net.received["b"] == [("a", b"later")]


def test_handshake_retry_survives_lost_response() -> None:
    net = Net()
    lost: list[bytes] = []
    net.tap = hold(lost, lambda s, d, p: p[0] == TYPE_RESP and not lost)
    net.send("a", "b", b"x")
    net.run_for(3.0)
    assert net.received["b"] == [("a", b"x")]
    assert net.c("a", "session.handshake.retry") == 1


def test_crossing_inits_settle_by_sid() -> None:
    net = Net()
    net.send("a", "b", b"from a")
    net.send("b", "a", b"from b")
    net.run_for(1.0)
    assert net.received["a"] == [("b", b"from b")]
    assert net.received["b"] == [("a", b"from a")]
    low, high = sorted("ab", key=lambda n: bytes(net.sid(n)))
    assert net.c(low, "session.handshake.tie_won") == 1
    assert net.c(high, "session.handshake.tie_lost") == 1
    assert net.c(low, "session.established") == 1 and net.c(high, "session.established") == 1
    assert net.m[low].sessions()[0]["initiator"] is True
    assert not net.drops("a") and not net.drops("b")


def test_keepalive_keeps_silence_detector_quiet() -> None:
    net = established(Net())
    for _ in range(6):  # a sends every 5 s, b never has data to send
        net.send("a", "b", b"tick")
        net.run_for(5.0)
    assert net.c("b", "session.keepalive.tx") >= 2
    assert net.c("a", "session.peer_silent") == 0
    assert net.c("a", "session.handshake.init_tx") == 1


def test_restarted_peer_handshakes_when_old_keys_reach_it() -> None:
    net = established(Net())
    net.run_for(12.0)  # b's keepalive has told a it is alive
    assert net.c("b", "session.keepalive.tx") == 1
    net.start("b", EPOCH + 10**12)  # b restarts and forgets its keys
    t0 = net.now
    net.send("a", "b", b"lost")
    net.run_for(1.0)
    assert net.c("b", "session.drop.unknown_index") == 1
    # b knows it lost keys a still uses: it handshakes at once (restart probe).
    assert net.c("b", "session.handshake.restart_probe") == 1
    inits = [w[3] for w in net.payloads("b", TYPE_INIT) if w[3] >= t0]
    assert inits and inits[0] - t0 < 0.1
    net.send("a", "b", b"back")
    net.run_for(0.1)
    assert net.received["b"][-1] == ("a", b"back")
    assert net.c("a", "session.peer_silent") == 0
    # More stale packets within rekey_timeout start no second probe.
    net.start("b", EPOCH + 2 * 10**12)
    for _ in range(3):
        net.send("a", "b", b"x")
    net.run_for(0.5)
    assert net.c("b", "session.handshake.restart_probe") == 1


def test_restart_detected_by_silence() -> None:
    """If the restarted side never hears the peer's packets (so no restart probe),
    the peer's own liveness timer still handshakes after keepalive + rekey timeout."""
    net = established(Net())
    net.run_for(12.0)
    net.start("b", EPOCH + 10**12)
    net.m["b"]._restart_probe = lambda src, now, out: None  # type: ignore[method-assign]
    net.send("a", "b", b"lost")
    t0 = net.now
    net.run_for(1.0)
    assert net.c("b", "session.drop.unknown_index") == 1
    net.run_for(15.0)
    assert net.c("a", "session.peer_silent") == 1
    inits = [w[3] for w in net.payloads("a", TYPE_INIT) if w[3] > t0]
    assert inits and inits[0] - t0 == pytest.approx(15.0)
    net.send("a", "b", b"back")
    net.run_for(0.1)
    assert net.received["b"][-1] == ("a", b"back")


def test_restarted_peer_init_replaces_session_at_once() -> None:
    net = established(Net())
    old_init = net.payloads("a", TYPE_INIT)[0][2]
    net.run_for(1.0)
    net.start("a", EPOCH + 10**12)  # a restarts; b still holds the old session
    net.send("a", "b", b"i am back")
    net.run_for(0.05)  # one round trip
    assert net.received["b"][-1] == ("a", b"i am back")
    net.send("b", "a", b"welcome")
    net.run_for(0.05)
    assert net.received["a"] == [("b", b"welcome")]
    assert net.c("b", "session.rekeyed") == 1
    # The old init (smaller timestamp) replayed now is ignored.
    net.deliver("b", bytes(net.sid("a")), old_init)
    assert net.c("b", "session.drop.replayed_init") == 1
    # A restart whose clock went backwards is refused until it passes the old time.
    net.start("a", EPOCH)
    net.send("a", "b", b"too old")
    net.run_for(0.05)
    assert net.c("b", "session.drop.replayed_init") == 2


def test_init_rate_limited_per_source_and_globally() -> None:
    p = SessionParams(init_rate=5.0, init_burst=10.0, global_init_rate=50.0, global_init_burst=40.0)
    net = Net(names=("a", "b"), params=p)
    a = bytes(net.sid("a"))
    junk = bytes([TYPE_INIT]) + bytes(INIT_LEN - 1)
    for _ in range(100):
        net.deliver("b", a, junk)
    assert net.c("b", "session.drop.rate_limited") == 90
    assert net.c("b", "session.drop.bad_tag") == 10
    # Many claimed sources: the global bucket holds (30 tokens left of 40); past it
    # the node is under load and answers with cookies instead.
    srcs = [bytes([i]) * 32 for i in range(1, 101)]
    for s in srcs:
        net.deliver("b", s, junk)
    assert net.c("b", "session.drop.rate_limited") == 90
    assert net.c("b", "session.drop.cookie_required") == 70
    assert net.c("b", "session.handshake.cookie_tx") == 70
    assert len(net.nowhere) == 70
    # Tokens come back with time; a genuine handshake then succeeds.
    net.run_for(2.0)
    net.send("a", "b", b"ok")
    net.run_for(1.0)
    assert net.received["b"] == [("a", b"ok")]


def test_per_source_table_is_bounded() -> None:
    p = SessionParams(max_rate_sources=16)
    net = Net(params=p)
    junk = bytes([TYPE_INIT]) + bytes(INIT_LEN - 1)
    for i in range(200):
        net.deliver("b", i.to_bytes(32, "big"), junk)
    assert len(net.m["b"]._buckets) <= 16


def test_prologue_and_suite_are_fixed() -> None:
    assert PROLOGUE == b"meshpipe-session-v1"
    with pytest.raises(ValueError):
        SessionParams(rekey_after_messages=0)
    with pytest.raises(ValueError):
        SessionParams(rekey_after_time=200.0, reject_after_time=180.0)


def test_peer_table_is_bounded() -> None:
    net = Net(names=("a", "b", "c", "d"), params=SessionParams(max_peers=2))
    for n in "bcd":
        net.send("a", n, b"hi")
    assert net.c("a", "session.drop.too_many_peers") == 1
    net.run_for(1.0)
    assert net.received["b"] and net.received["c"] and not net.received["d"]
