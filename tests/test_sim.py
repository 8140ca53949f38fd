"""Tests for the deterministic mesh simulator (meshpipe.sim)."""

from __future__ import annotations

import itertools
import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from meshpipe.sim import GilbertElliott, LinkProfile, SimBusyLoop, SimMesh

# ---------------------------------------------------------------- toy nodes


class Flooder:
    """Broadcasts a numbered hello on each interface every ``period``; answers pings."""

    def __init__(self, name: str, period: float = 1.0, ifaces: Sequence[int] = (0,)) -> None:
        self.name = name
        self.period = period
        self.ifaces = tuple(ifaces)
        self.seq = 0
        self.next = 0.0
        self.heard: list[tuple[float, int, LinkAddr, bytes]] = []

    def on_frame(self, iface: int, src: LinkAddr, frame: bytes, now: float) -> list[Action]:
        self.heard.append((now, iface, src, frame))
        out: list[Action] = [Deliver(src=repr(src).encode(), payload=frame, hops=1)]
        if frame.startswith(b"ping"):
            out.append(SendFrame(iface, src, b"pong" + frame[4:]))
        return out

    def on_timer(self, now: float) -> list[Action]:
        self.seq += 1
        self.next = now + self.period
        out: list[Action] = [
            SendFrame(i, MULTICAST, f"hello {self.name} {self.seq}".encode()) for i in self.ifaces
        ]
        out.append(Event("tick", {"seq": self.seq}))
        return out

    def next_deadline(self) -> float:
        return self.next

    def heard_from(self) -> set[str]:
        return {src[0] for _, _, src, _ in self.heard if isinstance(src, tuple)}


class Probe:
    """Passive: records every frame, never wants a timer."""

    def __init__(self) -> None:
        self.heard: list[tuple[float, int, LinkAddr, bytes]] = []

    def on_frame(self, iface: int, src: LinkAddr, frame: bytes, now: float) -> list[Action]:
        self.heard.append((now, iface, src, frame))
        return []

    def on_timer(self, now: float) -> list[Action]:
        return []

    def next_deadline(self) -> float:
        return math.inf


def send(mesh: SimMesh, name: str, dest: LinkAddr, frame: bytes, iface: int = 0) -> None:
    mesh.call(name, lambda n, now: [SendFrame(iface, dest, frame)])


def stamped(i: int, now: float, size: int = 0) -> bytes:
    head = struct.pack("!Id", i, now)
    return head + b"\0" * max(0, size - len(head))


def unstamp(frame: bytes) -> tuple[int, float]:
    i, sent = struct.unpack_from("!Id", frame)
    return int(i), float(sent)


def probe(mesh: SimMesh, name: str) -> Probe:
    return mesh.node_as(name, Probe)


def pair(profile: LinkProfile, seed: int = 1, b_to_a: LinkProfile | None = None) -> SimMesh:
    mesh = SimMesh(seed)
    mesh.add_node("a", Probe())
    mesh.add_node("b", Probe())
    mesh.connect("a", "b", profile, b_to_a=b_to_a)
    return mesh


def send_series(mesh: SimMesh, n: int, spacing: float, size: int = 0) -> None:
    """a sends n stamped frames to b, ``spacing`` apart (all at once if 0)."""
    for i in range(n):
        send(mesh, "a", ("b", 0), stamped(i, mesh.now, size))
        if spacing:
            mesh.run_for(spacing)


def latencies(mesh: SimMesh, name: str = "b") -> list[float]:
    return [now - unstamp(f)[1] for now, _, _, f in probe(mesh, name).heard]


# ------------------------------------------------------------- determinism


