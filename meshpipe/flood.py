"""Pieces shared by the signed records that flood hop by hop (service and node records).

Both kinds travel as the same item, ``[body: bin, signature: bin 64, hops: u8]``: the
body is the origin's signed msgpack, ``hops`` (unsigned) is raised by each forwarder.
Both accept records from one origin through a token bucket, pack items into frames
under a byte budget and derive sequence numbers from the origin's wall clock, so a
restarted origin keeps issuing newer ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from meshpipe import wire
from meshpipe.errors import FrameError
from meshpipe.identity import SIG_LEN, Sid

SEQ_MAX = (1 << 63) - 1
MAX_ITEMS = 256  # per frame


class FloodedRecord(Protocol):
    """What the shared checks read of a record: who signed it, its seq, its expiry."""

    @property
    def origin(self) -> bytes: ...
    @property
    def seq(self) -> int: ...
    @property
    def expiry(self) -> int: ...


R = TypeVar("R", bound=FloodedRecord)


@dataclass(frozen=True, slots=True)
class SignedItem(Generic[R]):
    """A parsed record with the exact body its origin signed; subclasses set DOMAIN."""

    DOMAIN: ClassVar[bytes] = b""
    record: R
    body: bytes
    sig: bytes
    hops: int = 0  # hops travelled before the holder received it (0 at the origin)

    def item(self, hops: int | None = None) -> list[Any]:
        return [self.body, self.sig, self.hops if hops is None else min(255, hops)]

    def verify(self) -> bool:
        return Sid(bytes(self.record.origin)).verify(self.DOMAIN + self.body, self.sig)


def admit(cur: SignedItem[R] | None, new: SignedItem[R], wall: float, max_lifetime: float) -> str:
    """Whether ``new`` replaces ``cur`` (the cached record of the same key): ``"new"``,
    ``"duplicate"``, or why not: ``"forged"`` (bad signature), ``"conflict"`` (another
    validly signed body with the same seq), ``"stale"`` (an older seq: a replay),
    ``"expired"``, ``"bad_expiry"`` (further ahead than ``max_lifetime`` seconds). The
    signature is checked only when the answer depends on it."""
    if cur is not None and cur.record.seq == new.record.seq:
        if cur.body == new.body and cur.sig == new.sig:
            return "duplicate"
        return "conflict" if new.verify() else "forged"
    if cur is not None and new.record.seq < cur.record.seq:
        return "stale"
    if not new.verify():
        return "forged"
    if new.record.expiry <= wall:
        return "expired"
    if new.record.expiry > wall + max_lifetime:
        return "bad_expiry"
    return "new"


class FloodQueue:
    """Items waiting to be flooded, batched for ``delay`` seconds into few frames."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.items: list[list[Any]] = []
        self.at = math.inf

    def add(self, item: list[Any], now: float, immediate: bool = False) -> None:
        self.items.append(item)
        self.at = min(self.at, now if immediate else now + self.delay)

    @property
    def deadline(self) -> float:
        return self.at if self.items else math.inf

    def take(self, now: float, budget: int) -> list[list[list[Any]]]:
        """The queued items in groups of at most ``budget`` packed bytes, once due."""
        if not self.items or now < self.at:
            return []
        groups = pack_items(self.items, budget)
        self.items, self.at = [], math.inf
        return groups


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
    "FloodQueue",
    "FloodedRecord",
    "OriginBuckets",
    "SignedItem",
    "TokenBucket",
    "admit",
    "item_parts",
    "next_seq",
    "pack_items",
]
