"""meshpipe.names and meshpipe.meshdns: lookups, DNS answers, fuzzed input never crashes."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.reversename
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpipe.identity import Identity
from meshpipe.meshdns import MeshDns
from meshpipe.names import Claimant, lookup, unique_name

IDS = [Identity.from_seed(bytes([i]) * 32) for i in range(1, 5)]
SIDS = [bytes(i.sid) for i in IDS]
ME = Claimant(SIDS[0], "a", 0)
NEAR_D = Claimant(SIDS[1], "d", 512)
FAR_D = Claimant(SIDS[2], "D", 1024)
LOST = Claimant(SIDS[3], "lost", None)
KNOWN = [FAR_D, LOST, ME, NEAR_D]


def ask(name: str, rdtype: str = "AAAA") -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    wire = MeshDns().respond(q.to_wire(), KNOWN)
    assert wire is not None
    return dns.message.from_wire(wire)


def addresses(resp: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in resp.answer for rd in rrset]


def test_lookup_forms_and_order() -> None:
    assert lookup("d", KNOWN) == [NEAR_D, FAR_D]  # names are claims: both, nearest first
    assert lookup("D.mesh.", KNOWN) == [NEAR_D, FAR_D]
    assert lookup(SIDS[2].hex()[:16], KNOWN) == [FAR_D]
    assert lookup(f"d.{SIDS[2].hex()[:20]}.mesh", KNOWN) == [FAR_D]
    assert lookup(f"a.{SIDS[2].hex()[:20]}", KNOWN) == []
    assert lookup(SIDS[2].hex()[:15], KNOWN) == []  # too short to be a SID prefix
    assert lookup("nobody", KNOWN) == [] and lookup("", KNOWN) == []
    assert lookup("lost", KNOWN) == [LOST]
    dotted = Claimant(SIDS[3], "my.node", 7)
    assert lookup("my.node.mesh", [dotted]) == [dotted]
    assert unique_name(FAR_D) == f"d.{SIDS[2].hex()[:16]}.mesh"
    assert unique_name(Claimant(SIDS[1], "not a label", 1)) == f"{SIDS[1].hex()[:16]}.mesh"


def test_aaaa_answers_the_nearest_claimant() -> None:
    r = ask("d.mesh")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    assert addresses(r) == [str(NEAR_D.ipv6)]
    assert addresses(ask(f"{SIDS[2].hex()[:16]}.mesh")) == [str(FAR_D.ipv6)]
    assert addresses(ask(f"d.{SIDS[2].hex()[:16]}.mesh")) == [str(FAR_D.ipv6)]


def test_negative_answers() -> None:
    r = ask("nobody.mesh")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].rdtype == dns.rdatatype.SOA
    r = ask("d.mesh", "A")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority
    assert ask("example.com").rcode() == dns.rcode.REFUSED
    assert ask("mesh", "SOA").answer


def test_ptr_for_overlay_addresses() -> None:
    r = ask(dns.reversename.from_address(str(FAR_D.ipv6)).to_text(), "PTR")
    assert addresses(r) == [unique_name(FAR_D) + "."]
    assert ask(dns.reversename.from_address("fd00::1").to_text(), "PTR").rcode() == (
        dns.rcode.NXDOMAIN
    )
    assert ask(dns.reversename.from_address("2001:db8::1").to_text(), "PTR").rcode() == (
        dns.rcode.REFUSED
    )


def test_malformed_and_responses_are_dropped_and_counted() -> None:
    d = MeshDns()
    q = dns.message.make_query("d.mesh", "AAAA")
    resp = dns.message.make_response(q)
    assert d.respond(b"\x00\x01garbage", KNOWN) is None
    assert d.respond(resp.to_wire(), KNOWN) is None  # a response is no query
    assert d.respond(b"", KNOWN) is None
    assert d.counters["dns.drop.malformed"] == 3


@given(st.binary(max_size=600))
@settings(max_examples=500)
def test_fuzzed_bytes_never_crash(data: bytes) -> None:
    out = MeshDns().respond(data, KNOWN)
    assert out is None or dns.message.from_wire(out).flags & dns.flags.QR


@given(
    labels=st.lists(st.binary(min_size=1, max_size=20), min_size=0, max_size=5),
    rdtype=st.integers(0, 65535),
    flips=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
)
@settings(max_examples=300)
def test_fuzzed_queries_never_crash(
    labels: list[bytes], rdtype: int, flips: list[tuple[int, int]]
) -> None:
    name = dns.name.Name([*labels, b"mesh", b""])
    wire = bytearray(dns.message.make_query(name, rdtype).to_wire())
    for pos, val in flips:  # damage a few bytes of an otherwise valid query
        if pos < len(wire):
            wire[pos] = val
    MeshDns().respond(bytes(wire), KNOWN)