def build_ring(seed: int, n: int = 8) -> SimMesh:
    mesh = SimMesh(seed, record_frames=True)
    prof = LinkProfile(loss=0.1, delay=0.01, jitter=0.01, reorder=0.1, duplicate=0.05)
    for i in range(n):
        mesh.add_node(f"n{i}", Flooder(f"n{i}", period=0.5))
    for i in range(n):
        mesh.connect(f"n{i}", f"n{(i + 1) % n}", prof)
    mesh.connect("n0", "n4", prof, a_iface=1, b_iface=1)

    def pinger(i: int) -> Callable[[SimMesh], None]:
        return lambda m: send(m, f"n{i}", (f"n{(i + 1) % n}", 0), b"ping")

    for i in range(n):  # ping everyone's neighbour once, to mix in unicast
        mesh.at(3.0 + i / 10, pinger(i))
    mesh.run_until(20.0)
    return mesh


def snapshot(mesh: SimMesh) -> tuple[object, ...]:
    return (mesh.frame_log, mesh.delivered, mesh.events, mesh.stats.as_dict())


def test_same_seed_same_run_different_seed_different_run() -> None:
    one, two, other = build_ring(7), build_ring(7), build_ring(8)
    assert one.frame_log is not None and len(one.frame_log) > 500
    assert one.stats.lost > 0 and one.stats.duplicated > 0 and one.stats.reordered > 0
    assert snapshot(one) == snapshot(two)
    assert one.frame_log != other.frame_log
    assert one.stats.as_dict() != other.stats.as_dict()
    # pongs came back over the unicast link
    assert any(f == b"pong" for _, _, _, f in one.frame_log)


# ------------------------------------------------------------- link faults


def test_loss_rate_matches_and_asymmetric_profile() -> None:
    mesh = pair(LinkProfile(loss=0.25), b_to_a=LinkProfile(loss=0.0))
    n = 4000
    send_series(mesh, n, 0)
    for i in range(200):
        send(mesh, "b", ("a", 0), stamped(i, mesh.now))
    mesh.run_for(1.0)
    got = len(probe(mesh, "b").heard)
    assert abs(got / n - 0.75) < 0.03
    assert mesh.stats.lost == n - got
    assert len(probe(mesh, "a").heard) == 200  # the reverse direction is lossless
    assert mesh.stats.sent == n + 200 and mesh.stats["delivered"] == got + 200


def _loss_runs(received: set[int], n: int) -> list[int]:
    """Lengths of the runs of consecutive frame numbers below ``n`` not received."""
    runs: list[int] = []
    run = 0
    for i in range(n):
        if i in received:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    if run:
        runs.append(run)
    return runs


@pytest.mark.parametrize(("loss", "burst"), [(0.1, 8.0), (0.05, 30.0), (0.2, 1.5)])
def test_gilbert_elliott_loss_rate_and_burst_length(loss: float, burst: float) -> None:
    model = GilbertElliott.bursts(loss, burst)
    assert model.mean_loss == pytest.approx(loss) and model.mean_bad_run == pytest.approx(burst)
    mesh = pair(LinkProfile(burst=model))
    n = 60_000
    send_series(mesh, n, 0.0001)
    mesh.run_for(1.0)
    got = {unstamp(f)[0] for _, _, _, f in probe(mesh, "b").heard}
    runs = _loss_runs(got, n)
    assert mesh.stats.lost == mesh.stats.lost_burst == n - len(got)
    assert abs((n - len(got)) / n - loss) < 0.25 * loss
    assert abs(sum(runs) / len(runs) - burst) < 0.2 * burst


def test_gilbert_elliott_lossy_good_state_and_validation() -> None:
    # A bad state that loses half and a good state that loses 1%.
    model = GilbertElliott(p_good_bad=0.01, p_bad_good=0.1, loss_good=0.01, loss_bad=0.5)
    assert model.mean_loss == pytest.approx(10 / 11 * 0.01 + 1 / 11 * 0.5)
    mesh = pair(LinkProfile(burst=model))
    n = 50_000
    send_series(mesh, n, 0.0001)
    mesh.run_for(1.0)
    assert abs(mesh.stats.lost_burst / n - model.mean_loss) < 0.15 * model.mean_loss
    with pytest.raises(ValueError):
        GilbertElliott(p_good_bad=0.1, p_bad_good=0.0)
    with pytest.raises(ValueError):
        GilbertElliott(p_good_bad=1.5, p_bad_good=0.5)
    with pytest.raises(ValueError):
        GilbertElliott.bursts(0.1, 0.5)


