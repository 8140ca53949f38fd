"""meshpipe.session under a handshake flood: cookies, rekey MACs, bounded tables.

Fake clock and the tiny fake network of tests/test_session.py.
"""

from __future__ import annotations

import hashlib
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshpipe.identity import Identity
from meshpipe.session import (
    COOKIE_LEN,
    INIT_EXT_LEN,
    INIT_LEN,
    MAC_LEN,
    TYPE_COOKIE,
    TYPE_INIT,
    Plaintext,
    SessionManager,
    SessionParams,
    Transmit,
)
from tests.test_session import EPOCH, Net, established, hold

# A small plain budget so that a modest flood puts the node under load quickly.
FLOOD_PARAMS = SessionParams(
    global_init_rate=20.0,
    global_init_burst=20.0,
    rekey_after_time=4.0,
    reject_after_time=30.0,
)


def junk_init(rng: random.Random) -> bytes:
    return bytes([TYPE_INIT]) + rng.randbytes(INIT_LEN - 1)


def flood(net: Net, dst: str, seconds: float, per_tick: int, claim: bytes | None = None) -> None:
    """``per_tick`` junk inits every 10 ms for ``seconds`` (fresh random SIDs, or
    all claiming ``claim``), while the net runs."""
    rng = random.Random(7)
    for _ in range(round(seconds / 0.01)):
        for _ in range(per_tick):
            net.deliver(dst, claim if claim is not None else rng.randbytes(32), junk_init(rng))
        net.run_for(0.01)


def only_known(net: Net) -> set[bytes]:
    return set(net.by_sid)


def test_first_handshake_through_a_flood_uses_a_cookie() -> None:
    net = Net(params=FLOOD_PARAMS)
    known = only_known(net)
    net.routable = known.__contains__
    for n in "ab":
        net.start(n, EPOCH)
    flood(net, "b", 0.5, 50)  # 5000/s: b is under load
    assert net.c("b", "session.under_load") == 1
    net.send("a", "b", b"through")
    flood(net, "b", 1.0, 50)
    assert net.received["b"] == [("a", b"through")]
    assert net.c("a", "session.handshake.cookie_rx") == 1
    assert net.c("b", "session.handshake.cookie_ok") == 1
    assert net.c("b", "session.handshake.cookie_tx") == 1  # only a is routable
    assert net.c("b", "session.drop.cookie_unroutable") > 5000
    assert not net.nowhere
    # The flood shows in a few log events, not thousands.
    names = [e.name for e in net.events["b"]]
    assert names.count("session.under_load") == 1
    assert names.count("session.handshake_refused") <= 2  # once per reason per 10 s


def test_without_load_a_plain_init_gets_no_cookie() -> None:
    net = established(Net())
    assert net.c("b", "session.handshake.cookie_tx") == 0
    assert [len(w[2]) for w in net.payloads("a", TYPE_INIT)] == [INIT_LEN]


def test_rekeys_never_starve_even_under_the_peers_own_sid() -> None:
    """An attacker claims a's SID (and fresh ones): a's plain per-source budget is
    gone, but its rekeys carry a MAC under the live session's keys."""
    net = established(Net(params=FLOOD_PARAMS))
    a = bytes(net.sid("a"))
    rng = random.Random(3)
    t_end = net.now + 12.0
    sent = 0
    while net.now < t_end:
        for _ in range(20):
            net.deliver("b", a, junk_init(rng))
            net.deliver("b", rng.randbytes(32), junk_init(rng))
        if round(net.now * 100) % 10 == 0:
            net.send("a", "b", b"%d" % sent)
            net.send("b", "a", b"%d" % sent)
            sent += 1
        net.run_for(0.01)
    net.run_for(0.5)
    assert net.c("a", "session.rekeyed") + net.c("b", "session.rekeyed") >= 2
    assert net.c("b", "session.handshake.rekey_mac_ok") >= 1
    assert net.c("b", "session.drop.rate_limited") > 1000  # the junk under a's SID
    assert len(net.received["b"]) == 1 + sent and len(net.received["a"]) == sent
    assert net.c("a", "session.expired") == 0 and net.c("b", "session.expired") == 0


def test_junk_under_a_restarted_peers_sid_on_another_link_spends_nothing_of_its() -> None:
    """a has no session (it restarted); junk claiming a's SID arrives by another
    ingress: the per-source limits are per (source, ingress), so a's init goes through."""
    net = Net()
    a = bytes(net.sid("a"))
    rng = random.Random(5)
    for _ in range(200):
        net.deliver("b", a, junk_init(rng), ingress="x")
    net.send("a", "b", b"me")  # the net delivers with ingress None: another link
    for _ in range(100):
        net.deliver("b", a, junk_init(rng), ingress="x")
        net.run_for(0.01)
    assert net.received["b"] == [("a", b"me")]
    assert net.c("b", "session.drop.rate_limited") >= 280
    assert net.c("b", "session.drop.cookie_required") == 0  # 10 a second: no load


