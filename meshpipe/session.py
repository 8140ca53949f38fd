"""End-to-end sessions: Noise IK key agreement, counter-nonce transport, rekeying.

One session per pair of nodes. The handshake is ``Noise_IK_25519_ChaChaPoly_BLAKE2b``
with prologue ``b"meshpipe-session-v1"``. The responder's static key is the X25519
key derived from its SID, so the initiator needs nothing but the address; the
responder learns the initiator's static key from message 1 and checks that it
belongs to the SID the DATA frame claims as its source.

Wire formats (the whole payload of a routed DATA frame; all integers big-endian)::

    HANDSHAKE_INIT  1 | sender_index u32 | IK message 1 (108 bytes)          = 113
                    message 1's payload: a 12-byte timestamp (ns, big-endian)
    HANDSHAKE_RESP  2 | sender_index u32 | receiver_index u32 | IK message 2 = 57
                    (48 bytes, empty payload)
    TRANSPORT       3 | receiver_index u32 | counter u64 | ciphertext + 16-byte tag
                    AEAD: ChaCha20-Poly1305 keyed by the Noise split, nonce = counter,
                    associated data = the 13-byte header

Timestamps are ``epoch_ns + now * 1e9``, forced strictly increasing; ``epoch_ns`` is
the wall clock at start, so they keep increasing across restarts. A responder keeps
the greatest timestamp it accepted from each peer and ignores inits that are not
newer (replayed inits).

Key slots per peer (as in WireGuard): ``current`` (used to send), ``previous`` (kept
for decryption after a rotation, until it expires, so nothing in flight is lost) and
``next`` (a responder's fresh keys, used to send only once the initiator has proved
it holds them by sending a transport packet; the initiator sends a keepalive at once
when it has nothing queued). Keys live at most ``reject_after_time``.

Rekeying: when sending, the side that initiated the current keys starts a new
handshake after ``rekey_after_time``, the responder after ``rekey_after_time +
rekey_timeout``, either after ``rekey_after_messages`` packets. Crossing inits are
resolved by SID: the side with the lower SID keeps its own handshake and ignores the
peer's init; the other abandons its handshake and answers. A handshake is retried
with exponential backoff and jitter and abandoned after ``handshake_give_up``
(queued packets are dropped and counted).

Liveness: a side that sent data and heard nothing authenticated from the peer for
``keepalive_timeout + rekey_timeout`` starts a new handshake (the peer may have
restarted and lost its keys). A side that received data and sent nothing for
``keepalive_timeout`` sends an empty keepalive, so the peer's detector stays quiet.

Nothing here raises on input from the network: every bad packet is dropped and
counted, and no unauthenticated packet is ever answered, with one exception: a
transport packet from a peer we hold no keys for means that we restarted (a crypto
worker was restarted) while the peer kept its keys; rather than wait for the peer's
liveness timer, we start a handshake to the claimed source at once, at most once per
``rekey_timeout`` per peer and within a global rate (``session.handshake.restart_probe``).
The handshake goes to the claimed SID's own key, so a forged source gains nothing.
Handshake inits are rate limited per claimed source and globally before any
public-key operation.

Counters (``SessionManager.counters``, stable names):

* drops: ``session.drop.malformed``, ``.bad_tag``, ``.replay``, ``.unknown_index``,
  ``.forged_source``, ``.rate_limited``, ``.replayed_init`` (init timestamp not newer),
  ``.expired`` (keys past reject_after_time), ``.counter_limit``, ``.queue_full``,
  ``.handshake_timeout`` (queued packets dropped when a handshake gives up),
  ``.too_many_peers``, ``.bad_destination``, ``.too_large``, ``.internal_error``;
* handshakes: ``session.handshake.init_tx``, ``.retry``, ``.init_rx`` (accepted),
  ``.resp_tx``, ``.resp_rx`` (completed as initiator), ``.confirmed`` (completed as
  responder), ``.tie_won``, ``.tie_lost``, ``.failed``, ``.restart_probe``;
* ``session.established``, ``session.rekeyed``, ``session.expired``,
  ``session.peer_silent`` (the restart detector fired), ``session.queued``,
  ``session.keepalive.tx``, ``session.keepalive.rx``, ``session.tx.packets``,
  ``session.tx.bytes``, ``session.rx.packets``, ``session.rx.bytes``.

Events: ``session.established`` / ``session.rekeyed`` (peer, initiator),
``session.expired`` (peer), ``session.handshake_failed`` (peer, dropped),
``session.error`` (internal errors only).

Limitation: CPython cannot wipe key material; expired keys are dropped and left to
the garbage collector.
"""