def test_batch_loss_drops_whole_runs() -> None:
    """A run of frames sent at one instant is one GSO batch: dropped or kept as a whole."""
    mesh = pair(LinkProfile(batch_loss=0.1, batch_max=45))
    batches = 2000
    for k in range(batches):
        for i in range(90):  # two batches of 45 full-size frames at each instant
            send(mesh, "a", ("b", 0), stamped(k * 90 + i, mesh.now, size=1200))
        mesh.run_for(0.001)
    mesh.run_for(1.0)
    got = {unstamp(f)[0] for _, _, _, f in probe(mesh, "b").heard}
    n = batches * 90
    for start in range(0, n, 45):  # every batch is all there or all gone
        present = sum(1 for i in range(start, start + 45) if i in got)
        assert present in (0, 45)
    assert mesh.stats.batches_lost == (n - len(got)) // 45
    assert abs(mesh.stats.batches_lost / (2 * batches) - 0.1) < 0.02
    assert mesh.stats.lost_batch == mesh.stats.lost == n - len(got)


def test_batch_ends_like_a_gso_run() -> None:
    """Batches end at the byte limit, at a longer frame and after a shorter one."""
    mesh = pair(LinkProfile(batch_loss=1.0, batch_bytes=10_000))
    # 8 x 1200 bytes fit 10 kB, the 9th starts a new batch; a 100-byte frame closes
    # that one; the 1200-byte frame after it starts the third.
    for i, size in enumerate([1200] * 9 + [100, 1200, 1300]):
        send(mesh, "a", ("b", 0), stamped(i, mesh.now, size=size))
    # the 1300-byte frame is longer than its batch's first: a fourth batch
    mesh.run_for(0.001)
    send(mesh, "a", ("b", 0), stamped(99, mesh.now, size=1200))  # a later instant: a fifth
    assert mesh.stats.batches_lost == 5
    assert mesh.stats.lost == 13


def test_delay_and_jitter_bounds() -> None:
    mesh = pair(LinkProfile(delay=0.05, jitter=0.01))
    send_series(mesh, 500, 0.001)
    mesh.run_for(1.0)
    lat = latencies(mesh)
    assert len(lat) == 500
    assert min(lat) >= 0.05 - 1e-9 and max(lat) <= 0.06 + 1e-9
    assert max(lat) - min(lat) > 0.008  # jitter actually spreads

    fixed = pair(LinkProfile(delay=0.03))
    send_series(fixed, 50, 0.002)
    fixed.run_for(1.0)
    assert all(x == pytest.approx(0.03) for x in latencies(fixed))


def test_reorder_reorders() -> None:
    mesh = pair(LinkProfile(delay=0.01, reorder=0.2, reorder_delay=0.02))
    send_series(mesh, 1000, 0.001)
    mesh.run_for(1.0)
    seqs = [unstamp(f)[0] for _, _, _, f in probe(mesh, "b").heard]
    assert sorted(seqs) == list(range(1000))
    inversions = sum(1 for x, y in itertools.pairwise(seqs) if x > y)
    assert inversions > 50
    assert abs(mesh.stats.reordered / 1000 - 0.2) < 0.05
    for x in latencies(mesh):
        assert x == pytest.approx(0.01) or x == pytest.approx(0.03)

    inorder = pair(LinkProfile(delay=0.01))
    send_series(inorder, 200, 0.001)
    inorder.run_for(1.0)
    got = [unstamp(f)[0] for _, _, _, f in probe(inorder, "b").heard]
    assert got == list(range(200))