def test_replayed_rekey_init_spends_nothing() -> None:
    p = SessionParams(rekey_after_messages=3)
    net = established(Net(params=p))
    held: list[bytes] = []
    net.tap = hold(held, lambda s, d, pl: pl[0] == TYPE_INIT)
    for i in range(4):
        net.send("a", "b", b"%d" % i)  # a hits the count: a rekey init, held
    net.tap = None
    assert held and len(held[0]) == INIT_EXT_LEN
    a = bytes(net.sid("a"))
    for _ in range(50):
        net.deliver("b", a, held[0])
    assert net.c("b", "session.handshake.rekey_mac_ok") == 1
    assert net.c("b", "session.drop.replayed_init") == 49
    net.run_for(1.0)
    assert net.c("a", "session.rekeyed") == 1


def test_cookie_reply_is_bound_to_the_init_and_the_cookie_to_the_sid() -> None:
    net = Net(names=("a", "b", "c"), params=FLOOD_PARAMS)
    flood(net, "b", 0.2, 50)
    held: list[bytes] = []
    net.tap = hold(held, lambda s, d, pl: pl[0] == TYPE_COOKIE)
    net.send("a", "b", b"x")
    net.run_for(0.05)
    net.tap = None
    assert len(held) == 1 and len(held[0]) == COOKIE_LEN
    b = bytes(net.sid("b"))
    forged = held[0][:-1] + bytes([held[0][-1] ^ 1])
    net.deliver("a", b, forged)
    assert net.c("a", "session.drop.bad_tag") == 1
    assert net.c("a", "session.handshake.cookie_rx") == 0
    # c, on the path, copies a's cookie into its own init: the cookie is a's.
    cookie = held[0][5 : 5 + MAC_LEN]
    mc = net.m["c"]
    out = mc.send(b, b"c's", net.now)
    init = next(o.payload for o in out if isinstance(o, Transmit))
    rekey_mac = bytes(MAC_LEN)
    cookie_mac = hashlib.blake2b(init + rekey_mac, key=cookie, digest_size=MAC_LEN).digest()
    net.deliver("b", bytes(net.sid("c")), init + rekey_mac + cookie_mac)
    assert net.c("b", "session.handshake.cookie_bad") == 1
    assert net.c("b", "session.handshake.cookie_ok") == 0
    # a itself completes with its cookie.
    net.deliver("a", b, held[0])
    flood(net, "b", 0.5, 50)
    assert ("a", b"x") in net.received["b"]


def restart_keeping_cookie(
    net: Net, p: SessionParams, cookie: bytes, after: float, data: bytes
) -> None:
    """``after`` seconds on, a restarts (no keys) holding ``cookie`` and sends ``data``
    to b under a flood."""
    net.run_for(after)
    epoch = EPOCH + int(net.now * 1e9) + 10**9
    net.m["a"] = SessionManager(
        net.ids["a"], net.now, random.Random(epoch), epoch, p, random_bytes=net.rng.randbytes
    )
    b = bytes(net.sid("b"))
    peer = net.m["a"]._peer(b, net.now)
    assert peer is not None
    peer.cookie, peer.cookie_at = cookie, net.now
    flood(net, "b", 0.2, 50)
    net.send("a", "b", data)
    flood(net, "b", 0.5, 50)


def test_cookie_outlives_one_secret_rotation_not_two() -> None:
    p = SessionParams(global_init_rate=20.0, global_init_burst=20.0, cookie_secret_lifetime=10.0)
    net = Net(params=p)
    flood(net, "b", 0.3, 50)
    net.send("a", "b", b"1")
    flood(net, "b", 0.5, 50)
    assert net.c("b", "session.handshake.cookie_ok") == 1
    peer_b = net.m["a"]._peers[bytes(net.sid("b"))]
    assert peer_b.cookie is not None
    cookie = peer_b.cookie
    # A new handshake 12 s later (one rotation): the same cookie still works.
    restart_keeping_cookie(net, p, cookie, 12.0, b"2")
    assert net.c("b", "session.handshake.cookie_ok") == 2
    assert net.c("b", "session.handshake.cookie_bad") == 0
    # 25 s later (two rotations) it is refused and a gets a new one.
    restart_keeping_cookie(net, p, cookie, 25.0, b"3")
    assert net.c("b", "session.handshake.cookie_bad") == 1
    assert net.c("b", "session.handshake.cookie_ok") == 3
    assert ("a", b"3") in net.received["b"]


