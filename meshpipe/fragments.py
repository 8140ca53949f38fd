"""Fragments below the session: one sealed packet, carried in several DATA frames.

A session packet larger than a path's DATA payload (a whole 64 kB tunnel message,
sealed once) is cut into fragments, each the payload of its own DATA frame. Transit
nodes forward them like any DATA frame, never opened and never joined; the
destination joins them before the one :meth:`SessionManager.on_packet`. Only the
sealed packet is authenticated: a forged or damaged fragment makes the joined packet
fail its tag (``session.drop.bad_tag``), never deliver wrong bytes.

Wire format (the whole DATA payload, integers big-endian)::

    FRAGMENT  8 | message u32 | index u16 | count u16 | piece
              every piece but the last has the length of piece 0; 2 <= count

The first byte sits beside the session's packet types (1..4), so a node that does
not know fragments drops them as malformed.

Loss costs what it cost when MSP cut the message itself: any lost fragment loses
the message. Small-MTU paths see no larger messages than before (the tunnel splits
an offloaded segment into its IP packets first: meshpipe/dataplane.py).

:class:`Reassembler` holds partial messages under a per-source and an overall byte
budget (meshpipe/msp/buffers.py ``PeerBudget``) and a count cap per source; a new
message that does not fit evicts its own source's oldest partials, then (when the
overall budget is full) the oldest of all. What never completes is dropped after
``timeout``. Sources are claimed, not proven (the fragments are not authenticated):
an attacker's fragments that never complete cost memory within the budget only.

Counters (``Reassembler.counters``): ``frag.rx``, ``frag.joined``,
``frag.drop.malformed``, ``frag.drop.duplicate``, ``frag.drop.mismatch``
(a fragment that disagrees with its message's count or piece size),
``frag.drop.too_large``, ``frag.drop.evicted`` (partials given up for room),
``frag.drop.timeout``.
"""

from __future__ import annotations

import collections
import math
import struct
from dataclasses import dataclass, field
from typing import Final

from meshpipe.msp.buffers import PeerBudget
from meshpipe.session import MAX_PACKET
from meshpipe.wire import DATA_HEADER_LEN

TYPE_FRAGMENT: Final = 8
HEADER: Final = struct.Struct("!BIHH")
HEADER_LEN: Final = HEADER.size  # 9
MAX_COUNT: Final = 0xFFFF
_TYPE_BYTE: Final = bytes((TYPE_FRAGMENT,))


def is_fragment(payload: bytes) -> bool:
    return payload[:1] == _TYPE_BYTE