def test_equal_times_keep_send_order() -> None:
    mesh = pair(LinkProfile(delay=0.01))
    send_series(mesh, 100, 0)  # all at t=0, all arrive at t=0.01
    mesh.run_for(1.0)
    assert [unstamp(f)[0] for _, _, _, f in probe(mesh, "b").heard] == list(range(100))


def test_duplicates_happen_and_are_counted() -> None:
    mesh = pair(LinkProfile(duplicate=0.1, jitter=0.002))
    n = 2000
    send_series(mesh, n, 0)
    mesh.run_for(1.0)
    counts = Counter(unstamp(f)[0] for _, _, _, f in probe(mesh, "b").heard)
    dups = sum(1 for c in counts.values() if c == 2)
    assert set(counts.values()) <= {1, 2} and len(counts) == n
    assert dups == mesh.stats.duplicated
    assert 120 < dups < 280


def test_mtu_drop_counted() -> None:
    mesh = SimMesh(1)
    for name in ("h", "big", "small"):
        mesh.add_node(name, Probe())
    mesh.connect("h", "big")
    mesh.connect("h", "small", LinkProfile(mtu=100))
    send(mesh, "h", ("small", 0), b"x" * 100)
    send(mesh, "h", ("small", 0), b"x" * 101)
    send(mesh, "h", MULTICAST, b"y" * 1400)
    send(mesh, "h", MULTICAST, b"z" * 1401)
    mesh.run_for(1.0)
    assert [len(f) for _, _, _, f in probe(mesh, "small").heard] == [100]
    assert [len(f) for _, _, _, f in probe(mesh, "big").heard] == [1400]
    assert mesh.stats.dropped_mtu == 4  # 101 unicast, 1400 to small, 1401 to both


def test_bandwidth_serialization_and_queue_limit() -> None:
    # 1000-byte frames at 80 kbit/s take exactly 0.1 s each to serialize.
    prof = LinkProfile(delay=0.01, bandwidth_bps=80_000, queue_limit=3)
    mesh = pair(prof)
    for i in range(5):
        send(mesh, "a", ("b", 0), stamped(i, 0.0, 1000))
    send(mesh, "b", ("a", 0), stamped(99, 0.0, 1000))  # own queue in the other direction
    assert mesh.stats.dropped_queue == 2
    mesh.run_until(0.25)  # two frames done, the third serializes until 0.3
    send(mesh, "a", ("b", 0), stamped(5, mesh.now, 1000))
    mesh.run_until(2.0)
    arrivals = [(unstamp(f)[0], t) for t, _, _, f in probe(mesh, "b").heard]
    assert [i for i, _ in arrivals] == [0, 1, 2, 5]
    expected = [0.11, 0.21, 0.31, 0.41]
    assert [t for _, t in arrivals] == pytest.approx(expected)
    assert [t for t, _, _, _ in probe(mesh, "a").heard] == pytest.approx([0.11])
    # after the queue drained, a frame goes out right away again
    send(mesh, "a", ("b", 0), stamped(6, mesh.now, 500))
    mesh.run_for(1.0)
    assert probe(mesh, "b").heard[-1][0] == pytest.approx(2.0 + 0.05 + 0.01)


# ---------------------------------------------------- addressing, segments


def test_shared_segment_multicast_and_unicast_addressing() -> None:
    mesh = SimMesh(3)
    for name in ("h", "a", "b", "c", "d"):
        mesh.add_node(name, Probe())
    for name in ("a", "b", "c"):
        mesh.connect("h", name)  # h's interface 0 is a shared segment
    mesh.connect("h", "d", a_iface=1, b_iface=2)
    assert mesh.link_addr("h", 1) == ("h", 1)
    assert mesh.neighbours("h", 0) == [("a", 0), ("b", 0), ("c", 0)]

    send(mesh, "h", MULTICAST, b"m")
    send(mesh, "h", BROADCAST, b"bc", iface=1)
    send(mesh, "h", ("b", 0), b"u")
    send(mesh, "h", ("b", 0), b"wrong-iface", iface=1)
    send(mesh, "h", ("zz", 0), b"nobody")
    send(mesh, "d", ("h", 1), b"up", iface=2)
    mesh.run_for(1.0)

    def got(name: str) -> list[tuple[int, LinkAddr, bytes]]:
        return [(i, s, f) for _, i, s, f in probe(mesh, name).heard]

    assert got("a") == [(0, ("h", 0), b"m")]
    assert got("b") == [(0, ("h", 0), b"m"), (0, ("h", 0), b"u")]
    assert got("c") == [(0, ("h", 0), b"m")]
    assert got("d") == [(2, ("h", 1), b"bc")]
    assert got("h") == [(1, ("d", 2), b"up")]
    assert mesh.stats.dropped_no_link == 2
    assert mesh.node_stats("h").frames_sent == 5
    assert mesh.node_stats("b").frames_received == 2


