"""A deterministic in-process mesh simulator: fake clock, fault-injecting links.

The protocol core is sans-IO (see DESIGN.md): every entry point takes ``now`` and
returns actions. :class:`SimMesh` plays the shell for many nodes at once. It keeps
one event heap ordered by ``(time, sequence)``, so events at equal times run in the
order they were scheduled and a run is a pure function of the seed and the script.
All randomness comes from one ``random.Random(seed)``.

Topology
    Nodes have numbered interfaces. :meth:`SimMesh.connect` joins interface
    ``a_iface`` of node ``a`` to interface ``b_iface`` of node ``b`` with a
    bidirectional link (two independent directions, each with a
    :class:`LinkProfile`). One interface may carry links to several neighbours: a
    shared segment, where MULTICAST/BROADCAST reaches every linked neighbour (each
    copy independently subject to the link's faults). A node's link address on an
    interface is ``(name, iface)``; a unicast SendFrame to such an address uses the
    link between the two interfaces if one exists and is up.

Per-frame pipeline on one direction (in this order)
    link down -> ``dropped_no_link``; longer than ``mtu`` -> ``dropped_mtu``;
    tamper hook (``None`` -> ``dropped_tamper``); bandwidth queue (full ->
    ``dropped_queue``; otherwise the frame leaves when its serialization ends);
    random loss -> ``lost`` (independent per frame, then the burst model, then the
    batch model: see :class:`GilbertElliott` and ``LinkProfile.batch_loss``); base
    delay + uniform jitter; optional reorder delay;
    optional duplicate (a second copy, arriving after the first). Frames still in
    flight when their link is partitioned, or when either end node stops or is
    replaced, are lost (``lost_in_flight``); frames reaching a stopped node are
    dropped (``dropped_node_down``).

Timers
    After every call into a node the simulator re-reads ``next_deadline()`` and
    (re)schedules one wake-up; stale wake-ups are recognised by a per-node
    generation counter. A node whose deadline is still ``<= now`` right after
    ``on_timer`` is woken again ``min_step`` later (counted in ``timer_min_step``);
    after ``spin_limit`` such wake-ups in a row :class:`SimBusyLoop` is raised.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from meshpipe.actions import (
    BROADCAST,
    MULTICAST,
    Action,
    Deliver,
    Event,
    ForwardingChanged,
    LinkAddr,
    SendFrame,
)

__all__ = [
    "FrameRecord",
    "GilbertElliott",
    "LinkProfile",
    "NodeStats",
    "SimBusyLoop",
    "SimMesh",
    "SimNode",
    "SimStats",
]


class SimNode(Protocol):
    """What the simulator needs from a protocol core (parameters are positional)."""

    def on_frame(
        self, iface: int, src: LinkAddr, frame: bytes, now: float, /
    ) -> Sequence[Action]: ...

    def on_timer(self, now: float, /) -> Sequence[Action]: ...

    def next_deadline(self) -> float:
        """Absolute time of the next wanted ``on_timer`` call; ``math.inf`` if none."""
        ...


@dataclass(frozen=True)
class GilbertElliott:
    """Burst loss: a two-state Markov chain stepped once per frame.

    In the good state a frame is lost with ``loss_good``, in the bad state with
    ``loss_bad``; after each frame the chain moves good -> bad with ``p_good_bad``
    and bad -> good with ``p_bad_good``. A bad spell lasts ``1 / p_bad_good`` frames
    on average, so with ``loss_bad = 1`` and ``loss_good = 0`` that is the mean burst
    length, and the long-run loss rate is the time spent in the bad state.
    """

    p_good_bad: float
    p_bad_good: float
    loss_good: float = 0.0
    loss_bad: float = 1.0

    def __post_init__(self) -> None:
        for name in ("p_good_bad", "p_bad_good", "loss_good", "loss_bad"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be a probability, got {v!r}")
        if self.p_bad_good == 0.0:
            raise ValueError("p_bad_good must be > 0 (a bad state that never ends)")

    @classmethod
    def bursts(cls, loss: float, mean_burst: float) -> GilbertElliott:
        """Lose ``loss`` of the frames in bursts of ``mean_burst`` frames on average."""
        if not 0.0 <= loss < 1.0 or mean_burst < 1.0:
            raise ValueError(f"need 0 <= loss < 1 and mean_burst >= 1, got {loss}, {mean_burst}")
        p_bg = 1.0 / mean_burst
        return cls(p_good_bad=loss * p_bg / (1.0 - loss), p_bad_good=p_bg)

    @property
    def bad_share(self) -> float:
        """Long-run fraction of frames sent in the bad state."""
        return self.p_good_bad / (self.p_good_bad + self.p_bad_good)

    @property
    def mean_loss(self) -> float:
        b = self.bad_share
        return (1.0 - b) * self.loss_good + b * self.loss_bad

    @property
    def mean_bad_run(self) -> float:
        """Mean length of a bad spell, in frames."""
        return 1.0 / self.p_bad_good


@dataclass
class LinkProfile:
    """Fault model of one link direction. Read live: mutating it affects later frames."""

    loss: float = 0.0  # independent drop probability per frame per direction
    burst: GilbertElliott | None = None  # burst loss on top of ``loss``
    # What nftables does to a UDP GSO batch: a run of frames sent on this direction
    # at one instant (one sendmsg, or a transit node forwarding what arrived together)
    # is one packet to it, dropped as a whole with ``batch_loss``. A run ends as the
    # interface worker's does: at ``batch_max`` frames or ``batch_bytes`` bytes, at
    # a frame longer than the first, after a shorter one.
    batch_loss: float = 0.0
    batch_max: int = 64
    batch_bytes: int = 65000
    delay: float = 0.005  # one-way base delay, seconds
    jitter: float = 0.0  # uniform extra delay in [0, jitter]
    reorder: float = 0.0  # probability of an extra reorder_delay (arrives after later frames)
    reorder_delay: float = 0.02
    duplicate: float = 0.0  # probability a frame is delivered twice
    # Serialization rate; None means infinitely fast. Frames queue per direction; the
    # queue holds at most queue_limit frames (waiting or being serialized), excess is
    # dropped and counted.
    bandwidth_bps: float | None = None
    queue_limit: int = 100
    mtu: int = 1400  # longer frames are dropped and counted


@dataclass
class SimStats:
    """Mesh-wide counters. Also readable as ``stats["lost"]``."""

    sent: int = 0  # SendFrame actions executed
    transmitted: int = 0  # copies offered to a link (a multicast makes one per neighbour)
    delivered: int = 0  # frames handed to on_frame (not counting inject)
    lost: int = 0  # random loss (all models)
    lost_burst: int = 0  # of which: burst model, bad or good state
    lost_batch: int = 0  # of which: whole batches dropped
    batches_lost: int = 0
    lost_in_flight: int = 0  # link partitioned / end node stopped while the frame flew
    dropped_mtu: int = 0
    dropped_queue: int = 0
    dropped_no_link: int = 0  # unicast with no such link, or the link is down
    dropped_node_down: int = 0  # arrived at (or injected into) a stopped node
    dropped_tamper: int = 0  # tamper hook returned None
    tampered: int = 0  # tamper hook changed the frame
    duplicated: int = 0
    reordered: int = 0
    injected: int = 0
    timers: int = 0  # on_timer calls
    timer_min_step: int = 0  # busy-loop guard engaged
    events: int = 0  # heap events processed (including stale wake-ups)
    calls: int = 0
    calls_dropped: int = 0  # call() on a stopped node

    def __getitem__(self, name: str) -> int:
        value: int = getattr(self, name)
        return value

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class NodeStats:
    """Per-node traffic counters (kept across replace_node)."""

    frames_sent: int = 0
    bytes_sent: int = 0
    frames_received: int = 0
    bytes_received: int = 0
    timers: int = 0


# (time, source link address, destination link address, frame) of a frame handed
# to on_frame; recorded in SimMesh.frame_log when record_frames=True.
FrameRecord = tuple[float, LinkAddr, LinkAddr, bytes]

Tamper = Callable[[bytes], bytes | None]
N = TypeVar("N")


class SimBusyLoop(RuntimeError):
    """A node kept its deadline at or before ``now`` after ``on_timer``, again and again."""


class _Slot:
    """Simulator-side state of one node."""

    __slots__ = (
        "delivered",
        "events",
        "gen",
        "mcast",
        "name",
        "node",
        "running",
        "scheduled",
        "spins",
        "stats",
        "ucast",
    )

    def __init__(
        self,
        name: str,
        node: SimNode,
        delivered: list[tuple[float, Deliver]],
        events: list[tuple[float, Event]],
    ) -> None:
        self.name = name
        self.node = node
        self.running = True
        self.gen = 0  # bumped whenever the scheduled wake-up changes
        self.scheduled = math.inf  # time of the live wake-up, inf if none
        self.spins = 0  # consecutive busy-loop guard engagements
        self.stats = NodeStats()
        self.delivered = delivered
        self.events = events
        # iface -> neighbour link address -> outgoing direction
        self.ucast: dict[int, dict[LinkAddr, _Direction]] = {}
        # iface -> outgoing directions (link creation order)
        self.mcast: dict[int, list[_Direction]] = {}


class _Direction:
    """One direction of a link, with its queue and fault state."""

    __slots__ = (
        "bad",
        "batch_at",
        "batch_bytes",
        "batch_first",
        "batch_last",
        "batch_lost",
        "batch_n",
        "busy_until",
        "dst",
        "dst_addr",
        "dst_iface",
        "epoch",
        "profile",
        "queue",
        "reverse",
        "src",
        "src_addr",
        "src_iface",
        "tamper",
        "up",
    )

    def __init__(
        self, src: _Slot, src_iface: int, dst: _Slot, dst_iface: int, profile: LinkProfile
    ) -> None:
        self.src = src
        self.src_iface = src_iface
        self.dst = dst
        self.dst_iface = dst_iface
        self.src_addr: LinkAddr = (src.name, src_iface)
        self.dst_addr: LinkAddr = (dst.name, dst_iface)
        self.profile = profile
        self.up = True
        self.epoch = 0  # frames carry the epoch they were sent in; a mismatch means lost
        self.tamper: Tamper | None = None
        self.busy_until = -math.inf  # end of the last queued serialization
        self.queue: deque[float] = deque()  # serialization end times of queued frames
        self.reverse: _Direction = self
        self.bad = False  # Gilbert-Elliott state
        # The batch being sent (LinkProfile.batch_loss): its send time, frames, bytes,
        # first and last frame lengths, and whether it is being dropped.
        self.batch_at = -math.inf
        self.batch_n = 0
        self.batch_bytes = 0
        self.batch_first = 0
        self.batch_last = 0
        self.batch_lost = False

    def lose_in_batch(self, now: float, size: int, rnd: Callable[[], float]) -> bool:
        """Whether this frame's batch is dropped (a new batch draws once)."""
        p = self.profile
        if (
            now != self.batch_at
            or self.batch_n >= p.batch_max
            or self.batch_bytes + size > p.batch_bytes
            or size > self.batch_first
            or self.batch_last < self.batch_first
        ):
            self.batch_at, self.batch_n, self.batch_bytes = now, 0, 0
            self.batch_first = size
            self.batch_lost = rnd() < p.batch_loss
        self.batch_n += 1
        self.batch_bytes += size
        self.batch_last = size
        return self.batch_lost

    def flush(self) -> None:
        """Lose everything in flight or queued on this direction."""
        self.epoch += 1
        self.queue.clear()
        self.busy_until = -math.inf


