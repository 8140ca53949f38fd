"""Names to nodes: who claims a name, and which claimant a lookup means.

A node's name comes from its signed node record (meshpipe.noderecord). It is a claim,
not a proof: several nodes may claim one name. A lookup therefore returns every
claimant, nearest first (by routing metric; this node itself is at 0, a node without
a route last), and the DNS zone answers the nearest. Forms of a query, case-insensitive,
with or without the ``.mesh`` domain:

- ``NAME``: every node whose record claims NAME;
- ``SIDPREFIX``: the node(s) whose SID starts with these 16+ hex characters;
- ``NAME.SIDPREFIX``: the node with both (a 64-bit prefix makes it unique in practice).

A name that is also 16+ hex characters is first taken as a SID prefix; a query that
matches none of the forms is tried as a whole name (names may contain dots).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshpipe.identity import overlay_ipv6
from meshpipe.noderecord import NodeRecord

DOMAIN = "mesh"
MIN_PREFIX = 16  # hex characters: 64 bits
_HEX = re.compile(r"[0-9a-f]{16,64}")


@dataclass(frozen=True, slots=True)
class Claimant:
    sid: bytes
    name: str
    metric: int | None  # routing metric to it; 0 for this node, None without a route

    @property
    def ipv6(self) -> ipaddress.IPv6Address:
        return overlay_ipv6(self.sid)

    def as_json(self) -> dict[str, Any]:
        return {
            "sid": self.sid.hex(),
            "name": self.name,
            "ipv6": str(self.ipv6),
            "metric": self.metric,
        }


def claimants(
    records: Iterable[NodeRecord], self_sid: bytes, metrics: Mapping[bytes, int]
) -> list[Claimant]:
    """One claimant per record, with the metric of the route to its origin."""
    out: list[Claimant] = []
    for r in records:
        sid = bytes(r.origin)
        out.append(Claimant(sid, r.name, 0 if sid == bytes(self_sid) else metrics.get(sid)))
    return out


def _order(c: Claimant) -> tuple[bool, int, bytes]:
    return (c.metric is None, c.metric or 0, c.sid)


def lookup(query: str, known: Iterable[Claimant]) -> list[Claimant]:
    """Every claimant matching ``query`` (one of the forms above), nearest first."""
    q = query.strip().rstrip(".").lower()
    if q.endswith("." + DOMAIN):
        q = q[: -len(DOMAIN) - 1]
    labels = q.split(".")
    if not q:
        return []
    cands = list(known)
    found: list[Claimant] = []
    if len(labels) == 2 and _HEX.fullmatch(labels[1]):
        name, prefix = labels
        found = [c for c in cands if c.sid.hex().startswith(prefix) and c.name.lower() == name]
    elif _HEX.fullmatch(q):
        found = [c for c in cands if c.sid.hex().startswith(q)]
    if not found:  # a plain name (which may contain dots)
        found = [c for c in cands if c.name and c.name.lower() == q]
    return sorted(found, key=_order)


def by_address(addr: ipaddress.IPv6Address, known: Iterable[Claimant]) -> Claimant | None:
    """The node whose overlay address is ``addr`` (None if no known node has it)."""
    return next((c for c in known if c.ipv6 == addr), None)


def unique_name(c: Claimant) -> str:
    """The name that always means this node: NAME.SIDPREFIX.mesh (SIDPREFIX.mesh unnamed)."""
    prefix = c.sid.hex()[:MIN_PREFIX]
    label = c.name.lower()
    if label and _is_label(label):
        return f"{label}.{prefix}.{DOMAIN}"
    return f"{prefix}.{DOMAIN}"


_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _is_label(text: str) -> bool:
    return bool(_LABEL.fullmatch(text))


__all__ = ["DOMAIN", "MIN_PREFIX", "Claimant", "by_address", "claimants", "lookup", "unique_name"]