def test_connect_rejects_nonsense() -> None:
    mesh = SimMesh(0)
    mesh.add_node("a", Probe())
    mesh.add_node("b", Probe())
    with pytest.raises(ValueError):
        mesh.add_node("a", Probe())
    with pytest.raises(ValueError):
        mesh.connect("a", "a")
    with pytest.raises(KeyError):
        mesh.connect("a", "nope")
    mesh.connect("a", "b")
    with pytest.raises(ValueError):
        mesh.connect("a", "b")
    mesh.connect("a", "b", a_iface=1, b_iface=1)  # a second, parallel link is fine
    with pytest.raises(KeyError):
        mesh.partition("a", "nope")


# ------------------------------------------------------ partitions, failures


def test_partition_loses_in_flight_and_heal_restores() -> None:
    mesh = pair(LinkProfile(delay=0.1))
    send(mesh, "a", ("b", 0), b"in-flight")
    mesh.run_until(0.05)
    mesh.partition("a", "b")
    send(mesh, "a", ("b", 0), b"while-down")
    send(mesh, "b", ("a", 0), b"while-down")
    mesh.run_until(1.0)
    assert probe(mesh, "b").heard == [] and probe(mesh, "a").heard == []
    assert mesh.stats.lost_in_flight == 1 and mesh.stats.dropped_no_link == 2
    mesh.heal("a", "b")
    send(mesh, "a", ("b", 0), b"after")
    mesh.run_until(2.0)
    assert [f for _, _, _, f in probe(mesh, "b").heard] == [b"after"]

    mesh.partition("a", "b", one_way=True)
    send(mesh, "a", ("b", 0), b"a->b")
    send(mesh, "b", ("a", 0), b"b->a")
    mesh.run_until(3.0)
    assert [f for _, _, _, f in probe(mesh, "b").heard] == [b"after"]
    assert [f for _, _, _, f in probe(mesh, "a").heard] == [b"b->a"]


def test_partition_groups_cuts_only_between_groups() -> None:
    mesh = SimMesh(5)
    names = ["a", "b", "c", "d"]
    for name in names:
        mesh.add_node(name, Flooder(name))
    for x, y in [("a", "b"), ("c", "d"), ("a", "c"), ("b", "d"), ("a", "d")]:
        mesh.connect(x, y)
    mesh.run_until(2.5)
    mesh.partition_groups(["a", "b"], ["c", "d"])
    before = {n: len(mesh.node_as(n, Flooder).heard) for n in names}
    mesh.run_until(10.5)
    fl = {n: mesh.node_as(n, Flooder) for n in names}
    assert {s for _, _, s, _ in fl["a"].heard[before["a"] :]} == {("b", 0)}
    assert {s for _, _, s, _ in fl["c"].heard[before["c"] :]} == {("d", 0)}
    mesh.heal_groups(["a", "b"], ["c", "d"])
    mark = len(fl["a"].heard)
    mesh.run_until(12.5)
    assert {s[0] for _, _, s, _ in fl["a"].heard[mark:] if isinstance(s, tuple)} == {"b", "c", "d"}


