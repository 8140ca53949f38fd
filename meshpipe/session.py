"""End-to-end sessions: Noise IK key agreement, counter-nonce transport, rekeying.

One session per pair of nodes. The handshake is ``Noise_IK_25519_ChaChaPoly_BLAKE2b``
with prologue ``b"meshpipe-session-v1"``. The responder's static key is the X25519
key derived from its SID, so the initiator needs nothing but the address; the
responder learns the initiator's static key from message 1 and checks that it
belongs to the SID the DATA frame claims as its source.

Wire formats (the whole payload of a routed DATA frame; all integers big-endian)::

    HANDSHAKE_INIT  1 | sender_index u32 | IK message 1 (108 bytes)          = 113
                    message 1's payload: a 12-byte timestamp (ns, big-endian)
                    extended form: the same 113 bytes | rekey_mac 16 | cookie_mac 16
                    = 145; rekey_mac = MAC(rekey key of a live session, first 113
                    bytes) or zeros; cookie_mac = MAC(cookie, first 129 bytes) or zeros
    COOKIE_REPLY    4 | receiver_index u32 (the INIT's sender_index) | cookie 16 |
                    tag 16 = 37; tag = MAC(H("mp-cookie-bind", the INIT's first 113
                    bytes), the first 21 bytes)
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

Handshake floods (after WireGuard's cookies). MAC = keyed BLAKE2b, 16 bytes; H =
BLAKE2b-256 with a personalisation. Every init is sorted into one of three budgets
before any public-key operation:

1. **Rekey**: rekey_mac verifies under the rekey key of a live keypair with the
   claimed source (rekey key = H("mp-rekey-mac", key i->r | key r->i), which only the
   two ends hold): the peer's own bucket (``init_rate``). Junk claiming a peer's SID
   cannot touch it, so rekeys of live sessions never starve; a replayed rekey init
   (same MAC as one of the last 8) spends nothing.
2. **Cookie**: cookie_mac verifies under the cookie we would give the claimed
   source (cookie = MAC(secret, source SID); the secret rotates every
   ``cookie_secret_lifetime``, the one before is still accepted): a per-source
   cookie bucket and a global cookie budget (``cookie_init_rate``) of their own.
3. **Plain** (no valid MAC, or an older node's 113-byte init): the per-source
   bucket, then the global budget (``global_init_rate``). When that runs dry the
   node is *under load* for ``load_hold``: plain inits are then answered with a
   cookie reply (within ``cookie_reply_rate``, and only to a SID with a route, as
   the restart probe) instead of a handshake. The reply is routed to the claimed
   SID, so a node that makes up source SIDs never gets one.

Per-source buckets are kept per claimed SID *and* ingress (the interface and link
address, when the caller gives one), so junk claiming a node's SID on another link
cannot spend that node's own budget.

An initiator that gets a cookie reply bound to its latest INIT keeps the cookie for
``cookie_secret_lifetime - rekey_timeout`` and sends the INIT again at once with
cookie_mac. The MAC fields go only where they can be read: with a cookie, or for a
rekey (the peer has a live session with us) to a peer not known as an older
version; while that is unknown every other attempt is the plain 113-byte form, and a
peer that answers only the plain form is remembered as older (``legacy``). Older
nodes still interoperate: their inits are plain; they drop COOKIE_REPLY as malformed.

Handshakes an outsider can make us hold (responder keys of a peer we have no live
session with, awaiting its confirmation; restart probes) are capped at
``max_handshakes``, plain ones (no cookie) in half of it: past that, new ones are
refused (``.too_many_handshakes``; a plain one gets a cookie reply, so a reachable
node still gets in through the other half) and the held ones are never evicted for
newcomers; unconfirmed responder keys of such a peer are dropped after
``half_open_timeout``.

Counters (``SessionManager.counters``, stable names):

* drops: ``session.drop.malformed``, ``.bad_tag``, ``.replay``, ``.unknown_index``,
  ``.forged_source``, ``.rate_limited``, ``.replayed_init`` (init timestamp not newer),
  ``.expired`` (keys past reject_after_time), ``.counter_limit``, ``.queue_full``,
  ``.handshake_timeout`` (queued packets dropped when a handshake gives up),
  ``.too_many_peers``, ``.bad_destination``, ``.too_large``, ``.internal_error``;
  under a flood: ``.cookie_required`` (plain init under load: a cookie reply instead),
  ``.cookie_unroutable`` (no reply: no route to the claimed SID),
  ``.cookie_reply_limited``, ``.rate_limited_cookie``, ``.rate_limited_rekey``,
  ``.too_many_handshakes``, ``.probe_unroutable``;
* handshakes: ``session.handshake.init_tx``, ``.retry``, ``.init_rx`` (accepted),
  ``.resp_tx``, ``.resp_rx`` (completed as initiator), ``.confirmed`` (completed as
  responder), ``.tie_won``, ``.tie_lost``, ``.failed``, ``.restart_probe``,
  ``.cookie_tx``, ``.cookie_rx``, ``.cookie_ok`` / ``.cookie_bad`` (an init's
  cookie_mac), ``.rekey_mac_ok`` / ``.rekey_mac_bad``, ``.half_open_expired``;
* ``session.under_load`` (times the plain budget ran dry after a quiet spell);
* ``session.established``, ``session.rekeyed``, ``session.expired``,
  ``session.peer_silent`` (the restart detector fired), ``session.queued``,
  ``session.keepalive.tx``, ``session.keepalive.rx``, ``session.tx.packets``,
  ``session.tx.bytes``, ``session.rx.packets``, ``session.rx.bytes``.

Events: ``session.established`` / ``session.rekeyed`` (peer, initiator),
``session.expired`` (peer), ``session.handshake_failed`` (peer, dropped),
``session.error`` (internal errors only); rate-limited to one per reason per
``log_interval`` (with ``suppressed``, the count held back since the last one):
``session.under_load``, ``session.handshake_refused`` (reason: the drop counter's
last part).

Limitation: CPython cannot wipe key material; expired keys are dropped and left to
the garbage collector.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import math
import os
import random
import struct
from collections.abc import Callable, Hashable
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
from meshpipe.ratelimit import LogLimiter, TokenBucket
from meshpipe.replay import DEFAULT_BLOCKS, ReplayWindow
from meshpipe.wire import DATA_HEADER_LEN

PROLOGUE = b"meshpipe-session-v1"

TYPE_INIT = 1
TYPE_RESP = 2
TYPE_TRANSPORT = 3
TYPE_COOKIE = 4

TIMESTAMP_LEN = 12
INIT_HEADER = struct.Struct("!BI")
RESP_HEADER = struct.Struct("!BII")
TRANSPORT_HEADER = struct.Struct("!BIQ")
TRANSPORT_HEADER_LEN = TRANSPORT_HEADER.size  # 13
# IK message 1: e, encrypted s + tag, encrypted timestamp + tag.
MSG1_LEN = DHLEN + (DHLEN + TAGLEN) + (TIMESTAMP_LEN + TAGLEN)  # 108
MSG2_LEN = DHLEN + TAGLEN  # e, empty payload + tag: 48
INIT_LEN = INIT_HEADER.size + MSG1_LEN  # 113
MAC_LEN = 16
INIT_EXT_LEN = INIT_LEN + 2 * MAC_LEN  # 145: + rekey_mac + cookie_mac
COOKIE_HEADER = struct.Struct("!BI")
COOKIE_LEN = COOKIE_HEADER.size + 2 * MAC_LEN  # 37: type, receiver_index, cookie, tag
_NO_MAC = bytes(MAC_LEN)
RESP_LEN = RESP_HEADER.size + MSG2_LEN  # 57
# Bytes a transport packet adds to its plaintext.
TRANSPORT_OVERHEAD = TRANSPORT_HEADER_LEN + TAGLEN  # 29
MAX_PLAINTEXT = 65535 - TRANSPORT_OVERHEAD
# A sealed packet may be larger than one frame when it travels in fragments
# (meshpipe/fragments.py: a whole 64 kB tunnel message, sealed once).
MAX_PACKET = 2 * 65535
MAX_SEALED_PLAINTEXT = MAX_PACKET - TRANSPORT_OVERHEAD


def max_plaintext(path_mtu: int) -> int:
    """Largest session plaintext that fits one DATA frame over ``path_mtu`` bytes (a
    path MTU above 64 kB: one packet in fragments, see MAX_PACKET)."""
    return max(0, min(path_mtu - DATA_HEADER_LEN - TRANSPORT_OVERHEAD, MAX_SEALED_PLAINTEXT))


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
    # Under load (the global budget above ran dry within load_hold), an init without a
    # valid cookie is answered with a cookie reply instead of a handshake.
    load_hold: float = 1.0
    cookie_secret_lifetime: float = 120.0  # the responder's cookie secret rotates this often
    cookie_init_rate: float = 100.0  # inits with a valid cookie: their own global budget
    cookie_init_burst: float = 200.0
    cookie_reply_rate: float = 1000.0  # cookie replies per second (CPU and egress)
    cookie_reply_burst: float = 500.0
    # Handshake state an outsider can make us hold (responder keys awaiting
    # confirmation from a node we have no session with, restart probes).
    max_handshakes: int = 1024
    half_open_timeout: float = 15.0  # unconfirmed responder keys of a new peer are dropped
    log_interval: float = 10.0  # rate-limited log events: at most one per reason per interval

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
        for name in ("load_hold", "cookie_secret_lifetime", "half_open_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if (
            self.max_queued < 0
            or self.max_peers < 1
            or self.max_rate_sources < 1
            or self.max_handshakes < 1
        ):
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


# -- MACs ------------------------------------------------------------------------------


def _mac(key: bytes, data: bytes) -> bytes:
    """Keyed BLAKE2b, 16 bytes: the cookie, the init's MACs, the cookie reply's tag."""
    return hashlib.blake2b(data, key=key, digest_size=MAC_LEN).digest()


def _derive(person: bytes, data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32, person=person).digest()


def _rekey_key(i2r: CipherState, r2i: CipherState) -> bytes:
    """What both ends of a session can MAC a rekey init with (and nobody else)."""
    k1, k2 = i2r.key, r2i.key
    assert k1 is not None and k2 is not None
    return _derive(b"mp-rekey-mac", k1 + k2)


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
    rekey_key: bytes
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
    init: bytes  # the latest INIT's first INIT_LEN bytes: a cookie reply is bound to them
    extended: bool  # the latest INIT carried the MAC fields
    cookie: bytes | None  # the cookie it carried
    extended_tried: bool  # some attempt of this handshake was extended


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
    # Cookies (see the module docstring): the responder's latest cookie for us.
    cookie: bytes | None = None
    cookie_at: float = -math.inf
    v2: bool = False  # it sent us a cookie reply or an extended init: it knows the fields
    legacy: bool = False  # it answered only a plain init to a rekey: an older version
    rekey_bucket: TokenBucket | None = None  # its rekey-MAC'd inits
    rekey_macs: collections.deque[bytes] = field(
        default_factory=lambda: collections.deque(maxlen=8)
    )

    def keypairs(self) -> list[_Keypair]:
        return [k for k in (self.previous, self.current, self.next) if k is not None]


@dataclass(eq=False)
class _Source:
    """Init limits per claimed source SID: plain inits and cookie inits apart, so
    junk under a SID cannot spend the budget of the node that owns it and can
    receive its cookies."""

    plain: TokenBucket
    cookie: TokenBucket | None = None
    cookie_macs: collections.deque[bytes] = field(
        default_factory=lambda: collections.deque(maxlen=8)
    )


# -- the manager -----------------------------------------------------------------------


class SessionManager:
    """All end-to-end sessions of one node. Sans-IO: every entry point takes ``now``.

    ``rng`` drives timer jitter; ``random_bytes`` (default ``os.urandom``) supplies
    ephemeral keys, session indexes and cookie secrets. Give a seeded source only in
    tests. ``routable(sid)`` (default: every SID) says whether a packet to ``sid`` can
    leave at all: cookie replies and restart probes are spent only on those.
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
        routable: Callable[[bytes], bool] | None = None,
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
        p = self.params
        self._routable = routable
        self._buckets: dict[Hashable, _Source] = {}  # by claimed source (and ingress)
        self._global = TokenBucket(p.global_init_rate, p.global_init_burst, now)
        self._probe_bucket = TokenBucket(p.global_init_rate, p.global_init_burst, now)
        self._cookie_inits = TokenBucket(p.cookie_init_rate, p.cookie_init_burst, now)
        self._cookie_replies = TokenBucket(p.cookie_reply_rate, p.cookie_reply_burst, now)
        self._load_until = -math.inf
        self._secret: bytes | None = None  # the cookie secret, made on first use
        self._old_secret: bytes | None = None
        self._secret_at = -math.inf
        # Handshakes outsiders made us start (SessionParams.max_handshakes), each
        # marked plain (no cookie vouched for it) or not; plain ones get half the room.
        self._half_open: dict[bytes, bool] = {}
        self._half_open_plain = 0
        self._log = LogLimiter(p.log_interval)
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

    def on_packet(
        self, src: bytes, data: bytes, now: float, ingress: Hashable = None
    ) -> list[SessionOut]:
        """A DATA payload for this node, claimed to come from ``src``. ``ingress`` (the
        interface and link address it came in by, if known) keys the per-source init
        limits together with ``src``: junk that claims a node's SID on another link
        cannot spend that node's own budget."""
        self._now = now
        out: list[SessionOut] = []
        src = bytes(src)
        peers = len(self._peers)
        try:
            self._on_packet(src, bytes(data), now, out, ingress)
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
        if len(plaintext) > MAX_SEALED_PLAINTEXT:
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
        base = INIT_HEADER.pack(TYPE_INIT, idx) + msg
        packet, cookie = self._init_fields(peer, base, attempts, now)
        extended = len(packet) == INIT_EXT_LEN
        pending = _Pending(
            peer=peer,
            local_index=idx,
            hs=hs,
            started=now if old is None else old.started,
            sent_at=now,
            attempts=attempts,
            next_retry=now + interval,
            init=base,
            extended=extended,
            cookie=cookie,
            extended_tried=extended or (old is not None and old.extended_tried),
        )
        peer.pending = pending
        self._by_index[idx] = pending
        self.counters[
            "session.handshake.init_tx" if old is None else "session.handshake.retry"
        ] += 1
        out.append(Transmit(peer.sid, packet))

    def _init_fields(
        self, peer: _Peer, base: bytes, attempts: int, now: float
    ) -> tuple[bytes, bytes | None]:
        """The INIT to send (plain, or with rekey_mac and cookie_mac) and its cookie.

        The MAC fields go only to a responder that can read them: one whose cookie we
        hold, or one with live keys (a rekey) that has not shown itself to be an
        older version; while unknown, every other attempt is plain.
        """
        cookie = peer.cookie
        if cookie is not None and now >= peer.cookie_at + self._cookie_life():
            cookie = peer.cookie = None
        rekey_key = None
        cur = peer.current
        if self._can_send(cur, now):
            assert cur is not None
            rekey_key = cur.rekey_key
        if cookie is None and (
            rekey_key is None or peer.legacy or (not peer.v2 and attempts % 2 == 0)
        ):
            return base, None
        rekey_mac = _NO_MAC if rekey_key is None else _mac(rekey_key, base)
        cookie_mac = _NO_MAC if cookie is None else _mac(cookie, base + rekey_mac)
        return base + rekey_mac + cookie_mac, cookie

    def _cookie_life(self) -> float:
        # A cookie stays valid at the responder for at least one secret lifetime.
        p = self.params
        return max(p.cookie_secret_lifetime - p.rekey_timeout, p.cookie_secret_lifetime / 2)

    # -- receiving ---------------------------------------------------------------------

    def _on_packet(
        self, src: bytes, data: bytes, now: float, out: list[SessionOut], ingress: Hashable
    ) -> None:
        if len(src) != SID_LEN or not data:
            self.counters["session.drop.malformed"] += 1
            return
        kind = data[0]
        if kind == TYPE_TRANSPORT:
            self._on_transport(src, data, now, out)
        elif kind == TYPE_INIT:
            self._on_init(src, data, now, out, ingress)
        elif kind == TYPE_RESP:
            self._on_resp(src, data, now, out)
        elif kind == TYPE_COOKIE:
            self._on_cookie(src, data, now, out)
        else:
            self.counters["session.drop.malformed"] += 1

    # -- init admission (see "Handshake floods" in the module docstring) ----------------

    def _source(self, key: Hashable, now: float) -> _Source:
        st = self._buckets.pop(key, None)
        if st is None:
            if len(self._buckets) >= self.params.max_rate_sources:
                for k in [k for k, v in self._buckets.items() if v.plain.full(now)]:
                    del self._buckets[k]
                while len(self._buckets) >= self.params.max_rate_sources:
                    del self._buckets[next(iter(self._buckets))]  # least recently used
            st = _Source(TokenBucket(self.params.init_rate, self.params.init_burst, now))
        self._buckets[key] = st  # (re)insert: most recently used last
        return st

    def _refuse(self, out: list[SessionOut], reason: str, now: float) -> None:
        """Count a refused init and log it, at most once per reason per interval."""
        self.counters[f"session.drop.{reason}"] += 1
        ev = self._log.event(reason, "session.handshake_refused", now, {"reason": reason})
        if ev is not None:
            out.append(ev)

    def _under_load(self, now: float, out: list[SessionOut]) -> bool:
        """Spends the plain budget; under load from the moment it runs dry until
        ``load_hold`` after it last did."""
        if not self._global.take(now):
            if now >= self._load_until:
                self.counters["session.under_load"] += 1
                ev = self._log.event("load", "session.under_load", now, {})
                if ev is not None:
                    out.append(ev)
            self._load_until = now + self.params.load_hold
        return now < self._load_until

    def _secrets(self, now: float) -> tuple[bytes, bytes | None]:
        life = self.params.cookie_secret_lifetime
        if self._secret is None or now >= self._secret_at + life:
            fresh = self._secret is not None and now < self._secret_at + 2 * life
            self._old_secret = self._secret if fresh else None
            self._secret = self._random_bytes(32)
            self._secret_at = now
        return self._secret, self._old_secret

    def _cookie_ok(self, src: bytes, data: bytes, now: float) -> bool:
        """Does the init's cookie_mac hold a cookie we gave ``src`` (this secret or the
        one before)?"""
        signed, cookie_mac = data[: INIT_LEN + MAC_LEN], data[INIT_LEN + MAC_LEN :]
        for secret in self._secrets(now):
            if secret is not None and hmac.compare_digest(
                _mac(_mac(secret, src), signed), cookie_mac
            ):
                return True
        return False

    def _rekey_ok(self, peer: _Peer | None, data: bytes, now: float) -> bool:
        """Is the init's rekey_mac made with the keys of a live session with ``peer``?"""
        if peer is None:
            return False
        rekey_mac = data[INIT_LEN : INIT_LEN + MAC_LEN]
        base = data[:INIT_LEN]
        return any(
            now < kp.created + self.params.reject_after_time
            and hmac.compare_digest(_mac(kp.rekey_key, base), rekey_mac)
            for kp in peer.keypairs()
        )

    def _admit(
        self, src: bytes, data: bytes, now: float, out: list[SessionOut], ingress: Hashable
    ) -> str | None:
        """Which budget an init comes out of, before any public-key operation:

        1. a rekey_mac made with a live session's keys: the peer's own bucket;
        2. a valid cookie_mac: the source's cookie bucket and the cookie budget;
        3. otherwise (plain): the source's bucket, then the global budget; under
           load it gets a cookie reply instead.
        """
        peer = self._peers.get(src)
        extended = len(data) == INIT_EXT_LEN
        # Each refusal below is counted.
        if extended and data[INIT_LEN : INIT_LEN + MAC_LEN] != _NO_MAC:
            if self._rekey_ok(peer, data, now):
                assert peer is not None
                mac = data[INIT_LEN : INIT_LEN + MAC_LEN]
                if mac in peer.rekey_macs:  # a replayed rekey init spends nothing
                    self.counters["session.drop.replayed_init"] += 1
                    return None
                peer.rekey_macs.append(mac)
                if peer.rekey_bucket is None:
                    peer.rekey_bucket = TokenBucket(
                        self.params.init_rate, self.params.init_burst, now
                    )
                if not peer.rekey_bucket.take(now):
                    self._refuse(out, "rate_limited_rekey", now)
                    return None
                self.counters["session.handshake.rekey_mac_ok"] += 1
                return "rekey"
            self.counters["session.handshake.rekey_mac_bad"] += 1
        st = self._source(src if ingress is None else (src, ingress), now)
        if extended and data[INIT_LEN + MAC_LEN :] != _NO_MAC:
            if self._cookie_ok(src, data, now):
                mac = data[INIT_LEN + MAC_LEN :]
                if mac in st.cookie_macs:
                    self.counters["session.drop.replayed_init"] += 1
                    return None
                st.cookie_macs.append(mac)
                if st.cookie is None:
                    st.cookie = TokenBucket(self.params.init_rate, self.params.init_burst, now)
                if not (st.cookie.take(now) and self._cookie_inits.take(now)):
                    self._refuse(out, "rate_limited_cookie", now)
                    return None
                self.counters["session.handshake.cookie_ok"] += 1
                return "cookie"
            self.counters["session.handshake.cookie_bad"] += 1  # old secret: a new cookie
        if not st.plain.take(now):
            self._refuse(out, "rate_limited", now)
            return None
        if self._under_load(now, out):
            self.counters["session.drop.cookie_required"] += 1
            self._send_cookie(src, data, now, out)
            return None
        return "plain"

    def _send_cookie(self, src: bytes, data: bytes, now: float, out: list[SessionOut]) -> None:
        """Answer an init with a cookie for its claimed source, routed to that SID: a
        node that only claims a SID never gets it."""
        if self._routable is not None and not self._routable(src):
            self.counters["session.drop.cookie_unroutable"] += 1
            return
        if not self._cookie_replies.take(now):
            self._refuse(out, "cookie_reply_limited", now)
            return
        secret, _ = self._secrets(now)
        _, sender_index = INIT_HEADER.unpack_from(data)
        body = COOKIE_HEADER.pack(TYPE_COOKIE, sender_index) + _mac(secret, src)
        tag = _mac(_derive(b"mp-cookie-bind", data[:INIT_LEN]), body)
        self.counters["session.handshake.cookie_tx"] += 1
        out.append(Transmit(src, body + tag))

    def _our_pending(self, src: bytes, receiver_index: int) -> _Pending | None:
        """Our handshake that an answer from ``src`` names, or None (counted)."""
        pending = self._by_index.get(receiver_index)
        if not isinstance(pending, _Pending):
            self.counters["session.drop.unknown_index"] += 1
            return None
        if src != pending.peer.sid:
            self.counters["session.drop.forged_source"] += 1
            return None
        return pending

    def _on_cookie(self, src: bytes, data: bytes, now: float, out: list[SessionOut]) -> None:
        """A cookie reply to our latest INIT: keep the cookie and send the INIT again
        with it at once (the responder is under load)."""
        if len(data) != COOKIE_LEN:
            self.counters["session.drop.malformed"] += 1
            return
        _, receiver_index = COOKIE_HEADER.unpack_from(data)
        pending = self._our_pending(src, receiver_index)
        if pending is None:
            return
        peer = pending.peer
        body, tag = data[: COOKIE_HEADER.size + MAC_LEN], data[COOKIE_HEADER.size + MAC_LEN :]
        # Only a node that saw our INIT can make this tag.
        if not hmac.compare_digest(_mac(_derive(b"mp-cookie-bind", pending.init), body), tag):
            self.counters["session.drop.bad_tag"] += 1
            return
        cookie = body[COOKIE_HEADER.size :]
        self.counters["session.handshake.cookie_rx"] += 1
        peer.cookie, peer.cookie_at = cookie, now
        peer.v2, peer.legacy = True, False
        if pending.cookie != cookie:  # else it is stale: the timer retries
            self._start_handshake(peer, now, out)

    def _on_init(
        self, src: bytes, data: bytes, now: float, out: list[SessionOut], ingress: Hashable
    ) -> None:
        if len(data) not in (INIT_LEN, INIT_EXT_LEN):
            self.counters["session.drop.malformed"] += 1
            return
        if src == self.sid:
            self.counters["session.drop.forged_source"] += 1
            return
        tier = self._admit(src, data, now, out, ingress)
        if tier is None:
            return
        known = self._peers.get(src)
        try:
            sid = Sid(src)
            expected = known.x25519 if known is not None else sid.x25519_public()
        except SidError:
            self.counters["session.drop.forged_source"] += 1
            return
        new_peer = known is None or not self._can_send(known.current, now)
        if new_peer and not self._admit_half_open(src, now, plain=tier == "plain"):
            self._refuse(out, "too_many_handshakes", now)
            if tier == "plain":  # a cookie would give it the other half of the room
                self._send_cookie(src, data, now, out)
            return
        _, sender_index = INIT_HEADER.unpack_from(data)
        hs = HandshakeState(
            PROTOCOL_IK, False, prologue=PROLOGUE, s=self._static, e=self._ephemeral()
        )
        try:
            payload = hs.read_message(data[INIT_HEADER.size : INIT_LEN])
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
        if len(data) == INIT_EXT_LEN:
            peer.v2, peer.legacy = True, False
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
            rekey_key=_rekey_key(recv_cs, send_cs),
        )
        if peer.next is not None:
            self._by_index.pop(peer.next.local_index, None)
        peer.next = kp
        self._by_index[idx] = kp
        if new_peer:
            self._hold_half_open(src, plain=tier == "plain")
        self.counters["session.handshake.init_rx"] += 1
        self.counters["session.handshake.resp_tx"] += 1
        out.append(Transmit(peer.sid, RESP_HEADER.pack(TYPE_RESP, idx, sender_index) + msg2))

    def _on_resp(self, src: bytes, data: bytes, now: float, out: list[SessionOut]) -> None:
        if len(data) != RESP_LEN:
            self.counters["session.drop.malformed"] += 1
            return
        _, sender_index, receiver_index = RESP_HEADER.unpack_from(data)
        pending = self._our_pending(src, receiver_index)
        if pending is None:
            return
        peer = pending.peer
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
            rekey_key=_rekey_key(send_cs, recv_cs),
        )
        self._by_index[kp.local_index] = kp
        peer.pending = None
        if pending.extended:
            peer.v2, peer.legacy = True, False
        elif pending.extended_tried and not peer.v2:
            peer.legacy = True  # it answered only the plain form: an older version
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
        self._release_half_open(bytes(peer.sid))
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
        if self._routable is not None and not self._routable(src):
            self.counters["session.drop.probe_unroutable"] += 1
            return
        if not self._probe_bucket.take(now):
            return
        if not self._admit_half_open(src, now, plain=True):
            self._refuse(out, "too_many_handshakes", now)
            return
        peer = self._peer(src, now)
        if peer is None:
            return
        self._hold_half_open(src, plain=True)
        if len(self._probed) >= self.params.max_peers:
            self._probed.clear()
        self._probed[src] = now
        self.counters["session.handshake.restart_probe"] += 1
        self._start_handshake(peer, now, out)

    def _admit_half_open(self, src: bytes, now: float, plain: bool) -> bool:
        """Room for one more handshake an outsider made us start (max_handshakes;
        plain ones in half of it)? Entries already held are never evicted for a
        newcomer: a full table refuses until they complete or time out."""
        cap = self.params.max_handshakes
        plain_cap = max(1, cap // 2)
        if src in self._half_open:
            return True
        if len(self._half_open) >= cap or (plain and self._half_open_plain >= plain_cap):
            for k in list(self._half_open):
                if not self._is_half_open(self._peers.get(k), now):
                    self._release_half_open(k)
        return len(self._half_open) < cap and not (plain and self._half_open_plain >= plain_cap)

    def _hold_half_open(self, src: bytes, plain: bool) -> None:
        self._release_half_open(src)
        self._half_open[src] = plain
        self._half_open_plain += plain

    def _release_half_open(self, src: bytes) -> None:
        if self._half_open.pop(src, False):
            self._half_open_plain -= 1

    def _is_half_open(self, peer: _Peer | None, now: float) -> bool:
        return (
            peer is not None
            and not self._can_send(peer.current, now)
            and (peer.next is not None or peer.pending is not None)
        )

    def handshakes_in_progress(self) -> int:
        """Entries in the bounded table of handshakes outsiders can start."""
        return len(self._half_open)

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
        nxt = peer.next
        if nxt is not None and peer.current is None and now >= nxt.created + p.half_open_timeout:
            # Never confirmed by a node we had no session with: forget it (bounds
            # what a stream of valid inits from fresh keys can make us hold).
            self._by_index.pop(nxt.local_index, None)
            peer.next = None
            self._release_half_open(bytes(peer.sid))
            self.counters["session.handshake.half_open_expired"] += 1
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
            self._release_half_open(bytes(peer.sid))

    def _peer_deadline(self, peer: _Peer) -> float:
        p = self.params
        d = math.inf
        for kp in peer.keypairs():
            d = min(d, kp.created + p.reject_after_time)
        if peer.next is not None and peer.current is None:
            d = min(d, peer.next.created + p.half_open_timeout)
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
    "COOKIE_LEN",
    "INIT_EXT_LEN",
    "INIT_LEN",
    "MAC_LEN",
    "MAX_PACKET",
    "MAX_PLAINTEXT",
    "MAX_SEALED_PLAINTEXT",
    "PROLOGUE",
    "RESP_LEN",
    "TRANSPORT_HEADER_LEN",
    "TRANSPORT_OVERHEAD",
    "TYPE_COOKIE",
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