def split(packet: bytes, room: int, message: int) -> list[bytes]:
    """``packet`` as fragments of at most ``room`` bytes each (header included).

    Raises ValueError when ``room`` leaves no space for a piece or the packet needs
    more than MAX_COUNT fragments."""
    piece = room - HEADER_LEN
    if piece <= 0:
        raise ValueError(f"no room for a fragment in {room} bytes")
    count = max(1, -(-len(packet) // piece))
    if count > MAX_COUNT:
        raise ValueError(f"{len(packet)} bytes need {count} fragments of {piece}")
    message &= 0xFFFFFFFF
    pack = HEADER.pack
    return [
        pack(TYPE_FRAGMENT, message, i, count) + packet[i * piece : (i + 1) * piece]
        for i in range(count)
    ]


@dataclass(slots=True)
class _Partial:
    count: int
    first: float
    size: int = 0
    piece: int = 0  # length of every piece but the last, once known
    pieces: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ReassemblyParams:
    max_packet: int = MAX_PACKET  # a joined packet larger than this is dropped
    per_source: int = 1 << 20  # bytes held for one claimed source
    total: int = 8 << 20  # bytes held for all
    partials_per_source: int = 32
    timeout: float = 5.0


class Reassembler:
    """Partial messages, keyed by (claimed source, message number)."""

    def __init__(self, params: ReassemblyParams | None = None) -> None:
        self.params = params or ReassemblyParams()
        self.counters: collections.Counter[str] = collections.Counter()
        self.budget = PeerBudget(self.params.per_source, self.params.total)
        # Insertion order is age order: the first entry is the oldest. (An OrderedDict:
        # a plain dict's first entry is found past every slot deleted before it.)
        self._parts: collections.OrderedDict[tuple[bytes, int], _Partial] = (
            collections.OrderedDict()
        )
        self._expire_at = math.inf  # no partial is older than the timeout before this
        self._per_source: collections.Counter[bytes] = collections.Counter()

    def push(self, src: bytes, payload: bytes, now: float) -> bytes | None:
        """One fragment from ``src``; the joined packet when it was the last missing."""
        c = self.counters
        c["frag.rx"] += 1
        if len(payload) < HEADER_LEN:
            c["frag.drop.malformed"] += 1
            return None
        _t, message, index, count = HEADER.unpack_from(payload)
        piece = payload[HEADER_LEN:]
        n = len(piece)
        if count < 2 or index >= count or not piece:
            c["frag.drop.malformed"] += 1
            return None
        p = self.params
        if (count - 1) * max(n, 1) >= p.max_packet and index < count - 1:
            c["frag.drop.too_large"] += 1
            return None
        if now >= self._expire_at:
            self.expire(now)
        key = (src, message)
        part = self._parts.get(key)
        if part is None:
            if not self._make_room(src, n):
                c["frag.drop.evicted"] += 1
                return None
            part = self._parts[key] = _Partial(count, now)
            self._per_source[src] += 1
            if self._expire_at == math.inf:
                self._expire_at = now + p.timeout
        elif part.count != count:
            c["frag.drop.mismatch"] += 1
            return None
        elif index in part.pieces:
            c["frag.drop.duplicate"] += 1
            return None
        elif not self.budget.fits(src, n):
            self._drop(key, part)  # it cannot complete within its source's budget
            c["frag.drop.evicted"] += 1
            return None
        if index < count - 1:
            if part.piece == 0:
                part.piece = n
            elif part.piece != n:
                c["frag.drop.mismatch"] += 1
                return None
        if part.piece and (count - 1) * part.piece >= p.max_packet:
            self._drop(key, part)
            c["frag.drop.too_large"] += 1
            return None
        part.pieces[index] = piece
        part.size += n
        self.budget.change(src, n)
        if len(part.pieces) < count:
            return None
        self._drop(key, part)
        last = part.pieces[count - 1]
        if len(last) > part.piece:
            c["frag.drop.mismatch"] += 1
            return None
        c["frag.joined"] += 1
        return b"".join([part.pieces[i] for i in range(count)])

    def expire(self, now: float) -> None:
        """Drop partials older than the timeout (called on each push and timer)."""
        limit = now - self.params.timeout
        while self._parts:
            key, part = next(iter(self._parts.items()))
            if part.first > limit:
                self._expire_at = part.first + self.params.timeout
                return
            self._drop(key, part)
            self.counters["frag.drop.timeout"] += 1
        self._expire_at = math.inf

    def next_deadline(self) -> float:
        """When :meth:`expire` may have something to drop (maybe early, never late)."""
        return self._expire_at

    def held(self) -> int:
        """Bytes held in partial messages, all sources."""
        return self.budget.total

    def partials(self) -> int:
        return len(self._parts)

    # -- plumbing ------------------------------------------------------------------------

    def _drop(self, key: tuple[bytes, int], part: _Partial) -> None:
        del self._parts[key]
        if part.size:
            self.budget.change(key[0], -part.size)
        left = self._per_source[key[0]] - 1
        if left:
            self._per_source[key[0]] = left
        else:
            del self._per_source[key[0]]

    def _make_room(self, src: bytes, n: int) -> bool:
        """Evict for a new partial of ``src``: its own oldest first, then anyone's."""
        p = self.params
        if n > p.per_source:
            return False
        while self._per_source[src] >= p.partials_per_source or not self.budget.fits(src, n):
            victim = self._oldest(src) if self.budget.held(src) + n > p.per_source else None
            if victim is None and self._per_source[src] >= p.partials_per_source:
                victim = self._oldest(src)
            if victim is None:
                victim = next(iter(self._parts), None)
            if victim is None:
                return False
            self._drop(victim, self._parts[victim])
            self.counters["frag.drop.evicted"] += 1
        return True

    def _oldest(self, src: bytes) -> tuple[bytes, int] | None:
        return next((k for k in self._parts if k[0] == src), None)


def join_frame(joiner: Reassembler, frame: bytes, own_sid: bytes, now: float) -> bytes | None:
    """A DATA frame holding a fragment: None until its packet is complete, then one
    DATA frame (the last fragment's header) holding the whole packet. A frame for
    another node, or no fragment, is returned as it is."""
    if frame[2:34] != own_sid or not is_fragment(frame[DATA_HEADER_LEN:]):
        return frame
    joined = joiner.push(frame[34:66], frame[DATA_HEADER_LEN:], now)
    return None if joined is None else frame[:DATA_HEADER_LEN] + joined


__all__ = [
    "HEADER_LEN",
    "MAX_COUNT",
    "TYPE_FRAGMENT",
    "Reassembler",
    "ReassemblyParams",
    "is_fragment",
    "join_frame",
    "split",
]