def test_stop_node_and_replace_node() -> None:
    mesh = SimMesh(2)
    mesh.add_node("a", Flooder("a"))
    mesh.add_node("b", Flooder("b"))
    mesh.connect("a", "b", LinkProfile(delay=0.3))
    mesh.run_until(5.1)  # ticks at 0..5; b's hello from t=5 is still in flight
    old_b = mesh.node_as("b", Flooder)
    ticks_b = len(mesh.events["b"])
    heard_a = len(mesh.node_as("a", Flooder).heard)
    mesh.stop_node("b")
    assert not mesh.is_running("b")
    mesh.run_until(10.1)
    assert len(mesh.events["b"]) == ticks_b  # timers stopped
    assert len(mesh.node_as("a", Flooder).heard) == heard_a  # b sends nothing
    assert old_b.heard[-1][0] < 5.1  # b receives nothing
    assert mesh.stats.lost_in_flight >= 2  # both hellos of t=5
    assert mesh.stats.dropped_node_down == 4  # a's hellos of t=6..9 (t=10 still flying)
    assert mesh.call("b", lambda n, now: [SendFrame(0, MULTICAST, b"x")]) == []
    assert mesh.stats.calls_dropped == 1

    new_b = Flooder("b")
    mesh.replace_node("b", new_b)
    assert mesh.node("b") is new_b and mesh.is_running("b")
    mesh.run_until(15.1)
    assert new_b.seq > 0 and new_b.heard_from() == {"a"}
    assert mesh.node_as("a", Flooder).heard[-1][2] == ("b", 0)
    assert len(old_b.heard) > 0 and old_b.heard[-1][0] < 5.1
    assert len(mesh.events["b"]) > ticks_b  # records survive the restart


def test_tamper_hook() -> None:
    mesh = pair(LinkProfile())

    def flip(frame: bytes) -> bytes | None:
        if frame == b"drop":
            return None
        return bytes([frame[0] ^ 0xFF]) + frame[1:]

    mesh.set_tamper("a", "b", flip)
    for f in (b"abc", b"drop"):
        send(mesh, "a", ("b", 0), f)
    send(mesh, "b", ("a", 0), b"abc")
    mesh.run_for(1.0)
    assert [f for _, _, _, f in probe(mesh, "b").heard] == [b"\x9ebc"]
    assert [f for _, _, _, f in probe(mesh, "a").heard] == [b"abc"]
    assert mesh.stats.tampered == 1 and mesh.stats.dropped_tamper == 1
    mesh.set_tamper("a", "b", None)
    send(mesh, "a", ("b", 0), b"abc")
    mesh.run_for(1.0)
    assert probe(mesh, "b").heard[-1][3] == b"abc"


def test_inject() -> None:
    mesh = SimMesh(4)
    mesh.add_node("a", Probe())
    mesh.add_node("b", Flooder("b", period=1000.0))
    mesh.connect("a", "b", LinkProfile(delay=0.01))
    mesh.run_until(1.0)
    mesh.inject("b", 0, ("a", 0), b"ping-forged")  # delivered synchronously, reply goes to a
    flooder = mesh.node_as("b", Flooder)
    assert flooder.heard[-1] == (1.0, 0, ("a", 0), b"ping-forged")
    assert mesh.delivered["b"][-1] == (1.0, Deliver(repr(("a", 0)).encode(), b"ping-forged", 1))
    mesh.inject("b", 3, "garbage-src", b"\x00\xff", at=2.5)
    mesh.inject("b", 0, ("ghost", 0), b"ping")  # reply to a non-neighbour goes nowhere
    mesh.run_until(3.0)
    assert [f for _, _, _, f in probe(mesh, "a").heard] == [b"hello b 1", b"pong-forged"]
    assert probe(mesh, "a").heard[-1][0] == pytest.approx(1.01)
    last: tuple[float, int, LinkAddr, bytes] = flooder.heard[-1]
    assert last == (2.5, 3, "garbage-src", b"\x00\xff")
    assert mesh.stats.injected == 3 and mesh.stats.dropped_no_link == 1
    mesh.stop_node("b")
    mesh.inject("b", 0, ("a", 0), b"x")
    assert mesh.stats.dropped_node_down == 1
    with pytest.raises(ValueError):
        mesh.inject("a", 0, ("b", 0), b"x", at=1.0)  # in the past


