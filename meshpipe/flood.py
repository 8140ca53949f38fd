"""Pieces shared by the signed records that flood hop by hop (service and node records).

Both kinds travel as the same item, ``[body: bin, signature: bin 64, hops: u8]``: the
body is the origin's signed msgpack, ``hops`` (unsigned) is raised by each forwarder.
Both accept records from one origin through a token bucket, pack items into frames
under a byte budget and derive sequence numbers from the origin's wall clock, so a
restarted origin keeps issuing newer ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshpipe import wire
from meshpipe.errors import FrameError
from meshpipe.identity import SIG_LEN

SEQ_MAX = (1 << 63) - 1
MAX_ITEMS = 256  # per frame


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` spends one if there is one."""

    tokens: float
    at: float

    def take(self, now: float, rate: float, burst: float) -> bool:
        self.tokens = min(burst, self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class OriginBuckets:
    """One token bucket per origin, the least recently used forgotten past ``limit``."""

    def __init__(self, rate: float, burst: float, limit: int) -> None:
        self.rate, self.burst, self.limit = rate, burst, limit
        self.buckets: dict[bytes, TokenBucket] = {}

    def take(self, origin: bytes, now: float) -> bool:
        b = self.buckets.pop(origin, None)
        if b is None:
            b = TokenBucket(self.burst, now)
            while len(self.buckets) >= self.limit:
                del self.buckets[next(iter(self.buckets))]
        self.buckets[origin] = b  # most recently used last
        return b.take(now, self.rate, self.burst)


def item_parts(raw: Any) -> tuple[bytes, bytes, int]:
    """The raw pieces of an item (FrameError when damaged); the body is not yet parsed,
    so the caller can report an oversize body apart from damage."""
    f = wire.expect_record(raw, 3, "record item")
    if not isinstance(f[0], bytes):
        raise FrameError("record body: want bytes")
    return (
        f[0],
        wire.expect_bytes(f[1], SIG_LEN, "record signature"),
        wire.expect_int(f[2], 0, 255, "record hops"),
    )


def pack_items(items: list[list[Any]], budget: int) -> list[list[list[Any]]]:
    """Split items into groups whose packed size stays within ``budget`` bytes."""
    groups: list[list[list[Any]]] = []
    cur: list[list[Any]] = []
    used = 0
    for it in items:
        size = len(wire.pack_body(it))
        if cur and (used + size > budget or len(cur) >= MAX_ITEMS):
            groups.append(cur)
            cur, used = [], 0
        cur.append(it)
        used += size
    if cur:
        groups.append(cur)
    return groups


def next_seq(last: int, wall: float) -> int:
    """The next sequence number after ``last``: milliseconds of wall clock, or last + 1."""
    return min(SEQ_MAX, max(last + 1, int(wall * 1000)))


__all__ = [
    "MAX_ITEMS",
    "SEQ_MAX",
    "OriginBuckets",
    "TokenBucket",
    "item_parts",
    "next_seq",
    "pack_items",
]
