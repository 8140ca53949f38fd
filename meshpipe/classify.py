"""Where a received frame goes: one receive classifier for every link worker.

A UDP interface worker and a radio worker both read frames from their link and
must decide, from the 66-byte DATA header alone and the forwarding table the
control worker pushes to them:

- :class:`Transit`: a DATA frame for another node that leaves by this same
  interface: forward it at once, hop limit lowered, never opened;
- a shard number ``k >= 0``: a DATA frame for this node, or in transit to another
  interface, or with no route (the shard's own table decides): the crypto worker
  ``shard_of(source SID)`` takes it, so a flow keeps its order and the control
  worker stays off the data path;
- :data:`CONTROL`: everything else (hellos, routing, discovery, node records,
  traces), or DATA when there are no crypto shards;
- :class:`Drop`: a DATA frame that would leave with hop limit 0 (the counter to bump
  is its ``reason``).

``classify`` is pure and total: any bytes give one of these, never an exception.
The simulator's sharded node (meshpipe/dataplane.py) uses it as the workers do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from meshpipe import wire

CONTROL: Final = -1
_DATA_BYTE: Final = wire.kind_byte(wire.KIND_DATA)[0]
_HEADER: Final = wire.DATA_HEADER_LEN


@dataclass(frozen=True, slots=True)
class Transit:
    """Send ``frame`` (the hop limit already lowered) to link address ``dest``."""

    dest: Any  # LinkAddr: a UDP (host, port) or a radio address
    frame: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str  # a counter name


DROP_HOP_LIMIT: Final = Drop("drop.hop_limit")

Verdict = Transit | Drop | int


def shard_of(sid: bytes, count: int) -> int:
    """The shard that owns the session with ``sid`` (SIDs are uniform: no mixing needed)."""
    return int.from_bytes(bytes(sid[:8]), "big") % count if count > 1 else 0


def classify(
    frame: bytes,
    own_sid: bytes,
    forwarding: Mapping[bytes, tuple[Any, ...]],
    iface: int,
    shards: int,
) -> Verdict:
    """The verdict on ``frame`` received on interface ``iface`` (see the module doc).

    ``forwarding``: destination SID -> (interface, link address); ``shards``: how many
    crypto shards there are (0: none, DATA goes to the control worker)."""
    if len(frame) < _HEADER or frame[0] != _DATA_BYTE:
        return CONTROL
    dst = frame[2:34]
    if dst != own_sid:
        hop = forwarding.get(dst)
        if hop is not None and hop[0] == iface:
            hop_limit = frame[1]
            if hop_limit <= 1:
                return DROP_HOP_LIMIT
            return Transit(hop[1], wire.with_hop_limit(frame, hop_limit - 1))
    if shards <= 0:
        return CONTROL
    return shard_of(frame[34:66], shards)


__all__ = ["CONTROL", "DROP_HOP_LIMIT", "Drop", "Transit", "Verdict", "classify", "shard_of"]