from __future__ import annotations

import collections
import math
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshpipe.actions import Event
from meshpipe.errors import SidError
from meshpipe.identity import SID_LEN, Identity, Sid
from meshpipe.noise import (
    DHLEN,
    PROTOCOL_IK,
    TAGLEN,
    CipherState,
    HandshakeState,
    KeyPair,
    NoiseError,
)
from meshpipe.replay import DEFAULT_BLOCKS, ReplayWindow
from meshpipe.wire import DATA_HEADER_LEN

PROLOGUE = b"meshpipe-session-v1"

TYPE_INIT = 1
TYPE_RESP = 2
TYPE_TRANSPORT = 3

TIMESTAMP_LEN = 12
INIT_HEADER = struct.Struct("!BI")
RESP_HEADER = struct.Struct("!BII")
TRANSPORT_HEADER = struct.Struct("!BIQ")
TRANSPORT_HEADER_LEN = TRANSPORT_HEADER.size  # 13
# IK message 1: e, encrypted s + tag, encrypted timestamp + tag.
MSG1_LEN = DHLEN + (DHLEN + TAGLEN) + (TIMESTAMP_LEN + TAGLEN)  # 108
MSG2_LEN = DHLEN + TAGLEN  # e, empty payload + tag: 48
INIT_LEN = INIT_HEADER.size + MSG1_LEN  # 113
RESP_LEN = RESP_HEADER.size + MSG2_LEN  # 57
# Bytes a transport packet adds to its plaintext.
TRANSPORT_OVERHEAD = TRANSPORT_HEADER_LEN + TAGLEN  # 29
MAX_PLAINTEXT = 65535 - TRANSPORT_OVERHEAD


def max_plaintext(path_mtu: int) -> int:
    """Largest session plaintext that fits one DATA frame over ``path_mtu`` bytes."""
    return max(0, min(path_mtu - DATA_HEADER_LEN - TRANSPORT_OVERHEAD, MAX_PLAINTEXT))