def test_an_older_responder_gets_plain_rekey_inits() -> None:
    """A responder that drops the extended form (as an older version would): the
    rekey completes on the plain attempt and later rekeys go plain at once."""
    p = SessionParams(rekey_after_messages=5)
    net = established(Net(params=p))

    def old_b(src: str, dst: str, payload: bytes) -> bytes | None:
        return None if dst == "b" and len(payload) == INIT_EXT_LEN else payload

    net.tap = old_b
    for i in range(6):
        net.send("a", "b", b"%d" % i)
    net.run_for(3.0)
    assert net.c("a", "session.rekeyed") == 1
    assert net.m["a"]._peers[bytes(net.sid("b"))].legacy
    before = len(net.payloads("a", TYPE_INIT))
    for i in range(6):
        net.send("a", "b", b"more%d" % i)
    net.run_for(1.0)
    assert net.c("a", "session.rekeyed") == 2
    assert [len(w[2]) for w in net.payloads("a", TYPE_INIT)[before:]] == [INIT_LEN]


def _fresh_init(net: Net, i: int, dst: bytes) -> tuple[bytes, bytes]:
    ident = Identity.from_seed(b"fresh%d" % i + bytes(32 - len(b"fresh%d" % i)))
    m = SessionManager(ident, net.now, random.Random(i), EPOCH, random_bytes=net.rng.randbytes)
    out = m.send(dst, b"hi", net.now)
    return bytes(ident.sid), next(o.payload for o in out if isinstance(o, Transmit))


def test_handshakes_in_progress_are_bounded_and_never_evicted() -> None:
    p = SessionParams(max_handshakes=4, half_open_timeout=5.0)
    net = established(Net(names=("a", "b", "c"), params=p))
    b = bytes(net.sid("b"))
    for i in range(10):  # valid inits from fresh keys nobody can route to
        src, init = _fresh_init(net, i, b)
        net.deliver("b", src, init)
    mb = net.m["b"]
    # Plain inits get half the table; the rest are refused with a cookie reply.
    assert net.c("b", "session.handshake.resp_tx") == 1 + 2
    assert net.c("b", "session.drop.too_many_handshakes") == 8
    assert sum(t.payload[0] == TYPE_COOKIE for t in net.nowhere) == 8
    assert mb.handshakes_in_progress() == 2
    # The established session is not touched.
    net.send("a", "b", b"still")
    net.run_for(0.1)
    assert net.received["b"][-1] == ("a", b"still")
    # c is reachable: its plain init is refused too, but the cookie gets it in.
    net.send("c", "b", b"c here")
    net.run_for(0.5)
    assert net.received["b"][-1] == ("c", b"c here")
    assert net.c("c", "session.handshake.cookie_rx") == 1
    # Never confirmed: the half-open entries time out and make room again.
    net.run_for(6.0)
    assert net.c("b", "session.handshake.half_open_expired") == 2
    assert mb.handshakes_in_progress() == 0
    src, init = _fresh_init(net, 99, b)
    net.deliver("b", src, init)
    assert net.c("b", "session.handshake.resp_tx") == 1 + 2 + 1 + 1
    events = [e for e in net.events["b"] if e.name == "session.handshake_refused"]
    assert len(events) == 1 and events[0].fields["reason"] == "too_many_handshakes"
    assert events[0].fields["suppressed"] == 0


def test_restart_probe_only_for_routable_sources() -> None:
    net = established(Net(routable=lambda sid: False))
    pkt = next(w[2] for w in reversed(net.wire) if w[0] == "a" and w[2][0] == 3)
    net.start("b", EPOCH + 10**10)  # b lost its keys
    rng = random.Random(1)
    for _ in range(100):
        net.deliver("b", rng.randbytes(32), pkt)
    assert net.c("b", "session.drop.probe_unroutable") == 100
    assert net.c("b", "session.handshake.restart_probe") == 0
    assert net.m["b"].handshakes_in_progress() == 0


_LOADED = Net(params=SessionParams(global_init_rate=1.0, global_init_burst=1.0))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_under_load_never_raises_and_answers_only_with_cookies(data: st.DataObject) -> None:
    net = _LOADED
    t = data.draw(st.sampled_from([TYPE_INIT, TYPE_COOKIE]))
    size = data.draw(st.sampled_from([INIT_LEN, INIT_EXT_LEN, COOKIE_LEN, 40]))
    pkt = bytes([t]) + data.draw(st.binary(min_size=size - 1, max_size=size - 1))
    src = data.draw(st.sampled_from([bytes(net.sid("a")), bytes(32), bytes([9]) * 32]))
    outs = net.m["b"].on_packet(src, pkt, net.now)
    assert not any(isinstance(o, Plaintext) for o in outs)
    for o in outs:
        if isinstance(o, Transmit):
            assert t == TYPE_INIT and len(pkt) in (INIT_LEN, INIT_EXT_LEN)
            assert o.payload[0] == TYPE_COOKIE and len(o.payload) == COOKIE_LEN
            assert bytes(o.dst) == src  # always to the claimed source
    assert net.m["b"].counters["session.drop.internal_error"] == 0
