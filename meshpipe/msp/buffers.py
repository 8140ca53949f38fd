"""Stream byte buffers: the sender's retransmission store and the receiver's reassembly.

Both address bytes by absolute stream offset. Neither knows about segments on the
wire beyond (offset, bytes), which is what makes them easy to property-test.
``PeerBudget`` caps what all streams of one peer hold together (datagram fragments).
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass


class SendBuffer:
    """Bytes written but not yet acknowledged, addressed by stream offset.

    Released bytes are dropped by moving a head index; the bytearray is compacted
    only when the dead prefix is at least half of it, so releasing is amortised O(1)
    instead of a memmove of the whole buffer per ACK.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head = 0  # index in _buf of offset `base`
        self.base = 0  # lowest offset still held
        self.end = 0  # offset after the last byte written

    def __len__(self) -> int:
        return self.end - self.base

    def append(self, data: bytes) -> None:
        self._buf += data
        self.end += len(data)

    def get(self, offset: int, length: int) -> bytes:
        if offset < self.base or offset + length > self.end:
            raise IndexError(f"[{offset}, {offset + length}) is not held")
        i = self._head + offset - self.base
        return bytes(self._buf[i : i + length])

    def release(self, upto: int) -> None:
        """Forget every byte below ``upto``."""
        upto = min(upto, self.end)
        if upto <= self.base:
            return
        self._head += upto - self.base
        self.base = upto
        if self._head >= 65536 and self._head * 2 >= len(self._buf):
            del self._buf[: self._head]
            self._head = 0


@dataclass(frozen=True, slots=True)
class Gap:
    """Bytes [start, end) that will never be delivered (deadline mode)."""

    start: int
    end: int


class Reassembly:
    """Out-of-order bytes above ``next``, delivered in order once contiguous.

    Overlapping and duplicate inserts are trimmed to what is new, so a peer that
    resends differently cut segments (or lies) cannot make a byte appear twice.
    """

    def __init__(self, start: int = 0) -> None:
        self.next = start  # first offset not yet delivered
        self._starts: list[int] = []  # sorted starts of held pieces (non-overlapping)
        self._pieces: dict[int, bytes] = {}
        self.buffered = 0  # bytes held out of order

    def insert(self, offset: int, data: bytes) -> tuple[bytes, bool]:
        """Add bytes at ``offset``; returns (bytes now deliverable in order, was_duplicate)."""
        end = offset + len(data)
        if end <= self.next or not data:
            return b"", True
        if offset < self.next:
            data = data[self.next - offset :]
            offset = self.next
        new = False
        cur = offset
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0:
            s = self._starts[i]
            cur = max(cur, s + len(self._pieces[s]))
        j = i + 1
        while cur < end and j < len(self._starts) and self._starts[j] < end:
            s = self._starts[j]
            if s > cur:
                self._add(cur, data[cur - offset : s - offset])
                new = True
                j += 1  # the piece just added sits before s
            cur = max(cur, s + len(self._pieces[s]))
            j += 1
        if cur < end:
            self._add(cur, data[cur - offset :])
            new = True
        return self._pop_contiguous(), not new

    def _add(self, offset: int, data: bytes) -> None:
        bisect.insort(self._starts, offset)
        self._pieces[offset] = data
        self.buffered += len(data)

    def _pop_contiguous(self) -> bytes:
        if not self._starts or self._starts[0] != self.next:
            return b""
        out = []
        n = 0
        while n < len(self._starts) and self._starts[n] == self.next:
            piece = self._pieces.pop(self._starts[n])
            out.append(piece)
            self.next += len(piece)
            self.buffered -= len(piece)
            n += 1
        del self._starts[:n]
        return b"".join(out)

    def skip_to(self, offset: int) -> list[Gap | tuple[int, bytes]]:
        """Give up on everything missing below ``offset``.

        Returns, in stream order, the gaps skipped and the held ``(offset, bytes)``
        runs that become deliverable (including any contiguous run beyond ``offset``).
        """
        out: list[Gap | tuple[int, bytes]] = []
        while self.next < offset:
            if self._starts and self._starts[0] < offset:
                s = self._starts[0]
                if s > self.next:
                    out.append(Gap(self.next, s))
                    self.next = s
                at = self.next
                data = self._pop_contiguous()
                out.append((at, data))
            else:
                out.append(Gap(self.next, offset))
                self.next = offset
        at = self.next
        tail = self._pop_contiguous()
        if tail:
            out.append((at, tail))
        return out

    def first_held(self) -> int | None:
        """Offset of the lowest held piece (the end of the current gap)."""
        return self._starts[0] if self._starts else None

    def ranges(self, limit: int) -> list[tuple[int, int]]:
        """Up to ``limit`` merged [start, end) ranges held above ``next``, lowest first."""
        out: list[tuple[int, int]] = []
        for s in self._starts:
            e = s + len(self._pieces[s])
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], e)
            elif len(out) == limit:
                break
            else:
                out.append((s, e))
        return out

    def highest(self) -> int:
        """Offset after the highest byte held (``next`` if nothing is held)."""
        if not self._starts:
            return self.next
        s = self._starts[-1]
        return s + len(self._pieces[s])


class PeerBudget:
    """Bytes held on behalf of each peer, under a per-peer and an overall cap.

    What one peer sends and never completes (first fragments of datagrams whose
    rest never comes) fills its own share only: other peers' room is untouched,
    however many streams the peer opens.
    """

    def __init__(self, per_peer: int, total: int) -> None:
        if not 0 < per_peer <= total:
            raise ValueError("want 0 < per_peer <= total")
        self.per_peer = per_peer
        self.limit = total
        self.total = 0
        self._held: collections.Counter[bytes] = collections.Counter()

    def fits(self, peer: bytes, n: int) -> bool:
        return self._held[peer] + n <= self.per_peer and self.total + n <= self.limit

    def change(self, peer: bytes, delta: int) -> None:
        """Account ``delta`` bytes (negative: released) to ``peer``."""
        held = self._held[peer] + delta
        if held < 0:
            raise ValueError(f"peer budget would go negative ({held})")
        self.total += delta
        if held:
            self._held[peer] = held
        else:
            del self._held[peer]

    def held(self, peer: bytes) -> int:
        return self._held.get(peer, 0)

    def peers(self) -> int:
        return len(self._held)


__all__ = ["Gap", "PeerBudget", "Reassembly", "SendBuffer"]