_FRAME = 0
_TIMER = 1
_INJECT = 2
_CALLBACK = 3
_GROUP_ADDRS = frozenset((MULTICAST, BROADCAST))

# (time, sequence, kind, a, b, c); the sequence is unique, so comparison never
# reaches the payload.
_Ev = tuple[float, int, int, Any, Any, Any]


class SimMesh:
    """Many sans-IO nodes, links between them, one fake clock and one event heap."""

    def __init__(
        self,
        seed: int,
        start: float = 0.0,
        *,
        record_frames: bool = False,
        min_step: float = 1e-6,
        spin_limit: int | None = 10_000,
    ) -> None:
        self._rng = random.Random(seed)
        self._now = float(start)
        self._heap: list[_Ev] = []
        self._seq = itertools.count().__next__
        self._slots: dict[str, _Slot] = {}
        # (a, b) -> [(a->b, b->a), ...] for every link between a and b (both key orders)
        self._pairs: dict[tuple[str, str], list[tuple[_Direction, _Direction]]] = {}
        self._in_run = False
        self._listeners: list[Callable[[str, float, Action], None]] = []
        self.min_step = min_step
        self.spin_limit = spin_limit
        self.stats = SimStats()
        self.delivered: dict[str, list[tuple[float, Deliver]]] = {}
        self.events: dict[str, list[tuple[float, Event]]] = {}
        # latest forwarding table per node, merged from ForwardingChanged actions
        self.forwarding: dict[str, dict[bytes, tuple[int, LinkAddr]]] = {}
        self.frame_log: list[FrameRecord] | None = [] if record_frames else None

    # ------------------------------------------------------------------ basics

    @property
    def now(self) -> float:
        return self._now

    @property
    def rng(self) -> random.Random:
        """The mesh's random source (drawing from it changes later link faults)."""
        return self._rng

    def node(self, name: str) -> SimNode:
        return self._slot(name).node

    def node_as(self, name: str, cls: type[N]) -> N:
        """The node object, checked to be a ``cls`` (for typed access in tests)."""
        node = self._slot(name).node
        if not isinstance(node, cls):
            raise TypeError(f"node {name!r} is a {type(node).__name__}, not {cls.__name__}")
        return node

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    def is_running(self, name: str) -> bool:
        return self._slot(name).running

    def node_stats(self, name: str) -> NodeStats:
        return self._slot(name).stats

    def link_addr(self, name: str, iface: int = 0) -> LinkAddr:
        return (name, iface)

    def neighbours(self, name: str, iface: int | None = None) -> list[LinkAddr]:
        """Link addresses linked to ``name`` (on ``iface``, or any), up or down."""
        slot = self._slot(name)
        out: list[LinkAddr] = []
        for i, dirs in slot.mcast.items():
            if iface is None or i == iface:
                out.extend(d.dst_addr for d in dirs)
        return out

    def add_listener(self, fn: Callable[[str, float, Action], None]) -> None:
        """Call ``fn(node, now, action)`` for every Deliver, Event and ForwardingChanged."""
        self._listeners.append(fn)

    def add_node(self, name: str, node: SimNode) -> None:
        if name in self._slots:
            raise ValueError(f"node {name!r} already exists")
        delivered = self.delivered.setdefault(name, [])
        events = self.events.setdefault(name, [])
        self.forwarding.setdefault(name, {})
        slot = _Slot(name, node, delivered, events)
        self._slots[name] = slot
        self._reschedule(slot, False)

    # ---------------------------------------------------------------- topology

    def connect(
        self,
        a: str,
        b: str,
        profile: LinkProfile | None = None,
        *,
        a_iface: int = 0,
        b_iface: int = 0,
        b_to_a: LinkProfile | None = None,
    ) -> None:
        """Link ``a``'s ``a_iface`` and ``b``'s ``b_iface``; ``b_to_a`` makes it asymmetric."""
        if a == b:
            raise ValueError("cannot link a node to itself")
        sa, sb = self._slot(a), self._slot(b)
        ab_profile = profile if profile is not None else LinkProfile()
        ba_profile = b_to_a if b_to_a is not None else ab_profile
        if (b, b_iface) in sa.ucast.get(a_iface, {}):
            raise ValueError(f"{a}:{a_iface} and {b}:{b_iface} are already linked")
        ab = _Direction(sa, a_iface, sb, b_iface, ab_profile)
        ba = _Direction(sb, b_iface, sa, a_iface, ba_profile)
        ab.reverse, ba.reverse = ba, ab
        for d in (ab, ba):
            d.src.ucast.setdefault(d.src_iface, {})[d.dst_addr] = d
            d.src.mcast.setdefault(d.src_iface, []).append(d)
        self._pairs.setdefault((a, b), []).append((ab, ba))
        self._pairs.setdefault((b, a), []).append((ba, ab))

    def _links(self, a: str, b: str) -> list[tuple[_Direction, _Direction]]:
        self._slot(a)
        self._slot(b)
        links = self._pairs.get((a, b))
        if not links:
            raise KeyError(f"no link between {a!r} and {b!r}")
        return links

    def set_profile(
        self, a: str, b: str, profile: LinkProfile, *, b_to_a: LinkProfile | None = None
    ) -> None:
        """Set the profile of every link between ``a`` and ``b`` (both directions)."""
        for ab, ba in self._links(a, b):
            ab.profile = profile
            ba.profile = b_to_a if b_to_a is not None else profile

    def set_direction_profile(self, src: str, dst: str, profile: LinkProfile) -> None:
        """Set the profile of the ``src`` -> ``dst`` direction only."""
        for ab, _ in self._links(src, dst):
            ab.profile = profile

    def partition(self, a: str, b: str, *, one_way: bool = False) -> None:
        """Take the links between ``a`` and ``b`` down (only a->b if ``one_way``).

        Frames in flight on a cut direction are lost, its queue is emptied.
        """
        for ab, ba in self._links(a, b):
            for d in (ab,) if one_way else (ab, ba):
                d.up = False
                d.flush()

    def heal(self, a: str, b: str, *, one_way: bool = False) -> None:
        """Bring the links between ``a`` and ``b`` back up (only a->b if ``one_way``)."""
        for ab, ba in self._links(a, b):
            for d in (ab,) if one_way else (ab, ba):
                d.up = True

    def partition_groups(self, group1: Iterable[str], group2: Iterable[str]) -> None:
        """Cut every link between a node of ``group1`` and a node of ``group2``."""
        self._set_groups(group1, group2, up=False)

    def heal_groups(self, group1: Iterable[str], group2: Iterable[str]) -> None:
        self._set_groups(group1, group2, up=True)

    def _set_groups(self, group1: Iterable[str], group2: Iterable[str], *, up: bool) -> None:
        g2 = list(group2)
        for a in group1:
            self._slot(a)
            for b in g2:
                for ab, ba in self._pairs.get((a, b), ()):
                    for d in (ab, ba):
                        if not up:
                            d.flush()
                        d.up = up

    def set_tamper(self, a: str, b: str, fn: Tamper | None) -> None:
        """Pass every frame ``a`` -> ``b`` through ``fn`` (``None`` result drops it)."""
        for ab, _ in self._links(a, b):
            ab.tamper = fn

    # ------------------------------------------------------------- node faults

    def stop_node(self, name: str) -> None:
        """Node failure: no timers, nothing received or sent; frames in flight lost."""
        slot = self._slot(name)
        slot.running = False
        slot.gen += 1
        slot.scheduled = math.inf
        slot.spins = 0
        self._flush_node(slot)

    def replace_node(self, name: str, node: SimNode) -> None:
        """Restart ``name`` with a new core object; links, records and stats stay."""
        slot = self._slot(name)
        self.stop_node(name)
        slot.node = node
        slot.running = True
        self.forwarding[name] = {}
        self._reschedule(slot, False)

    def _flush_node(self, slot: _Slot) -> None:
        for dirs in slot.mcast.values():
            for d in dirs:
                d.flush()
                d.reverse.flush()

    # ------------------------------------------------------------- driving

    def inject(
        self, name: str, iface: int, src: LinkAddr, frame: bytes, at: float | None = None
    ) -> None:
        """Hand ``frame`` to ``name``'s ``on_frame`` as if from ``src``.

        ``at=None`` delivers it now (synchronously); otherwise it is scheduled.
        """
        slot = self._slot(name)
        if at is None:
            self._inject(slot, iface, src, frame)
        else:
            self._push(at, _INJECT, slot, (iface, src), frame)

    def _inject(self, slot: _Slot, iface: int, src: LinkAddr, frame: bytes) -> None:
        if not slot.running:
            self.stats.dropped_node_down += 1
            return
        self.stats.injected += 1
        actions = slot.node.on_frame(iface, src, frame, self._now)
        if actions:
            self._execute(slot, actions)
        self._reschedule(slot, False)

    def call(self, name: str, fn: Callable[[Any, float], Sequence[Action]]) -> list[Action]:
        """Run ``fn(node, now)`` and execute the actions it returns (also returned).

        On a stopped node this does nothing (counted in ``calls_dropped``).
        """
        slot = self._slot(name)
        if not slot.running:
            self.stats.calls_dropped += 1
            return []
        self.stats.calls += 1
        actions = list(fn(slot.node, self._now))
        if actions:
            self._execute(slot, actions)
        self._reschedule(slot, False)
        return actions

    def at(self, t: float, fn: Callable[[SimMesh], None]) -> None:
        """Run ``fn(mesh)`` at simulated time ``t`` (after events already queued for ``t``)."""
        self._push(t, _CALLBACK, fn, None, None)

    def run_for(self, dt: float, on_step: Callable[[SimMesh], None] | None = None) -> None:
        self.run_until(self._now + dt, on_step)

    def run_until(self, t: float, on_step: Callable[[SimMesh], None] | None = None) -> None:
        """Process every event up to and including time ``t``, then set the clock to ``t``.

        ``on_step(mesh)`` runs after the last event of each distinct event time.
        """
        if self._in_run:
            raise RuntimeError("run_until is not re-entrant")
        if t < self._now:
            raise ValueError(f"cannot run back in time ({t} < {self._now})")
        self._in_run = True
        heap = self._heap
        pop = heapq.heappop
        st = self.stats
        log = self.frame_log
        try:
            while heap and heap[0][0] <= t:
                now, _, kind, a, b, c = pop(heap)
                self._now = now
                st.events += 1
                if kind == _FRAME:
                    d: _Direction = a
                    slot = d.dst
                    if b != d.epoch:
                        st.lost_in_flight += 1
                    elif not slot.running:
                        st.dropped_node_down += 1
                    else:
                        st.delivered += 1
                        ns = slot.stats
                        ns.frames_received += 1
                        ns.bytes_received += len(c)
                        if log is not None:
                            log.append((now, d.src_addr, d.dst_addr, c))
                        actions = slot.node.on_frame(d.dst_iface, d.src_addr, c, now)
                        if actions:
                            self._execute(slot, actions)
                        self._reschedule(slot, False)
                elif kind == _TIMER:
                    slot = a
                    if b == slot.gen and slot.running:
                        slot.scheduled = math.inf
                        node = slot.node
                        if node.next_deadline() > now:  # moved later behind our back
                            self._reschedule(slot, False)
                        else:
                            st.timers += 1
                            slot.stats.timers += 1
                            actions = node.on_timer(now)
                            if actions:
                                self._execute(slot, actions)
                            self._reschedule(slot, True)
                elif kind == _INJECT:
                    self._inject(a, b[0], b[1], c)
                else:
                    a(self)
                if on_step is not None and (not heap or heap[0][0] != now):
                    on_step(self)
            self._now = t
        finally:
            self._in_run = False

    def pending(self) -> int:
        """Number of queued heap events (including stale wake-ups)."""
        return len(self._heap)

    # ------------------------------------------------------------- internals

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise KeyError(f"no node named {name!r}") from None

    def _push(self, t: float, kind: int, a: Any, b: Any, c: Any) -> None:
        if t < self._now:
            raise ValueError(f"cannot schedule in the past ({t} < {self._now})")
        heapq.heappush(self._heap, (t, self._seq(), kind, a, b, c))

    def _reschedule(self, slot: _Slot, after_timer: bool) -> None:
        if not slot.running:
            return
        dl = slot.node.next_deadline()
        now = self._now
        if dl != dl:
            raise ValueError(f"node {slot.name!r}: next_deadline() returned NaN")
        if dl <= now:
            if after_timer:
                slot.spins += 1
                self.stats.timer_min_step += 1
                if self.spin_limit is not None and slot.spins > self.spin_limit:
                    raise SimBusyLoop(
                        f"node {slot.name!r}: next_deadline() <= now after on_timer "
                        f"{slot.spins} times in a row (at t={now})"
                    )
                dl = now + self.min_step
            else:
                dl = now
        elif after_timer:
            slot.spins = 0
        if dl == slot.scheduled:
            return
        slot.gen += 1
        slot.scheduled = dl
        if dl != math.inf:
            heapq.heappush(self._heap, (dl, self._seq(), _TIMER, slot, slot.gen, None))

    def _execute(self, slot: _Slot, actions: Iterable[Action]) -> None:
        now = self._now
        for action in actions:
            if isinstance(action, SendFrame):
                self._transmit(slot, action)
                continue
            if isinstance(action, Deliver):
                slot.delivered.append((now, action))
            elif isinstance(action, Event):
                slot.events.append((now, action))
            elif isinstance(action, ForwardingChanged):
                table = self.forwarding[slot.name]
                for dst, hop in action.entries.items():
                    if hop is None:
                        table.pop(dst, None)
                    else:
                        table[dst] = hop
            else:
                raise TypeError(f"node {slot.name!r} returned a non-action: {action!r}")
            for fn in self._listeners:
                fn(slot.name, now, action)

    def _transmit(self, slot: _Slot, action: SendFrame) -> None:
        st = self.stats
        st.sent += 1
        frame = action.frame
        ns = slot.stats
        ns.frames_sent += 1
        ns.bytes_sent += len(frame)
        dest = action.dest
        if dest in _GROUP_ADDRS:
            for d in slot.mcast.get(action.iface, ()):
                self._send_on(d, frame)
            return
        links = slot.ucast.get(action.iface)
        link = links.get(dest) if links is not None else None
        if link is None:
            st.dropped_no_link += 1
            return
        self._send_on(link, frame)

    def _send_on(self, d: _Direction, frame: bytes) -> None:
        st = self.stats
        st.transmitted += 1
        if not d.up:
            st.dropped_no_link += 1
            return
        p = d.profile
        if len(frame) > p.mtu:
            st.dropped_mtu += 1
            return
        if d.tamper is not None:
            out = d.tamper(frame)
            if out is None:
                st.dropped_tamper += 1
                return
            if out != frame:
                st.tampered += 1
            frame = out
        now = self._now
        t = now
        bw = p.bandwidth_bps
        if bw:
            q = d.queue
            while q and q[0] <= now:
                q.popleft()
            if len(q) >= p.queue_limit:
                st.dropped_queue += 1
                return
            start = d.busy_until if d.busy_until > now else now
            t = start + len(frame) * 8.0 / bw
            d.busy_until = t
            q.append(t)
        rnd = self._rng.random
        if p.loss and rnd() < p.loss:
            st.lost += 1
            return
        ge = p.burst
        if ge is not None:
            lost = rnd() < (ge.loss_bad if d.bad else ge.loss_good)
            d.bad = rnd() >= ge.p_bad_good if d.bad else rnd() < ge.p_good_bad
            if lost:
                st.lost += 1
                st.lost_burst += 1
                return
        if p.batch_loss and d.lose_in_batch(now, len(frame), rnd):
            st.lost += 1
            st.lost_batch += 1
            if d.batch_n == 1:
                st.batches_lost += 1
            return
        t += p.delay
        if p.jitter:
            t += rnd() * p.jitter
        if p.reorder and rnd() < p.reorder:
            t += p.reorder_delay
            st.reordered += 1
        push = heapq.heappush
        heap = self._heap
        push(heap, (t, self._seq(), _FRAME, d, d.epoch, frame))
        if p.duplicate and rnd() < p.duplicate:
            st.duplicated += 1
            if p.jitter:
                t += rnd() * p.jitter
            push(heap, (t, self._seq(), _FRAME, d, d.epoch, frame))
