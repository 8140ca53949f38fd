"""The ``mesh`` DNS zone, sans-IO: query bytes and the known claimants in, answer bytes out.

Messages are parsed and built with dnspython. Answers (class IN):

- ``AAAA NAME.mesh`` / ``SIDPREFIX.mesh`` / ``NAME.SIDPREFIX.mesh`` (meshpipe.names): the
  overlay address of the nearest claimant (one record; ``meshpipe resolve`` lists all);
  any other type for a known node: NOERROR without answers (NODATA);
- ``PTR`` for an overlay address under ``d.f.ip6.arpa`` (fd00::/8): the node's unique
  name ``NAME.SIDPREFIX.mesh``;
- unknown names: NXDOMAIN; NXDOMAIN and NODATA carry a synthetic SOA for ``mesh`` whose
  minimum is the TTL, so resolvers cache the negative answer as briefly as a positive one;
- names outside both zones: REFUSED; opcodes other than QUERY: NOTIMP.

Input that does not parse as one DNS query (damaged, a response, not exactly one
question) gets no answer: ``dns.drop.malformed``. Counters: ``dns.rx``, ``dns.answer``,
``dns.nodata``, ``dns.nxdomain``, ``dns.refused``, ``dns.notimp``, ``dns.drop.malformed``.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Sequence

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from meshpipe.names import DOMAIN, Claimant, by_address, lookup, unique_name

DEFAULT_TTL = 10  # seconds: names follow the mesh, which changes
MAX_QUERY = 4096  # bytes; larger datagrams are not queries we answer
_ZONE = dns.name.from_text(DOMAIN)
_REVERSE = dns.name.from_text("d.f.ip6.arpa")  # fd00::/8
_NIBBLES = 32


class MeshDns:
    """Answers DNS queries for the mesh zone from a list of claimants."""

    def __init__(self, ttl: int = DEFAULT_TTL) -> None:
        self.ttl = ttl
        self.counters: Counter[str] = Counter()
        self._soa = dns.rrset.from_text(
            _ZONE, ttl, "IN", "SOA", f"{DOMAIN}. hostmaster.{DOMAIN}. 1 {ttl} {ttl} {ttl} {ttl}"
        )

    def respond(self, data: bytes, known: Sequence[Claimant]) -> bytes | None:
        """The answer to one query datagram, or None if it is to be dropped."""
        self.counters["dns.rx"] += 1
        query = self._parse(data)
        if query is None:
            self.counters["dns.drop.malformed"] += 1
            return None
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        resp.flags &= ~dns.flags.RA
        if query.opcode() != dns.opcode.QUERY:
            return self._rcode(resp, dns.rcode.NOTIMP, "dns.notimp")
        q = query.question[0]
        if q.rdclass != dns.rdataclass.IN:
            return self._rcode(resp, dns.rcode.REFUSED, "dns.refused")
        if q.name.is_subdomain(_ZONE):
            return self._forward(resp, q.name, q.rdtype, known)
        if q.name.is_subdomain(_REVERSE):
            return self._reverse(resp, q.name, q.rdtype, known)
        return self._rcode(resp, dns.rcode.REFUSED, "dns.refused")

    @staticmethod
    def _parse(data: bytes) -> dns.message.Message | None:
        if len(data) > MAX_QUERY:
            return None
        try:
            msg = dns.message.from_wire(bytes(data))
        except (dns.exception.DNSException, ValueError, UnicodeError, IndexError):
            return None
        if msg.flags & dns.flags.QR or len(msg.question) != 1:
            return None
        return msg

    def _forward(
        self,
        resp: dns.message.Message,
        qname: dns.name.Name,
        rdtype: int,
        known: Sequence[Claimant],
    ) -> bytes:
        if qname == _ZONE:
            if rdtype == dns.rdatatype.SOA:
                resp.answer.append(self._soa)
                return self._done(resp, "dns.answer")
            return self._negative(resp, dns.rcode.NOERROR, "dns.nodata")
        try:
            text = ".".join(label.decode("ascii") for label in qname.relativize(_ZONE).labels)
        except UnicodeDecodeError:
            text = ""
        found = lookup(text, known) if text.isprintable() else []
        if not found:
            return self._negative(resp, dns.rcode.NXDOMAIN, "dns.nxdomain")
        if rdtype not in (dns.rdatatype.AAAA, dns.rdatatype.ANY):
            return self._negative(resp, dns.rcode.NOERROR, "dns.nodata")
        resp.answer.append(dns.rrset.from_text(qname, self.ttl, "IN", "AAAA", str(found[0].ipv6)))
        return self._done(resp, "dns.answer")

    def _reverse(
        self,
        resp: dns.message.Message,
        qname: dns.name.Name,
        rdtype: int,
        known: Sequence[Claimant],
    ) -> bytes:
        nibbles = qname.relativize(dns.name.from_text("ip6.arpa")).labels
        node = None
        if len(nibbles) == _NIBBLES and all(len(n) == 1 for n in nibbles):
            try:
                digits = b"".join(reversed(nibbles)).decode("ascii")
                addr = ipaddress.IPv6Address(int(digits, 16))
            except ValueError:  # UnicodeDecodeError is a ValueError
                addr = None
            node = None if addr is None else by_address(addr, known)
        if node is None:
            return self._negative(resp, dns.rcode.NXDOMAIN, "dns.nxdomain")
        if rdtype not in (dns.rdatatype.PTR, dns.rdatatype.ANY):
            return self._negative(resp, dns.rcode.NOERROR, "dns.nodata")
        resp.answer.append(
            dns.rrset.from_text(qname, self.ttl, "IN", "PTR", unique_name(node) + ".")
        )
        return self._done(resp, "dns.answer")

    def _negative(self, resp: dns.message.Message, rcode: dns.rcode.Rcode, counter: str) -> bytes:
        resp.authority.append(self._soa)
        return self._rcode(resp, rcode, counter)

    def _rcode(self, resp: dns.message.Message, rcode: dns.rcode.Rcode, counter: str) -> bytes:
        resp.set_rcode(rcode)
        return self._done(resp, counter)

    def _done(self, resp: dns.message.Message, counter: str) -> bytes:
        self.counters[counter] += 1
        wire: bytes = resp.to_wire()
        return wire


__all__ = ["DEFAULT_TTL", "MeshDns"]