@dataclass(frozen=True)
class SessionParams:
    rekey_after_time: float = 120.0
    reject_after_time: float = 180.0
    rekey_after_messages: int = 2**60
    # Hard limit on the send counter of one key (far below the Noise nonce limit).
    reject_after_messages: int = 2**64 - 2**13 - 1
    rekey_timeout: float = 5.0
    keepalive_timeout: float = 10.0
    handshake_retry_initial: float = 1.0
    handshake_retry_max: float = 8.0
    handshake_retry_jitter: float = 0.25  # up to this fraction of the interval is added
    handshake_give_up: float = 60.0
    max_queued: int = 64  # plaintexts held per peer while no key can send
    init_rate: float = 5.0  # handshake inits per second per claimed source
    init_burst: float = 10.0
    global_init_rate: float = 100.0  # handshake inits per second, all sources together
    global_init_burst: float = 200.0
    max_rate_sources: int = 4096  # per-source buckets remembered
    max_peers: int = 4096
    replay_blocks: int = DEFAULT_BLOCKS

    def __post_init__(self) -> None:
        if not 0 < self.rekey_after_messages <= self.reject_after_messages < 2**64 - 1:
            raise ValueError("need 0 < rekey_after_messages <= reject_after_messages < 2^64-1")
        if not 0 < self.rekey_after_time < self.reject_after_time:
            raise ValueError("need 0 < rekey_after_time < reject_after_time")
        if not 0 < self.handshake_retry_initial <= self.handshake_retry_max:
            raise ValueError("need 0 < handshake_retry_initial <= handshake_retry_max")
        for name in ("rekey_timeout", "keepalive_timeout", "handshake_give_up"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_queued < 0 or self.max_peers < 1 or self.max_rate_sources < 1:
            raise ValueError("queue and table limits must be positive")


# -- outputs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transmit:
    """Route ``payload`` (a session packet) to the node ``dst`` (NodeCore.send_data)."""

    dst: bytes
    payload: bytes


@dataclass(frozen=True, slots=True)
class Plaintext:
    """An authenticated, decrypted, non-replayed payload from ``src``."""

    src: bytes
    payload: bytes


SessionOut = Transmit | Plaintext | Event


# -- rate limiting ---------------------------------------------------------------------


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


# -- per-peer state --------------------------------------------------------------------


@dataclass(eq=False)
class _Keypair:
    peer: _Peer
    local_index: int
    remote_index: int
    send: CipherState
    recv: CipherState
    created: float
    initiator: bool
    replay: ReplayWindow
    send_counter: int = 0


@dataclass(eq=False)
class _Pending:
    """Our own handshake in progress (we are the initiator)."""

    peer: _Peer
    local_index: int
    hs: HandshakeState
    started: float  # first attempt (for giving up)
    sent_at: float  # latest attempt
    attempts: int
    next_retry: float


@dataclass(eq=False)
class _Peer:
    sid: Sid
    x25519: bytes
    current: _Keypair | None = None
    previous: _Keypair | None = None
    next: _Keypair | None = None
    pending: _Pending | None = None
    queue: collections.deque[bytes] = field(default_factory=collections.deque)
    keepalive_due: float | None = None
    unanswered_since: float | None = None
    established_at: float | None = None
    last_handshake: float | None = None
    rekeys: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    deadline: float = math.inf  # _peer_deadline, as of the last recompute

    def keypairs(self) -> list[_Keypair]:
        return [k for k in (self.previous, self.current, self.next) if k is not None]


# -- the manager -----------------------------------------------------------------------


class SessionManager:
    """All end-to-end sessions of one node. Sans-IO: every entry point takes ``now``.

    ``rng`` drives timer jitter; ``random_bytes`` (default ``os.urandom``) supplies
    ephemeral keys and session indexes. Give a seeded source only in tests.
    """

    def __init__(
        self,
        identity: Identity,
        now: float,
        rng: random.Random,
        epoch_ns: int,
        params: SessionParams | None = None,
        *,
        random_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        self.identity = identity
        self.sid: Sid = identity.sid
        self.params = params if params is not None else SessionParams()
        self.rng = rng
        self._random_bytes = random_bytes if random_bytes is not None else os.urandom
        self._static = KeyPair.from_private(identity.x25519_private())
        self._epoch_ns = int(epoch_ns)
        self._last_ts = -1
        self._now = now
        self.counters: collections.Counter[str] = collections.Counter()
        self._peers: dict[bytes, _Peer] = {}
        self._by_index: dict[int, _Keypair | _Pending] = {}
        self._init_ts: dict[bytes, int] = {}  # greatest accepted init timestamp per peer
        self._buckets: dict[bytes, TokenBucket] = {}
        self._global = TokenBucket(self.params.global_init_rate, self.params.global_init_burst, now)
        self._probe_bucket = TokenBucket(
            self.params.global_init_rate, self.params.global_init_burst, now
        )
        self._probed: dict[bytes, float] = {}  # peer -> last restart probe
        self._deadline = math.inf

    # -- public entry points -----------------------------------------------------------

    def send(self, dst: bytes, plaintext: bytes, now: float) -> list[SessionOut]:
        """Encrypt ``plaintext`` for ``dst``; start a handshake (and queue) if needed."""
        self._now = now
        out: list[SessionOut] = []
        dst = bytes(dst)
        peers = len(self._peers)
        try:
            self._send(dst, bytes(plaintext), now, out)
        except Exception as exc:  # a bug costs one packet, never the node
            self.counters["session.drop.internal_error"] += 1
            out.append(Event("session.error", {"error": repr(exc), "where": "send"}))
        self._update_deadline(dst, peers)
        return out

    def on_packet(self, src: bytes, data: bytes, now: float) -> list[SessionOut]:
        """A DATA payload for this node, claimed to come from ``src``."""
        self._now = now
        out: list[SessionOut] = []
        src = bytes(src)
        peers = len(self._peers)
        try:
            self._on_packet(src, bytes(data), now, out)
        except Exception as exc:
            self.counters["session.drop.internal_error"] += 1
            out.append(Event("session.error", {"error": repr(exc), "where": "on_packet"}))
        if data[:1] == bytes((TYPE_TRANSPORT,)):
            self._update_deadline(src, peers)
        else:  # handshakes are rare: look at every peer
            self._recompute_deadline()
        return out

    def on_timer(self, now: float) -> list[SessionOut]:
        self._now = now
        out: list[SessionOut] = []
        if now >= self._deadline:
            for peer in list(self._peers.values()):
                try:
                    self._tick_peer(peer, now, out)
                except Exception as exc:
                    self.counters["session.drop.internal_error"] += 1
                    out.append(Event("session.error", {"error": repr(exc), "where": "timer"}))
        self._recompute_deadline()
        return out

    def next_deadline(self) -> float:
        return self._deadline

    def has_session(self, dst: bytes) -> bool:
        """True when a packet to ``dst`` would be sent at once (not queued)."""
        peer = self._peers.get(bytes(dst))
        return peer is not None and self._can_send(peer.current, self._now)

    def sessions(self, now: float | None = None) -> list[dict[str, Any]]:
        """One JSON-ready record per peer with keys, a handshake or queued packets."""
        t = self._now if now is None else now
        rows: list[dict[str, Any]] = []
        for peer in self._peers.values():
            if not (peer.keypairs() or peer.pending or peer.queue):
                continue
            cur = peer.current
            if cur is not None and self._can_send(cur, t):
                state = "rekeying" if peer.pending is not None else "established"
            elif peer.pending is not None:
                state = "handshaking"
            elif peer.next is not None:
                state = "confirming"
            else:
                state = "idle"
            rows.append(
                {
                    "peer": str(peer.sid),
                    "short": peer.sid.short,
                    "state": state,
                    "initiator": cur.initiator if cur is not None else peer.pending is not None,
                    "age_s": None if peer.established_at is None else t - peer.established_at,
                    "last_handshake_s": (
                        None if peer.last_handshake is None else t - peer.last_handshake
                    ),
                    "rekeys": peer.rekeys,
                    "rx_packets": peer.rx_packets,
                    "rx_bytes": peer.rx_bytes,
                    "tx_packets": peer.tx_packets,
                    "tx_bytes": peer.tx_bytes,
                    "queued": len(peer.queue),
                }
            )
        rows.sort(key=lambda r: str(r["peer"]))
        return rows

    # -- sending -----------------------------------------------------------------------

    def _send(self, dst: bytes, plaintext: bytes, now: float, out: list[SessionOut]) -> None:
        if len(plaintext) > MAX_PLAINTEXT:
            self.counters["session.drop.too_large"] += 1
            return
        if dst == self.sid:
            self.counters["session.drop.bad_destination"] += 1
            return
        peer = self._peer(dst, now)
        if peer is None:
            return  # counted by _peer
        if self._can_send(peer.current, now) and not peer.queue:
            assert peer.current is not None
            self._seal(peer, peer.current, plaintext, now, out)
            return
        if len(peer.queue) >= self.params.max_queued:
            self.counters["session.drop.queue_full"] += 1
        else:
            peer.queue.append(plaintext)
            self.counters["session.queued"] += 1
        self._flush(peer, now, out)
        if peer.queue:
            self._maybe_handshake(peer, now, out)

    def _can_send(self, kp: _Keypair | None, now: float) -> bool:
        return (
            kp is not None
            and now < kp.created + self.params.reject_after_time
            and kp.send_counter < self.params.reject_after_messages
        )

    def _seal(
        self, peer: _Peer, kp: _Keypair, plaintext: bytes, now: float, out: list[SessionOut]
    ) -> None:
        counter = kp.send_counter
        kp.send_counter += 1
        header = TRANSPORT_HEADER.pack(TYPE_TRANSPORT, kp.remote_index, counter)
        out.append(
            Transmit(peer.sid, header + kp.send.encrypt_with_nonce(counter, header, plaintext))
        )
        peer.keepalive_due = None  # anything we send tells the peer we are alive
        if plaintext:
            peer.tx_packets += 1
            peer.tx_bytes += len(plaintext)
            self.counters["session.tx.packets"] += 1
            self.counters["session.tx.bytes"] += len(plaintext)
            if peer.unanswered_since is None:
                peer.unanswered_since = now
        else:
            self.counters["session.keepalive.tx"] += 1
        p = self.params
        if self._rekey_allowed(peer, now) and (
            kp.send_counter >= p.rekey_after_messages
            or now - kp.created >= p.rekey_after_time + (0.0 if kp.initiator else p.rekey_timeout)
        ):
            self._start_handshake(peer, now, out)

    def _rekey_allowed(self, peer: _Peer, now: float) -> bool:
        """No handshake running, and no fresh responder keys waiting to be confirmed."""
        nxt = peer.next
        return peer.pending is None and (
            nxt is None or now >= nxt.created + self.params.rekey_timeout
        )

    def _flush(self, peer: _Peer, now: float, out: list[SessionOut]) -> int:
        n = 0
        while peer.queue and self._can_send(peer.current, now):
            assert peer.current is not None
            self._seal(peer, peer.current, peer.queue.popleft(), now, out)
            n += 1
        return n

    def _maybe_handshake(self, peer: _Peer, now: float, out: list[SessionOut]) -> None:
        """Start a handshake unless one is running or fresh responder keys will do."""
        if peer.pending is not None:
            return
        nxt = peer.next
        if nxt is not None and now < nxt.created + self.params.rekey_timeout:
            return  # the initiator's first packet will confirm these keys soon
        self._start_handshake(peer, now, out)

    def _timestamp(self, now: float) -> int:
        ts = max(self._epoch_ns + int(now * 1e9), self._last_ts + 1, 0)
        self._last_ts = ts
        return ts

    def _new_index(self) -> int:
        while True:
            idx = int.from_bytes(self._random_bytes(4), "big")
            if idx and idx not in self._by_index:
                return idx

    def _ephemeral(self) -> KeyPair:
        return KeyPair.from_private(self._random_bytes(DHLEN))

    def _start_handshake(self, peer: _Peer, now: float, out: list[SessionOut]) -> None:
        old = peer.pending
        hs = HandshakeState(
            PROTOCOL_IK,
            True,
            prologue=PROLOGUE,
            s=self._static,
            e=self._ephemeral(),
            rs=peer.x25519,
        )
        ts = self._timestamp(now)
        msg = hs.write_message(ts.to_bytes(TIMESTAMP_LEN, "big"))
        if old is not None:
            self._by_index.pop(old.local_index, None)
        idx = self._new_index()
        attempts = 1 if old is None else old.attempts + 1
        p = self.params
        interval = min(p.handshake_retry_initial * 2 ** (attempts - 1), p.handshake_retry_max)
        interval *= 1.0 + p.handshake_retry_jitter * self.rng.random()
        pending = _Pending(
            peer=peer,
            local_index=idx,
            hs=hs,
            started=now if old is None else old.started,
            sent_at=now,
            attempts=attempts,
            next_retry=now + interval,
        )
        peer.pending = pending
        self._by_index[idx] = pending
        self.counters[
            "session.handshake.init_tx" if old is None else "session.handshake.retry"
        ] += 1
        out.append(Transmit(peer.sid, INIT_HEADER.pack(TYPE_INIT, idx) + msg))

    # -- receiving ---------------------------------------------------------------------

    def _on_packet(self, src: bytes, data: bytes, now: float, out: list[SessionOut]) -> None:
        if len(src) != SID_LEN or not data:
            self.counters["session.drop.malformed"] += 1
            return
        kind = data[0]
        if kind == TYPE_TRANSPORT:
            self._on_transport(src, data, now, out)
        elif kind == TYPE_INIT:
            self._on_init(src, data, now, out)
        elif kind == TYPE_RESP:
            self._on_resp(src, data, now, out)
        else:
            self.counters["session.drop.malformed"] += 1

    def _rate_ok(self, src: bytes, now: float) -> bool:
        b = self._buckets.pop(src, None)
        if b is None:
            if len(self._buckets) >= self.params.max_rate_sources:
                for k in [k for k, v in self._buckets.items() if v.full(now)]:
                    del self._buckets[k]
                while len(self._buckets) >= self.params.max_rate_sources:
                    del self._buckets[next(iter(self._buckets))]  # least recently used
            b = TokenBucket(self.params.init_rate, self.params.init_burst, now)
        self._buckets[src] = b  # (re)insert: most recently used last
        return b.take(now) and self._global.take(now)

    def _on_init(self, src: bytes, data: bytes, now: float, out: list[SessionOut]) -> None:
        if len(data) != INIT_LEN:
            self.counters["session.drop.malformed"] += 1
            return
        if not self._rate_ok(src, now):  # before any public-key operation
            self.counters["session.drop.rate_limited"] += 1
            return
        known = self._peers.get(src)
        try:
            sid = Sid(src)
            expected = known.x25519 if known is not None else sid.x25519_public()
        except SidError:
            self.counters["session.drop.forged_source"] += 1
            return
        if sid == self.sid:
            self.counters["session.drop.forged_source"] += 1
            return
        _, sender_index = INIT_HEADER.unpack_from(data)
        hs = HandshakeState(
            PROTOCOL_IK, False, prologue=PROLOGUE, s=self._static, e=self._ephemeral()
        )
        try:
            payload = hs.read_message(data[INIT_HEADER.size :])
        except NoiseError:
            self.counters["session.drop.bad_tag"] += 1
            return
        if hs.remote_static != expected:
            # Authentic Noise message, but its sender is not the node the frame names.
            self.counters["session.drop.forged_source"] += 1
            return
        if len(payload) != TIMESTAMP_LEN:  # unreachable: the length was checked
            self.counters["session.drop.malformed"] += 1
            return
        ts = int.from_bytes(payload, "big")
        if ts <= self._init_ts.get(src, -1):
            self.counters["session.drop.replayed_init"] += 1
            return
        peer = self._peer(src, now, x25519=expected)
        if peer is None:
            return
        self._init_ts.pop(src, None)
        self._init_ts[src] = ts
        limit = 2 * self.params.max_peers  # live peers never exceed half of it
        if len(self._init_ts) > limit:
            for k in list(self._init_ts):
                if len(self._init_ts) <= limit:
                    break
                if k not in self._peers:
                    del self._init_ts[k]
        # The init is authentic and fresh: the peer is alive.
        peer.unanswered_since = None
        pending = peer.pending
        if pending is not None:
            if self.sid < peer.sid:
                # Crossing inits: the lower SID keeps its own handshake. The peer will
                # answer ours; if ours looks lost, send it again now.
                self.counters["session.handshake.tie_won"] += 1
                if now - pending.sent_at >= self.params.handshake_retry_initial:
                    self._start_handshake(peer, now, out)
                return
            self.counters["session.handshake.tie_lost"] += 1
            self._by_index.pop(pending.local_index, None)
            peer.pending = None
        msg2 = hs.write_message(b"")
        send_cs, recv_cs = hs.transport()
        idx = self._new_index()
        kp = _Keypair(
            peer=peer,
            local_index=idx,
            remote_index=sender_index,
            send=send_cs,
            recv=recv_cs,
            created=now,
            initiator=False,
            replay=ReplayWindow(self.params.replay_blocks),
        )
        if peer.next is not None:
            self._by_index.pop(peer.next.local_index, None)
        peer.next = kp
        self._by_index[idx] = kp
        self.counters["session.handshake.init_rx"] += 1
        self.counters["session.handshake.resp_tx"] += 1
        out.append(Transmit(peer.sid, RESP_HEADER.pack(TYPE_RESP, idx, sender_index) + msg2))

    def _on_resp(self, src: bytes, data: bytes, now: float, out: list[SessionOut]) -> None:
        if len(data) != RESP_LEN:
            self.counters["session.drop.malformed"] += 1
            return
        _, sender_index, receiver_index = RESP_HEADER.unpack_from(data)
        pending = self._by_index.get(receiver_index)
        if not isinstance(pending, _Pending):
            self.counters["session.drop.unknown_index"] += 1
            return
        peer = pending.peer
        if src != peer.sid:
            self.counters["session.drop.forged_source"] += 1
            return
        try:
            pending.hs.read_message(data[RESP_HEADER.size :])
        except NoiseError:
            self.counters["session.drop.bad_tag"] += 1
            return
        send_cs, recv_cs = pending.hs.transport()
        kp = _Keypair(
            peer=peer,
            local_index=pending.local_index,
            remote_index=sender_index,
            send=send_cs,
            recv=recv_cs,
            created=now,
            initiator=True,
            replay=ReplayWindow(self.params.replay_blocks),
        )
        self._by_index[kp.local_index] = kp
        peer.pending = None
        self.counters["session.handshake.resp_rx"] += 1
        peer.unanswered_since = None
        self._install(peer, kp, now, out)
        if not self._flush(peer, now, out):
            self._seal(peer, kp, b"", now, out)  # confirms the keys to the responder

    def _install(self, peer: _Peer, kp: _Keypair, now: float, out: list[SessionOut]) -> None:
        """Make ``kp`` the current keys: current -> previous, drop the rest."""
        for old in (peer.previous, peer.next):
            if old is not None and old is not kp:
                self._by_index.pop(old.local_index, None)
        old_cur = peer.current
        peer.previous = old_cur
        peer.current = kp
        peer.next = None
        peer.last_handshake = now
        fields = {"peer": peer.sid.short, "initiator": kp.initiator}
        if old_cur is None or peer.established_at is None:
            peer.established_at = now
            self.counters["session.established"] += 1
            out.append(Event("session.established", fields))
        else:
            peer.rekeys += 1
            self.counters["session.rekeyed"] += 1
            out.append(Event("session.rekeyed", fields))

    def _on_transport(self, src: bytes, data: bytes, now: float, out: list[SessionOut]) -> None:
        if len(data) < TRANSPORT_OVERHEAD:
            self.counters["session.drop.malformed"] += 1
            return
        _, receiver_index, counter = TRANSPORT_HEADER.unpack_from(data)
        kp = self._by_index.get(receiver_index)
        if not isinstance(kp, _Keypair):
            self.counters["session.drop.unknown_index"] += 1
            self._restart_probe(src, now, out)
            return
        peer = kp.peer
        if src != peer.sid:
            self.counters["session.drop.forged_source"] += 1
            return
        p = self.params
        if now >= kp.created + p.reject_after_time:
            self.counters["session.drop.expired"] += 1
            return
        if counter >= p.reject_after_messages:
            self.counters["session.drop.counter_limit"] += 1
            return
        if not kp.replay.check(counter):  # cheap pre-filter; recorded only after auth
            self.counters["session.drop.replay"] += 1
            return
        header = data[:TRANSPORT_HEADER_LEN]
        try:
            plaintext = kp.recv.decrypt_with_nonce(counter, header, data[TRANSPORT_HEADER_LEN:])
        except NoiseError:
            self.counters["session.drop.bad_tag"] += 1
            return
        if not kp.replay.update(counter):
            self.counters["session.drop.replay"] += 1
            return
        peer.unanswered_since = None
        if kp is peer.next:  # the initiator proved it holds the keys
            self.counters["session.handshake.confirmed"] += 1
            self._install(peer, kp, now, out)
            self._flush(peer, now, out)
        if plaintext:
            peer.rx_packets += 1
            peer.rx_bytes += len(plaintext)
            self.counters["session.rx.packets"] += 1
            self.counters["session.rx.bytes"] += len(plaintext)
            if peer.keepalive_due is None:
                peer.keepalive_due = now + p.keepalive_timeout
            out.append(Plaintext(peer.sid, plaintext))
        else:
            self.counters["session.keepalive.rx"] += 1
        # An initiator that only receives must still rekey before its keys expire.
        if (
            kp is peer.current
            and kp.initiator
            and self._rekey_allowed(peer, now)
            and now - kp.created
            >= max(p.rekey_after_time, p.reject_after_time - p.keepalive_timeout - p.rekey_timeout)
        ):
            self._start_handshake(peer, now, out)

    def _restart_probe(self, src: bytes, now: float, out: list[SessionOut]) -> None:
        """The sender holds keys we lost: handshake now (see the module docstring)."""
        peer = self._peers.get(src)
        if peer is not None and (peer.current is not None or peer.pending is not None):
            return  # a stale packet of an old session, or a handshake is running
        last = self._probed.get(src)
        if last is not None and now < last + self.params.rekey_timeout:
            return
        if not self._probe_bucket.take(now):
            return
        peer = self._peer(src, now)
        if peer is None:
            return
        if len(self._probed) >= self.params.max_peers:
            self._probed.clear()
        self._probed[src] = now
        self.counters["session.handshake.restart_probe"] += 1
        self._start_handshake(peer, now, out)

    # -- peers and timers --------------------------------------------------------------

    def _peer(self, sid_bytes: bytes, now: float, x25519: bytes | None = None) -> _Peer | None:
        peer = self._peers.get(sid_bytes)
        if peer is not None:
            return peer
        if len(self._peers) >= self.params.max_peers:
            self._gc_peers()
            if len(self._peers) >= self.params.max_peers:
                self.counters["session.drop.too_many_peers"] += 1
                return None
        try:
            sid = Sid(sid_bytes)
            key = x25519 if x25519 is not None else sid.x25519_public()
        except SidError:  # not a SID, or not a point on the curve
            self.counters["session.drop.bad_destination"] += 1
            return None
        peer = _Peer(sid=sid, x25519=key)
        self._peers[sid_bytes] = peer
        return peer

    def _gc_peers(self) -> None:
        for k in [k for k, p in self._peers.items() if self._idle(p)]:
            del self._peers[k]

    @staticmethod
    def _idle(peer: _Peer) -> bool:
        return not (peer.keypairs() or peer.pending or peer.queue)

    def _tick_peer(self, peer: _Peer, now: float, out: list[SessionOut]) -> None:
        p = self.params
        # Keys past their lifetime are forgotten (forward secrecy).
        for slot in ("previous", "current", "next"):
            kp: _Keypair | None = getattr(peer, slot)
            if kp is not None and now >= kp.created + p.reject_after_time:
                self._by_index.pop(kp.local_index, None)
                setattr(peer, slot, None)
                if slot == "current":
                    peer.established_at = None
                    self.counters["session.expired"] += 1
                    out.append(Event("session.expired", {"peer": peer.sid.short}))
        pending = peer.pending
        if pending is not None and now >= pending.next_retry:
            if now >= pending.started + p.handshake_give_up:
                self._by_index.pop(pending.local_index, None)
                peer.pending = None
                dropped = len(peer.queue)
                peer.queue.clear()
                self.counters["session.handshake.failed"] += 1
                self.counters["session.drop.handshake_timeout"] += dropped
                out.append(
                    Event("session.handshake_failed", {"peer": peer.sid.short, "dropped": dropped})
                )
            else:
                self._start_handshake(peer, now, out)
        if peer.queue and not self._can_send(peer.current, now):
            self._maybe_handshake(peer, now, out)
        if peer.unanswered_since is not None and now >= peer.unanswered_since + (
            p.keepalive_timeout + p.rekey_timeout
        ):
            # We sent data and heard nothing authenticated back: the peer may have
            # restarted and lost its keys. Handshake again.
            peer.unanswered_since = None
            self.counters["session.peer_silent"] += 1
            if peer.pending is None:
                self._start_handshake(peer, now, out)
        if peer.keepalive_due is not None and now >= peer.keepalive_due:
            peer.keepalive_due = None
            if self._can_send(peer.current, now):
                assert peer.current is not None
                self._seal(peer, peer.current, b"", now, out)
        if self._idle(peer):
            del self._peers[bytes(peer.sid)]

    def _peer_deadline(self, peer: _Peer) -> float:
        p = self.params
        d = math.inf
        for kp in peer.keypairs():
            d = min(d, kp.created + p.reject_after_time)
        if peer.pending is not None:
            d = min(d, peer.pending.next_retry)
        elif peer.queue and not self._can_send(peer.current, self._now):
            # Waiting for fresh responder keys to be confirmed, else handshake at once.
            d = min(d, self._now if peer.next is None else peer.next.created + p.rekey_timeout)
        if peer.unanswered_since is not None:
            d = min(d, peer.unanswered_since + (p.keepalive_timeout + p.rekey_timeout))
        if peer.keepalive_due is not None:
            d = min(d, peer.keepalive_due)
        return d

    def _recompute_deadline(self) -> None:
        d = math.inf
        for p in self._peers.values():
            p.deadline = self._peer_deadline(p)
            d = min(d, p.deadline)
        self._deadline = d

    def _update_deadline(self, sid: bytes, peers_before: int) -> None:
        """After a send or a packet that touched only peer ``sid``: O(1) instead of a
        scan of every peer per packet, unless peers came or went or the earliest
        deadline moved later."""
        peer = self._peers.get(sid)
        if peer is None or len(self._peers) != peers_before:
            self._recompute_deadline()
            return
        old, peer.deadline = peer.deadline, self._peer_deadline(peer)
        if peer.deadline <= self._deadline:
            self._deadline = peer.deadline
        elif old <= self._deadline:  # it was (one of) the earliest: look again
            self._recompute_deadline()


__all__ = [
    "INIT_LEN",
    "MAX_PLAINTEXT",
    "PROLOGUE",
    "RESP_LEN",
    "TRANSPORT_HEADER_LEN",
    "TRANSPORT_OVERHEAD",
    "TYPE_INIT",
    "TYPE_RESP",
    "TYPE_TRANSPORT",
    "Plaintext",
    "SessionManager",
    "SessionOut",
    "SessionParams",
    "TokenBucket",
    "Transmit",
    "max_plaintext",
]
