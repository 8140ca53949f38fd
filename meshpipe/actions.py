"""What the sans-IO core asks its shell to do.

The core never touches a socket or a clock: every entry point takes ``now`` (seconds,
float, monotonic) and returns a list of these actions. The shell (a worker process
or the simulator) executes them in order.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

# A link-layer address on one interface: ("198.18.0.2", 7700) for UDP, anything
# hashable in the simulator. MULTICAST means "the interface's discovery group".
LinkAddr = Hashable
MULTICAST: LinkAddr = "multicast"
BROADCAST: LinkAddr = "broadcast"  # native broadcast (radio): every neighbour in range hears it


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Transmit ``frame`` on interface ``iface`` to link address ``dest``."""

    iface: int
    dest: LinkAddr
    frame: bytes


@dataclass(frozen=True, slots=True)
class Deliver:
    """A DATA payload addressed to this node arrived from ``src`` (a SID)."""

    src: bytes
    payload: bytes
    hops: int


@dataclass(frozen=True, slots=True)
class Event:
    """Something worth a structured log line (stable event name + fields)."""

    name: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ForwardingChanged:
    """The next hop towards some destinations changed; data-plane workers need the new table.

    ``entries`` maps destination SID -> (iface, next-hop link address); a value of
    None removes the destination.
    """

    entries: dict[bytes, tuple[int, LinkAddr] | None]


# -- between the control worker and the crypto shards (meshpipe/dataplane.py) -----------


@dataclass(frozen=True, slots=True)
class Seal:
    """Encrypt ``plaintext`` in the session with ``dst`` and send it: for the crypto
    shard that owns ``dst``'s session."""

    dst: bytes
    plaintext: bytes


@dataclass(frozen=True, slots=True)
class Open:
    """A session packet from ``src`` that arrived through the control worker (a radio
    link): for the crypto shard that owns ``src``'s session."""

    src: bytes
    packet: bytes
    hops: int


@dataclass(frozen=True, slots=True)
class Opened:
    """A decrypted session plaintext from ``src`` for the control worker's protocols."""

    src: bytes
    plaintext: bytes
    hops: int


@dataclass(frozen=True, slots=True)
class TunWrite:
    """An IP packet from the mesh, source address checked, for the TUN device."""

    packet: bytes


Action = SendFrame | Deliver | Event | ForwardingChanged | Seal | Open | Opened | TunWrite