# ----------------------------------------------------------- timers, driving


class Deadline:
    """Wants on_timer at ``self.deadline``; records when it is called."""

    def __init__(self, deadline: float, then: Sequence[float] = ()) -> None:
        self.deadline = deadline
        self.then = list(then)
        self.calls: list[float] = []

    def on_frame(self, iface: int, src: LinkAddr, frame: bytes, now: float) -> list[Action]:
        self.deadline = float(frame.decode())  # a frame moves the deadline
        return []

    def on_timer(self, now: float) -> list[Action]:
        assert now >= self.deadline
        self.calls.append(now)
        self.deadline = self.then.pop(0) if self.then else math.inf
        return []

    def next_deadline(self) -> float:
        return self.deadline


def test_timers_follow_moving_deadlines_without_spurious_calls() -> None:
    mesh = SimMesh(0, start=100.0)
    node = Deadline(105.0, then=[107.0])
    mesh.add_node("n", node)
    mesh.inject("n", 0, "x", b"103.0", at=101.0)  # earlier
    mesh.inject("n", 0, "x", b"104.0", at=102.0)  # later than 103 again
    mesh.run_until(110.0)
    assert node.calls == [104.0, 107.0]
    assert mesh.now == 110.0 and mesh.stats.timers == 2
    mesh.inject("n", 0, "x", b"-inf")  # overdue deadline: woken now, not in the past
    mesh.run_until(110.0)
    assert node.calls[-1] == 110.0


def test_min_step_guard_and_busy_loop_detection() -> None:
    mesh = SimMesh(0)
    node = Deadline(1.0, then=[0.0, 0.0, 0.0, 2.0])  # three overdue deadlines in a row
    mesh.add_node("n", node)
    mesh.run_until(3.0)
    assert node.calls == pytest.approx([1.0, 1.000001, 1.000002, 1.000003, 2.0])
    assert mesh.stats.timer_min_step == 3

    class Spinner(Deadline):
        def on_timer(self, now: float) -> list[Action]:
            self.calls.append(now)
            return []

    spin = SimMesh(0, spin_limit=50)
    spin.add_node("s", Spinner(0.0))
    with pytest.raises(SimBusyLoop):
        spin.run_until(1.0)
    assert len(spin.node_as("s", Spinner).calls) == 51


def test_on_step_runs_once_per_event_time_and_at_callbacks() -> None:
    mesh = SimMesh(9, record_frames=True)
    for name in ("a", "b", "c"):
        mesh.add_node(name, Flooder(name, period=0.7))
    mesh.connect("a", "b", LinkProfile(delay=0.01, jitter=0.01))
    mesh.connect("b", "c", LinkProfile(delay=0.02, jitter=0.01))
    fired: list[float] = []
    mesh.at(1.234, lambda m: fired.append(m.now))
    steps: list[float] = []
    mesh.run_until(5.0, on_step=lambda m: steps.append(m.now))
    assert fired == [1.234]
    assert steps == sorted(set(steps))  # strictly increasing: once per distinct time
    assert mesh.frame_log is not None
    assert {t for t, _, _, _ in mesh.frame_log} <= set(steps)
    assert {t for t, _ in mesh.events["a"]} <= set(steps)
    with pytest.raises(ValueError):
        mesh.run_until(4.0)

    def reenter(m: SimMesh) -> None:
        m.run_until(m.now + 1)

    mesh.at(5.5, reenter)
    with pytest.raises(RuntimeError):
        mesh.run_until(6.0)


