"""Neighbour discovery and link quality, sans-IO.

Every interface sends a signed HELLO every hello interval. A hello names its
sender (SID), the sender's boot epoch, a per-interface hello seqno, the sender's
timestamp and hello interval, and one IHU ("I hear you") entry per neighbour the
sender knows on that interface::

    frame  = kind byte + msgpack [body: bin, signature: bin 64]
    body   = msgpack [sid, epoch, seqno, timestamp_us, interval_ms, [ihu, ...]]
    ihu    = [neighbour sid, neighbour epoch, rxq 0..255, echo_ts_us, hold_us]

The signature is Ed25519 by the sender's key over ``HELLO_DOMAIN + body`` (the
domain prefix keeps a hello signature from being valid as anything else), so the
SID a link address claims is authenticated. A hello too big for the MTU is split
into several frames with the same seqno, each signed; receivers treat the copies
as duplicates for loss accounting and read every IHU. Replays are refused: a hello
with an older seqno than the newest heard, a copy of the current one arriving more
than half an interval late, or an old hello of a neighbour dropped for silence
(its last seqno is remembered for an hour) counts as stale, not as a sign of life.
A neighbour dropped for silence that comes back (same epoch, newer seqno) resumes
its hello history: the hellos it missed meanwhile count as missed, so a lossy link
that times out now and then does not come back looking perfect (a fresh history of
one hello heard of one expected would cost 256 and pull routes onto it).

Link quality (Babel-style, RFC 8966 appendix A):

* receive quality ``p_in``: hellos heard among the last 16 expected, from the
  hello seqno history (a hello not heard 1.5 intervals after the previous one is
  counted missing, then one more per interval);
* transmit quality ``p_out``: the neighbour's ``rxq`` about us from its IHU; it
  only counts when the IHU names our current epoch, and lapses after the
  neighbour timeout;
* a neighbour not heard for the neighbour timeout (or 3.5 of its own hello
  intervals, if it announces a slower one) is dropped;
* RTT: the IHU echoes our last hello timestamp and how long the neighbour held it,
  so ``rtt = now - echo - hold`` on our own clock; smoothed with gain 1/8.

Link cost (ETX-like, lower is better)::

    cost = round(256 / (p_in * p_out) + clamp((srtt_ms - 50) / 8, 0, 64))

capped at INFINITY (0xFFFF = unusable); a link with p_in or p_out of 0 (no
bidirectional contact yet, or the neighbour stopped hearing us) costs INFINITY.
A perfect link costs 256; RTT below 50 ms adds nothing, so ordinary LAN and
simulator jitter does not make routes flap.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from meshpipe import wire
from meshpipe.actions import LinkAddr
from meshpipe.errors import FrameError, MeshpipeError
from meshpipe.identity import SID_LEN, SIG_LEN, Identity, Sid

HELLO_DOMAIN = b"meshpipe-hello-v1"
INFINITY = 0xFFFF
HISTORY_LEN = 16
HISTORY_MASK = (1 << HISTORY_LEN) - 1
RXQ_MAX = 255
HELLO_SEQNO_MOD = 1 << 16
TS_MOD = 1 << 32
MAX_IHUS = 255
MIN_INTERVAL_MS = 10
MAX_INTERVAL_MS = 600_000
RTT_FREE_MS = 50.0  # RTT below this costs nothing
RTT_SLOPE = 8.0  # ms of RTT per unit of cost above RTT_FREE_MS
RTT_MAX_PENALTY = 64
MAX_RTT_SAMPLE_US = 10_000_000  # anything larger is a stale or bogus echo
TOMBSTONE_TIME = 3600.0  # how long the last seqno of a dropped neighbour is remembered
DEFAULT_MAX_NEIGHBOURS = 256  # per interface
TOMBSTONES_PER_NEIGHBOUR = 4  # tombstones kept: this many times the neighbour cap

NeighbourKey = tuple[int, LinkAddr]


class BadSignature(FrameError):
    """A well-formed hello whose signature does not verify."""


class NeighbourTableFull(MeshpipeError):
    """A hello from a new (interface, address) on an interface whose neighbour table is
    at its cap: refused unverified; neighbours already held are never evicted for it."""


def timestamp_us(now: float) -> int:
    """Our clock as 32-bit wrapping microseconds (only differences are used)."""
    return int(now * 1_000_000) % TS_MOD


@dataclass(frozen=True, slots=True)
class Ihu:
    sid: bytes
    epoch: int
    rxq: int
    echo_ts: int
    hold_us: int

    def as_list(self) -> list[object]:
        return [self.sid, self.epoch, self.rxq, self.echo_ts, self.hold_us]


@dataclass(frozen=True, slots=True)
class Hello:
    sid: Sid
    epoch: int
    seqno: int
    timestamp: int
    interval_ms: int
    ihus: tuple[Ihu, ...] = ()


@dataclass(frozen=True, slots=True)
class SignedHello:
    hello: Hello
    body: bytes
    signature: bytes
    copy: bool = False  # a unicast copy of a multicast hello (KIND_HELLO_COPY)

    def verify(self) -> bool:
        return self.hello.sid.verify(HELLO_DOMAIN + self.body, self.signature)


def _hello_body(hello: Hello, ihus: list[list[object]]) -> bytes:
    return wire.pack_body(
        [bytes(hello.sid), hello.epoch, hello.seqno, hello.timestamp, hello.interval_ms, ihus]
    )


def encode_hello(identity: Identity, hello: Hello) -> bytes:
    """One signed hello frame (no MTU splitting; see split_hello)."""
    body = _hello_body(hello, [i.as_list() for i in hello.ihus])
    return wire.encode_control(wire.KIND_HELLO, [body, identity.sign(HELLO_DOMAIN + body)])


def split_hello(identity: Identity, hello: Hello, mtu: int) -> list[bytes]:
    """Signed hello frames of at most ``mtu`` bytes that together carry every IHU."""
    empty = encode_hello(
        identity, Hello(hello.sid, hello.epoch, hello.seqno, hello.timestamp, hello.interval_ms)
    )
    # 8 bytes of slack: array and bin headers grow by a few bytes as the body grows.
    budget = mtu - len(empty) - 8
    frames: list[bytes] = []
    chunk: list[Ihu] = []
    used = 0
    for ihu in hello.ihus:
        size = len(wire.pack_body(ihu.as_list()))
        if chunk and (used + size > budget or len(chunk) >= MAX_IHUS):
            frames.append(_encode_part(identity, hello, chunk))
            chunk, used = [], 0
        chunk.append(ihu)
        used += size
    if chunk or not frames:
        frames.append(_encode_part(identity, hello, chunk))
    return frames


def _encode_part(identity: Identity, hello: Hello, ihus: list[Ihu]) -> bytes:
    return encode_hello(
        identity,
        Hello(hello.sid, hello.epoch, hello.seqno, hello.timestamp, hello.interval_ms, tuple(ihus)),
    )


def decode_hello(frame: bytes) -> SignedHello:
    """Parse and strictly validate a hello frame (the signature is checked separately)."""
    kind = wire.frame_kind(frame)
    if kind != wire.KIND_HELLO and kind != wire.KIND_HELLO_COPY:
        raise FrameError("not a hello frame")
    outer = wire.expect_record(wire.decode_control(frame), 2, "hello")
    body, sig = outer
    if not isinstance(body, bytes):
        raise FrameError("hello body: want bytes")
    sig = wire.expect_bytes(sig, SIG_LEN, "hello signature")
    fields = wire.expect_record(wire.unpack_body(body), 6, "hello body")
    sid = Sid(wire.expect_bytes(fields[0], SID_LEN, "hello sid"))
    epoch = wire.expect_int(fields[1], 0, TS_MOD - 1, "hello epoch")
    seqno = wire.expect_int(fields[2], 0, HELLO_SEQNO_MOD - 1, "hello seqno")
    ts = wire.expect_int(fields[3], 0, TS_MOD - 1, "hello timestamp")
    interval = wire.expect_int(fields[4], MIN_INTERVAL_MS, MAX_INTERVAL_MS, "hello interval")
    ihus: list[Ihu] = []
    for raw in wire.expect_list(fields[5], MAX_IHUS, "hello ihus"):
        item = wire.expect_record(raw, 5, "ihu")
        ihus.append(
            Ihu(
                sid=wire.expect_bytes(item[0], SID_LEN, "ihu sid"),
                epoch=wire.expect_int(item[1], 0, TS_MOD - 1, "ihu epoch"),
                rxq=wire.expect_int(item[2], 0, RXQ_MAX, "ihu rxq"),
                echo_ts=wire.expect_int(item[3], 0, TS_MOD - 1, "ihu echo"),
                hold_us=wire.expect_int(item[4], 0, TS_MOD - 1, "ihu hold"),
            )
        )
    hello = Hello(sid, epoch, seqno, ts, interval, tuple(ihus))
    return SignedHello(hello, body, sig, kind == wire.KIND_HELLO_COPY)


@dataclass(eq=False)
class Neighbour:
    """One (interface, link address) we hear hellos from, and the SID it proved."""

    iface: int
    addr: LinkAddr
    sid: Sid
    epoch: int
    interval: float  # the neighbour's own hello interval, seconds
    last_heard: float
    last_seqno: int  # advanced by missed hellos too
    seq_at: float  # when last_seqno was first heard (or given up as missed)
    heard_seqno: int  # the newest seqno really heard
    their_ts: int  # timestamp of its last hello, echoed back in our IHU
    their_ts_at: float  # when we received that hello
    expect_at: float  # the next hello is counted missing if not heard by then
    history: int = 1
    history_len: int = 1
    txq: int = 0  # its reception of our hellos, 0..255, from its IHU
    ihu_at: float = -math.inf
    srtt_ms: float | None = None
    cost: int = INFINITY
    multicast_at: float = -math.inf  # when a multicast hello (not a copy) was last heard

    @property
    def key(self) -> NeighbourKey:
        return (self.iface, self.addr)

    @property
    def p_in(self) -> float:
        return (self.history & HISTORY_MASK).bit_count() / self.history_len

    @property
    def p_out(self) -> float:
        return self.txq / RXQ_MAX

    def compute_cost(self) -> int:
        p = self.p_in * self.p_out
        if p <= 0.0:
            return INFINITY
        penalty = 0.0
        if self.srtt_ms is not None:
            penalty = min(RTT_MAX_PENALTY, max(0.0, (self.srtt_ms - RTT_FREE_MS) / RTT_SLOPE))
        return min(INFINITY, round(256.0 / p + penalty))

    def record_seqno(self, seqno: int, now: float) -> None:
        gap = (seqno - self.last_seqno) % HELLO_SEQNO_MOD
        if gap == 0 or gap >= HELLO_SEQNO_MOD // 2:
            return  # a duplicate (split hello, multicast + unicast copy) or a late one
        if gap > HISTORY_LEN:
            self.history = 1
        else:
            self.history = ((self.history << gap) | 1) & HISTORY_MASK
        self.history_len = min(HISTORY_LEN, self.history_len + gap)
        self.last_seqno = self.heard_seqno = seqno
        self.seq_at = now

    def record_miss(self, now: float) -> None:
        self.history = (self.history << 1) & HISTORY_MASK
        self.history_len = min(HISTORY_LEN, self.history_len + 1)
        self.last_seqno = (self.last_seqno + 1) % HELLO_SEQNO_MOD
        self.seq_at = now  # that hello may still straggle in a moment late


@dataclass(slots=True)
class Tombstone:
    """What is remembered of a neighbour dropped for silence."""

    seqno: int  # the last hello seqno really heard
    at: float  # when it was dropped
    history: int
    history_len: int
    srtt_ms: float | None

    def resume(self, nb: Neighbour, seqno: int, now: float) -> None:
        """Carry the old history into ``nb`` (just made from hello ``seqno``)."""
        nb.history, nb.history_len, nb.srtt_ms = self.history, self.history_len, self.srtt_ms
        nb.last_seqno = self.seqno
        nb.record_seqno(seqno, now)  # the gap since the last one heard counts as missed


@dataclass
class HelloResult:
    """What one accepted hello changed."""

    neighbour: Neighbour
    new: bool = False  # first hello from this (iface, addr)
    restarted: bool = False  # same SID, new epoch: the neighbour rebooted
    replaced: Neighbour | None = None  # another SID used to live at this address
    cost_changed: bool = False
    became_usable: bool = False  # cost went from INFINITY to finite
    own: bool = False  # our own hello looped back (multicast loopback)


@dataclass
class TickResult:
    dropped: list[Neighbour] = field(default_factory=list)
    cost_changed: list[Neighbour] = field(default_factory=list)


class NeighbourTable:
    """Neighbours on every interface, keyed by (iface, link address) and indexed by SID."""

    def __init__(
        self,
        identity: Identity,
        n_ifaces: int,
        *,
        hello_interval: float,
        neighbour_timeout: float,
        epoch: int,
        rng: random.Random,
        iface_hello_intervals: Sequence[float] = (),
        iface_timeouts: Sequence[float] = (),
        max_neighbours: int = DEFAULT_MAX_NEIGHBOURS,
    ) -> None:
        self.identity = identity
        self.max_neighbours = max_neighbours
        self._per_iface = [0] * n_ifaces
        self.max_tombstones = TOMBSTONES_PER_NEIGHBOUR * max_neighbours * max(1, n_ifaces)
        self.sid = identity.sid
        self.hello_interval = hello_interval
        self.neighbour_timeout = neighbour_timeout
        # Per-interface overrides (a slow radio says hello less often than a LAN).
        self.iface_hello_intervals = tuple(iface_hello_intervals)
        self.iface_timeouts = tuple(iface_timeouts)
        self.epoch = epoch % TS_MOD
        self.by_key: dict[NeighbourKey, Neighbour] = {}
        self.by_sid: dict[bytes, dict[NeighbourKey, Neighbour]] = {}
        # Random start so a neighbour cannot confuse our seqnos with a previous boot's.
        self.seqno = [rng.randrange(HELLO_SEQNO_MOD) for _ in range(n_ifaces)]
        # (sid, epoch) of neighbours dropped for silence: a replay of their old hellos
        # must not bring them back, and a real return resumes their link history.
        self.tombstones: dict[tuple[bytes, int], Tombstone] = {}

    def __iter__(self) -> Iterator[Neighbour]:
        return iter(self.by_key.values())

    def __len__(self) -> int:
        return len(self.by_key)

    def hello_interval_of(self, iface: int) -> float:
        if iface < len(self.iface_hello_intervals):
            return self.iface_hello_intervals[iface]
        return self.hello_interval

    def on_iface(self, iface: int) -> list[Neighbour]:
        return [n for n in self.by_key.values() if n.iface == iface]

    # -- sending ---------------------------------------------------------------------

    def build_hello(self, iface: int, now: float, mtu: int, advance: bool = True) -> list[bytes]:
        """Hello frames for ``iface``; ``advance=False`` repeats the last seqno (an extra
        hello to a new neighbour must not look like a missed one to the others)."""
        if advance:
            self.seqno[iface] = (self.seqno[iface] + 1) % HELLO_SEQNO_MOD
        ihus = tuple(
            Ihu(
                sid=bytes(n.sid),
                epoch=n.epoch,
                rxq=round(n.p_in * RXQ_MAX),
                echo_ts=n.their_ts,
                hold_us=min(TS_MOD - 1, max(0, int((now - n.their_ts_at) * 1_000_000))),
            )
            for n in self.on_iface(iface)
        )
        hello = Hello(
            sid=self.sid,
            epoch=self.epoch,
            seqno=self.seqno[iface],
            timestamp=timestamp_us(now),
            interval_ms=max(MIN_INTERVAL_MS, round(self.hello_interval_of(iface) * 1000)),
            ihus=ihus,
        )
        return split_hello(self.identity, hello, mtu)

    # -- receiving -------------------------------------------------------------------

    def on_hello(self, iface: int, src: LinkAddr, frame: bytes, now: float) -> HelloResult | None:
        """Account one hello frame; None if it is a stale copy (see below).

        Raises FrameError (malformed), BadSignature or NeighbourTableFull.
        """
        signed = decode_hello(frame)
        h = signed.hello
        key: NeighbourKey = (iface, src)
        if (
            key not in self.by_key
            and h.sid != self.sid
            and self._per_iface[iface] >= self.max_neighbours
        ):
            raise NeighbourTableFull(f"{self.max_neighbours} neighbours on interface {iface}")
        if not signed.verify():
            raise BadSignature(f"hello from {src!r} with a bad signature for {h.sid.short}")
        if h.sid == self.sid:
            # Our own multicast looped back (or someone replaying it): never a neighbour.
            return HelloResult(neighbour=_new_neighbour(iface, src, h, now), own=True)
        nb = self.by_key.get(key)
        replaced: Neighbour | None = None
        restarted = False
        if nb is not None and nb.sid != h.sid:
            replaced, nb = nb, None
            self._remove(replaced)
        if nb is not None and nb.epoch != h.epoch:
            self._remove(nb)
            restarted, nb = True, None
        if nb is None:
            tomb = self.tombstones.get((bytes(h.sid), h.epoch))
            if tomb is not None:
                if not 0 < (h.seqno - tomb.seqno) % HELLO_SEQNO_MOD < HELLO_SEQNO_MOD // 2:
                    return None
                del self.tombstones[(bytes(h.sid), h.epoch)]
            nb = _new_neighbour(iface, src, h, now)
            counted = True
            if tomb is not None:
                tomb.resume(nb, h.seqno, now)
            self.by_key[key] = nb
            self._per_iface[iface] += 1
            self.by_sid.setdefault(bytes(nb.sid), {})[key] = nb
            new = True
        else:
            new = False
            gap = (h.seqno - nb.last_seqno) % HELLO_SEQNO_MOD
            # Copies of the current hello (split parts, multicast + unicast) arrive
            # within moments of each other; an old seqno or a much later copy is a
            # replay or a reordered straggler, and must not keep a dead link alive.
            if gap >= HELLO_SEQNO_MOD // 2 or (gap == 0 and now - nb.seq_at > nb.interval / 2):
                return None
            # While we hear this neighbour's multicast hellos the history counts those
            # only (one frame per hello, as data frames are sent); a unicast copy is
            # then a sign of life and an IHU, not a second chance for the hello.
            counted = not (signed.copy and now - nb.multicast_at <= HISTORY_LEN * nb.interval)
            if counted:
                nb.record_seqno(h.seqno, now)
        if not signed.copy:
            nb.multicast_at = now
        result = HelloResult(
            neighbour=nb, new=new and not restarted, restarted=restarted, replaced=replaced
        )
        nb.last_heard = now
        if counted:
            nb.interval = h.interval_ms / 1000.0
            nb.their_ts = h.timestamp
            nb.their_ts_at = now
            nb.expect_at = now + 1.5 * nb.interval
        self._read_ihus(nb, h, now)
        old = nb.cost
        nb.cost = nb.compute_cost()
        result.cost_changed = nb.cost != old or new
        result.became_usable = nb.cost < INFINITY and (old >= INFINITY or new)
        return result

    def _read_ihus(self, nb: Neighbour, h: Hello, now: float) -> None:
        """Take our transmit quality and an RTT sample from the IHU about us."""
        for ihu in h.ihus:
            if ihu.sid == self.sid and ihu.epoch == self.epoch:
                nb.txq = ihu.rxq
                nb.ihu_at = now
                rtt_us = (timestamp_us(now) - ihu.echo_ts) % TS_MOD - ihu.hold_us
                if 0 <= rtt_us <= MAX_RTT_SAMPLE_US:
                    sample = rtt_us / 1000.0
                    srtt = nb.srtt_ms
                    nb.srtt_ms = sample if srtt is None else srtt + (sample - srtt) / 8
                return

    # -- time ------------------------------------------------------------------------

    def timeout_of(self, nb: Neighbour) -> float:
        # A neighbour configured with slower hellos than ours gets 3.5 of its own
        # intervals, so mixed configurations do not flap.
        base = self.neighbour_timeout
        if nb.iface < len(self.iface_timeouts):
            base = self.iface_timeouts[nb.iface]
        return max(base, 3.5 * nb.interval)

    def tick(self, now: float) -> TickResult:
        """Count missed hellos, lapse stale IHUs, drop silent neighbours."""
        res = TickResult()
        for k in [k for k, t in self.tombstones.items() if now >= t.at + TOMBSTONE_TIME]:
            del self.tombstones[k]
        for nb in list(self.by_key.values()):
            timeout = self.timeout_of(nb)
            if now >= nb.last_heard + timeout:
                self._remove(nb)
                self.tombstones[(bytes(nb.sid), nb.epoch)] = Tombstone(
                    nb.heard_seqno, now, nb.history, nb.history_len, nb.srtt_ms
                )
                if len(self.tombstones) > self.max_tombstones:
                    # Oldest first (insertion order): fresh keys that come and go
                    # must not grow this without bound.
                    del self.tombstones[next(iter(self.tombstones))]
                res.dropped.append(nb)
                continue
            while now >= nb.expect_at:
                nb.record_miss(now)
                nb.expect_at += nb.interval
            if nb.txq and now >= nb.ihu_at + timeout:
                nb.txq = 0  # it has stopped telling us it hears us
            old = nb.cost
            nb.cost = nb.compute_cost()
            if nb.cost != old:
                res.cost_changed.append(nb)
        return res

    def next_deadline(self) -> float:
        t = math.inf
        for nb in self.by_key.values():
            timeout = self.timeout_of(nb)
            t = min(t, nb.last_heard + timeout, nb.expect_at)
            if nb.txq:
                t = min(t, nb.ihu_at + timeout)
        return t

    def _remove(self, nb: Neighbour) -> None:
        if self.by_key.pop(nb.key, None) is not None:
            self._per_iface[nb.iface] -= 1
        peers = self.by_sid.get(bytes(nb.sid))
        if peers is not None:
            peers.pop(nb.key, None)
            if not peers:
                del self.by_sid[bytes(nb.sid)]


def _new_neighbour(iface: int, src: LinkAddr, h: Hello, now: float) -> Neighbour:
    interval = h.interval_ms / 1000.0
    return Neighbour(
        iface=iface,
        addr=src,
        sid=h.sid,
        epoch=h.epoch,
        interval=interval,
        last_heard=now,
        last_seqno=h.seqno,
        seq_at=now,
        heard_seqno=h.seqno,
        their_ts=h.timestamp,
        their_ts_at=now,
        expect_at=now + 1.5 * interval,
    )
