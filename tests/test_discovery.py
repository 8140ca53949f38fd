"""meshpipe.services.discovery: signed records, caching, flooding rules, queries."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpipe import wire
from meshpipe.errors import FrameError
from meshpipe.identity import Identity
from meshpipe.services.discovery import (
    MAX_BODY,
    MAX_LIFETIME,
    Announce,
    Answer,
    DiscoveryOut,
    DiscoveryTiming,
    Query,
    ServiceDiscovery,
    ServiceError,
    ServiceRecord,
    SignedRecord,
    decode_frame,
    encode_announce,
    encode_answer,
    sign_record,
)

A = Identity.from_seed(b"A" * 32)
B = Identity.from_seed(b"B" * 32)
C = Identity.from_seed(b"C" * 32)
T = DiscoveryTiming(lifetime=60.0, refresh=20.0, startup_query=None)
LA, LB = (0, "a"), (0, "b")


def node(ident: Identity, timing: DiscoveryTiming = T) -> ServiceDiscovery:
    return ServiceDiscovery(ident, 0.0, timing=timing)


def deliver(
    outs: list[DiscoveryOut], dst: ServiceDiscovery, link: Any, now: float
) -> list[DiscoveryOut]:
    replies: list[DiscoveryOut] = []
    for o in outs:
        replies += dst.on_message(link, o.frame, now)
    return replies


def items_of(outs: list[DiscoveryOut]) -> list[SignedRecord]:
    got = []
    for o in outs:
        msg = decode_frame(o.frame)
        assert isinstance(msg, Announce | Answer)
        for body, sig, hops in msg.items:
            got.append(SignedRecord(ServiceRecord.decode(body), body, sig, hops))
    return got


def names(d: ServiceDiscovery, now: float) -> set[tuple[str, str]]:
    return {(s["name"], s["sid"][:8]) for s in d.services(now)}


def test_announce_reaches_a_neighbour_with_all_fields() -> None:
    a, b = node(A), node(B)
    outs = a.announce("web", 80, 1.0, attrs={"path": "/", "v": 2})
    assert [o.to for o in outs] == [None]
    deliver(outs, b, LA, 1.1)
    (svc,) = b.services(2.0)
    assert svc["name"] == "web" and svc["sid"] == str(A.sid) and svc["port"] == 80
    assert svc["kind"] == "tcp" and svc["hops"] == 1 and svc["attrs"] == {"path": "/", "v": 2}
    assert svc["age"] == pytest.approx(0.9) and svc["expires"] == pytest.approx(59.0, abs=1)
    assert b.counters["discovery.accepted"] == 1
    assert [e.name for e in b.drain_events()] == ["service.discovered"]


def test_flooding_forwards_once_with_hops_and_deduplicates() -> None:
    a, b = node(A), node(B)
    outs = a.announce("web", 80, 1.0)
    assert deliver(outs, b, LA, 1.0) == []  # batched for flood_delay
    fwd = b.on_timer(1.0 + T.flood_delay)
    (rec,) = items_of(fwd)
    assert rec.hops == 1 and rec.body == items_of(outs)[0].body
    assert deliver(outs, b, LA, 1.2) == [] and b.on_timer(1.3) == []
    assert b.counters["discovery.duplicate"] == 1
    # heard back by the origin: ignored
    deliver(fwd, a, LB, 1.3)
    assert a.counters["discovery.own"] == 1 and a.cache == {}


def test_transit_change_to_a_signed_field_is_forged() -> None:
    a, b = node(A), node(B)
    (rec,) = items_of(a.announce("web", 80, 1.0))
    evil = ServiceRecord(**{**_fields(rec.record), "port": 81})
    frame = encode_announce([[evil.body(), rec.sig, 0]])
    b.on_message(LA, frame, 1.0)
    assert b.services(1.0) == [] and b.counters["discovery.drop.forged"] == 1
    assert [e.name for e in b.drain_events()] == ["service.forged"]
    # the same seq, genuine now, is still accepted; a tampered copy after it is forged too
    b.on_message(LA, encode_announce([rec.item()]), 1.1)
    b.on_message(LA, frame, 1.2)
    assert b.counters["discovery.drop.forged"] == 2 and len(b.services(1.3)) == 1


def test_someone_else_cannot_sign_for_an_origin() -> None:
    b = node(B)
    rec = ServiceRecord(bytes(A.sid), "web", 80, "tcp", {}, 100, 1)
    body = rec.body()
    frame = encode_announce([[body, C.sign(b"meshpipe-service-v1" + body), 0]])
    b.on_message(LA, frame, 1.0)
    assert b.counters["discovery.drop.forged"] == 1
    with pytest.raises(ServiceError):
        sign_record(C, rec)


def test_replayed_old_record_is_stale_and_withdraw_sticks() -> None:
    a, b = node(A), node(B)
    old = a.announce("web", 80, 1.0)
    deliver(old, b, LA, 1.0)
    new = a.on_timer(T.refresh + 1)  # re-announce: new seq
    assert items_of(new)[0].record.seq > items_of(old)[0].record.seq
    deliver(new, b, LA, T.refresh + 1)
    deliver(old, b, LA, T.refresh + 2)
    assert b.counters["discovery.drop.stale"] == 1
    gone = a.withdraw("web", 30.0)
    assert items_of(gone)[0].record.withdrawn
    deliver(gone, b, LA, 30.0)
    assert b.services(30.0) == []
    deliver(new, b, LA, 31.0)  # the last announcement, replayed after the withdraw
    assert b.services(31.0) == [] and b.counters["discovery.drop.stale"] == 2
    assert "service.withdrawn" in [e.name for e in b.drain_events()]
    again = a.on_timer(30.0 + T.withdraw_repeat)  # the withdraw is said twice
    assert items_of(again)[0].record.withdrawn
    with pytest.raises(ServiceError):
        a.withdraw("web", 40.0)


def test_expired_and_far_future_records_are_dropped() -> None:
    a, b = node(A), node(B)
    outs = a.announce("web", 80, 1.0)
    deliver(outs, b, LA, 1.0 + T.lifetime + 1)  # a replay after its expiry
    assert b.counters["discovery.drop.expired"] == 1 and b.services(70.0) == []
    rec = ServiceRecord(bytes(A.sid), "far", 80, "tcp", {}, int(2 * MAX_LIFETIME), 5)
    b.on_message(LA, encode_announce([sign_record(A, rec).item()]), 1.0)
    assert b.counters["discovery.drop.bad_expiry"] == 1


def test_cache_expires_when_the_origin_goes_quiet() -> None:
    a, b = node(A), node(B)
    deliver(a.announce("web", 80, 1.0), b, LA, 1.0)
    b.on_timer(30.0)
    assert len(b.services(30.0)) == 1
    b.on_timer(1.0 + T.lifetime + 1.0)
    assert b.services(62.0) == [] and b.cache == {}
    assert "service.expired" in [e.name for e in b.drain_events()]


def test_refresh_happens_before_expiry() -> None:
    a = node(A)
    a.announce("web", 80, 0.0)
    assert a.next_deadline() <= T.refresh
    t, sent = 0.0, [0.0]
    while t < 3 * T.lifetime:
        t = a.next_deadline()
        if items_of(a.on_timer(t)):
            sent.append(t)
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent)]
    assert len(gaps) >= 8 and max(gaps) <= T.refresh < T.lifetime


def test_hidden_service_is_never_sent() -> None:
    a, b = node(A), node(B)
    assert a.announce("secret", 22, 1.0, hidden=True) == []
    assert a.services(1.0)[0]["hidden"] is True
    for t in (5.0, 25.0, 50.0, 100.0):
        assert a.on_timer(t) == []
    answers = deliver(b.query(2.0), a, LB, 2.0)
    assert all(not items_of([o]) for o in answers if o.to is not None)
    # hiding a public service withdraws it
    deliver(a.announce("web", 80, 3.0), b, LA, 3.0)
    deliver(a.announce("web", 80, 4.0, hidden=True), b, LA, 4.0)
    assert b.services(4.0) == []


def test_query_answers_come_back_along_the_path() -> None:
    a, b, c = node(A), node(B), node(C)  # a -- b -- c, c asks
    a.announce("web", 80, 1.0)
    a.announce("ssh", 22, 1.0)
    q = c.query(2.0, "web")
    at_b = deliver(q, b, (0, "c"), 2.0)
    fwd_q = [o for o in at_b if o.to is None]
    assert fwd_q and isinstance(decode_frame(fwd_q[0].frame), Query)
    at_a = deliver(fwd_q, a, LB, 2.0)
    ans = [o for o in at_a if o.to == LB]
    assert [r.record.name for r in items_of(ans)] == ["web"]
    relayed = deliver(ans, b, LA, 2.1)
    assert [o.to for o in relayed] == [(0, "c")]
    deliver(relayed, c, LB, 2.2)
    (svc,) = c.services(2.3)
    assert svc["name"] == "web" and svc["hops"] == 2
    assert c.counters["discovery.answer.rx"] == 1
    # b cached it on the way and answers the next query itself
    d = node(Identity.from_seed(b"D" * 32))
    again = deliver(d.query(3.0), b, (0, "d"), 3.0)
    assert [r.record.name for r in items_of([o for o in again if o.to is not None])] == ["web"]


def test_query_duplicates_and_unknown_answers() -> None:
    b, c = node(B), node(C)
    q = c.query(1.0)
    deliver(q, b, (0, "c"), 1.0)
    deliver(q, b, (0, "x"), 1.0)
    assert b.counters["discovery.query.duplicate"] == 1
    b.on_message(LA, wire.encode_control(wire.KIND_DISCOVERY, [3, bytes(8), []]), 1.0)
    assert b.counters["discovery.drop.no_path"] == 1


def test_scope_bounds_the_flood() -> None:
    a, b = node(A, DiscoveryTiming(scope=2, startup_query=None)), node(B)
    (rec,) = items_of(a.announce("web", 80, 1.0))
    b.on_message(LA, encode_announce([rec.item(1)]), 1.0)  # b is 2 hops out: keep, don't forward
    assert len(b.services(1.0)) == 1 and b.on_timer(2.0) == []
    c = node(C)
    c.on_message(LA, encode_announce([rec.item(2)]), 1.0)
    assert c.counters["discovery.drop.scope"] == 1


def test_per_origin_rate_limit() -> None:
    a = node(A, DiscoveryTiming(startup_query=None, burst=5, rate=1.0))
    b = node(B, DiscoveryTiming(startup_query=None, burst=5, rate=1.0))
    outs = []
    for i in range(10):
        outs += a.announce(f"s{i}", 1000 + i, 1.0)
    deliver(outs, b, LA, 1.0)
    assert b.counters["discovery.accepted"] == 5 and b.counters["discovery.drop.rate"] == 5


def test_oversize_and_malformed_items_are_counted() -> None:
    b = node(B)
    b.on_message(LA, encode_announce([[bytes(MAX_BODY + 1), bytes(64), 0]]), 1.0)
    assert b.counters["discovery.drop.oversize"] == 1
    b.on_message(LA, encode_announce([[b"\x01", bytes(64), 0], "junk"]), 1.0)
    assert b.counters["discovery.drop.malformed"] == 2
    b.on_message(LA, b"\x14\xc1", 1.0)
    assert b.counters["discovery.drop.malformed"] == 3


def test_announce_validates_locally() -> None:
    a = node(A)
    for bad in ("", "Web", "-x", "x" * 33, "a b"):
        with pytest.raises(ServiceError):
            a.announce(bad, 80, 0.0)
    with pytest.raises(ServiceError):
        a.announce("web", 0, 0.0)
    with pytest.raises(ServiceError):
        a.announce("web", 80, 0.0, kind="TCP!")
    with pytest.raises(ServiceError):
        a.announce("web", 80, 0.0, attrs={"k": "v" * 60, "k2": "v" * 60})  # too big to sign
    assert a.local == {}


def _fields(r: ServiceRecord) -> dict[str, Any]:
    return {
        "origin": r.origin,
        "name": r.name,
        "port": r.port,
        "kind": r.kind,
        "attrs": dict(r.attrs),
        "expiry": r.expiry,
        "seq": r.seq,
        "scope": r.scope,
        "withdrawn": r.withdrawn,
    }


records = st.builds(
    ServiceRecord,
    origin=st.just(bytes(A.sid)),
    name=st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True),
    port=st.integers(1, 65535),
    kind=st.sampled_from(["tcp", "socks5", "udp"]),
    attrs=st.dictionaries(
        st.text("abcdefgh", min_size=1, max_size=6),
        st.one_of(st.text(max_size=8), st.integers(-(2**40), 2**40), st.booleans()),
        max_size=2,
    ),
    expiry=st.integers(0, 2**40),
    seq=st.integers(0, 2**62),
    scope=st.integers(1, 32),
    withdrawn=st.booleans(),
)


@given(records)
def test_record_round_trip_and_signature(rec: ServiceRecord) -> None:
    if len(rec.body()) > MAX_BODY:
        with pytest.raises(ServiceError):
            sign_record(A, rec)
        return
    signed = sign_record(A, rec)
    assert ServiceRecord.decode(signed.body) == rec
    assert signed.verify()
    flipped = bytearray(signed.body)
    flipped[-3] ^= 1
    assert not SignedRecord(rec, bytes(flipped), signed.sig).verify()


@given(st.binary(max_size=400))
def test_decode_frame_only_frame_errors(data: bytes) -> None:
    for frame in (data, wire.kind_byte(wire.KIND_DISCOVERY) + data):
        try:
            decode_frame(frame)
        except FrameError:
            pass


@given(
    st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(-5, 2**33),
            st.binary(max_size=40),
            st.text(max_size=10),
        ),
        lambda kids: st.lists(kids, max_size=5),
        max_leaves=20,
    )
)
def test_on_message_never_raises(body: Any) -> None:
    b = node(B)
    for typ in (1, 2, 3):
        frame = wire.encode_control(
            wire.KIND_DISCOVERY, [typ, body] if typ == 1 else [typ, *([body] * 4)][:5]
        )
        b.on_message(LA, frame, 1.0)
    b.on_message(LA, wire.encode_control(wire.KIND_DISCOVERY, [1, [[body, body, body]]]), 1.0)
    assert b.services(1.0) == []


def test_largest_record_fits_the_smallest_mtu_in_every_message() -> None:
    from meshpipe.node import MIN_MTU

    name, kind = "n" * 24, "k" * 12
    expiry, seq = 2**32 - 1, 2**62  # unix seconds until 2106; seq: milliseconds
    rec = ServiceRecord(bytes(A.sid), name, 65535, kind, {}, expiry, seq, 32, True)
    room = MAX_BODY - len(rec.body())
    assert room >= 8  # a longest name still leaves room for a small attribute
    attrs: dict[str, str | int | bool] = {"a": "x" * (room - 3)}
    big = ServiceRecord(bytes(A.sid), name, 65535, kind, attrs, expiry, seq, 32, True)
    signed = sign_record(A, big)
    assert len(signed.body) == MAX_BODY
    assert len(encode_announce([signed.item(255)])) <= MIN_MTU
    assert len(encode_answer(bytes(8), [signed.item(255)])) <= MIN_MTU
    with pytest.raises(ServiceError):
        sign_record(A, ServiceRecord(**{**_fields(big), "attrs": {"a": "x" * (room - 2)}}))