def test_call_records_actions_and_forwarding_table() -> None:
    mesh = pair(LinkProfile())
    seen: list[tuple[str, float, Action]] = []
    mesh.add_listener(lambda name, now, action: seen.append((name, now, action)))
    mesh.run_until(1.0)
    d = Deliver(b"\x01" * 32, b"payload", 3)
    e = Event("route.changed", {"dst": "x"})
    f1 = ForwardingChanged({b"x": (0, ("b", 0)), b"y": (0, ("b", 0))})
    f2 = ForwardingChanged({b"x": None})
    out = mesh.call("a", lambda n, now: [d, e, f1, f2, SendFrame(0, ("b", 0), b"hi")])
    assert len(out) == 5
    assert mesh.delivered["a"] == [(1.0, d)] and mesh.events["a"] == [(1.0, e)]
    assert mesh.forwarding["a"] == {b"y": (0, ("b", 0))}
    assert [a for _, _, a in seen] == [d, e, f1, f2]
    mesh.run_for(1.0)
    assert probe(mesh, "b").heard[0][3] == b"hi"
    with pytest.raises(TypeError):
        mesh.call("a", lambda n, now: ["not an action"])  # type: ignore[list-item]


# ------------------------------------------------------ properties, scale


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    loss=st.sampled_from([0.0, 0.1, 0.5]),
    jitter=st.sampled_from([0.0, 0.003]),
    reorder=st.sampled_from([0.0, 0.3]),
    duplicate=st.sampled_from([0.0, 0.2]),
    bw=st.sampled_from([None, 200_000.0]),
    sizes=st.lists(st.integers(12, 1500), min_size=1, max_size=60),
)
def test_frame_accounting_and_latency_bounds(
    seed: int,
    loss: float,
    jitter: float,
    reorder: float,
    duplicate: float,
    bw: float | None,
    sizes: list[int],
) -> None:
    prof = LinkProfile(
        loss=loss,
        delay=0.004,
        jitter=jitter,
        reorder=reorder,
        reorder_delay=0.01,
        duplicate=duplicate,
        bandwidth_bps=bw,
        queue_limit=20,
    )
    mesh = pair(prof, seed=seed)
    for i, size in enumerate(sizes):
        send(mesh, "a", ("b", 0), stamped(i, mesh.now, size))
        mesh.run_for(0.001)
    mesh.run_for(10.0)
    s = mesh.stats
    got = len(probe(mesh, "b").heard)
    assert s.sent == s.transmitted == len(sizes)
    dropped = s.lost + s.dropped_mtu + s.dropped_queue + s.dropped_no_link + s.lost_in_flight
    assert got == s.transmitted - dropped + s.duplicated
    slack = 2 * jitter + (0.01 if reorder else 0.0) + 1e-9
    serial = sum(sizes) * 8 / bw if bw else 0.0
    for lat in latencies(mesh):
        assert 0.004 - 1e-9 <= lat <= 0.004 + slack + serial


def test_fifty_nodes_for_five_minutes_is_fast() -> None:
    rnd = random.Random(42)
    mesh = SimMesh(42)
    n = 50
    for i in range(n):
        mesh.add_node(f"n{i}", Flooder(f"n{i}", period=1.0 + rnd.random() / 10))
    prof = LinkProfile(loss=0.05, delay=0.01, jitter=0.005, reorder=0.01, duplicate=0.01)
    for i in range(n):  # ring plus random chords: about 4 links per node
        mesh.connect(f"n{i}", f"n{(i + 1) % n}", prof)
    for _ in range(n):
        x, y = rnd.sample(range(n), 2)
        if (f"n{y}", 0) not in mesh.neighbours(f"n{x}"):
            mesh.connect(f"n{x}", f"n{y}", prof)
    t0 = time.process_time()  # CPU time: the sim's cost, not the machine's other load
    mesh.run_until(300.0)
    elapsed = time.process_time() - t0
    assert mesh.stats.delivered > 50_000
    assert elapsed < 5.0, f"{mesh.stats.events} events took {elapsed:.2f} s of CPU"
