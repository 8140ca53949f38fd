"""Sessions and MDP across a simulated 20-node mesh (NodeStack in SimMesh)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from meshpipe.actions import BROADCAST
from meshpipe.identity import Identity, Sid
from meshpipe.node import InterfaceParams
from meshpipe.session import (
    TRANSPORT_OVERHEAD,
    TYPE_INIT,
    TYPE_RESP,
    TYPE_TRANSPORT,
    SessionManager,
    SessionParams,
    Transmit,
)
from meshpipe.sim import SimMesh
from meshpipe.stack import NodeStack
from meshpipe.wire import DATA_HEADER_LEN, KIND_DATA, decode_data_header, encode_data

PORT = 9000
EPOCH = 1_700_000_000 * 10**9
ROWS, COLS = 4, 5  # a 4 x 5 grid: up to 7 hops corner to corner


class Mesh:
    """20 NodeStacks on a grid of point-to-point links, with routing converged."""

    def __init__(
        self, seed: int = 1, params: SessionParams | None = None, record: bool = False
    ) -> None:
        self.params = params
        self.sim = SimMesh(seed=seed, record_frames=record)
        self.rng = random.Random(seed)
        self.names = [f"n{i}" for i in range(ROWS * COLS)]
        self.ids = {
            n: Identity.from_seed(f"{seed}-{n}".encode().ljust(32, b".")) for n in self.names
        }
        self.by_sid = {bytes(i.sid): n for n, i in self.ids.items()}
        for n in self.names:
            self.sim.add_node(n, self.make(n, EPOCH, 0.0))
        for i, n in enumerate(self.names):
            r, c = divmod(i, COLS)
            if c + 1 < COLS:
                self.sim.connect(n, self.names[i + 1])
            if r + 1 < ROWS:
                self.sim.connect(n, self.names[i + COLS])
        self.run_until(lambda: all(self.converged(n) for n in self.names), 30.0)

    def make(self, name: str, epoch_ns: int, now: float) -> NodeStack:
        st = NodeStack(
            self.ids[name],
            [InterfaceParams("sim", flood_dest=BROADCAST)],
            now=now,
            rng=random.Random(f"{name}-{epoch_ns}"),
            epoch_ns=epoch_ns,
            session_params=self.params,
            random_bytes=self.rng.randbytes,
        )
        st.bind(PORT)
        return st

    def node(self, name: str) -> NodeStack:
        return self.sim.node_as(name, NodeStack)

    def sid(self, name: str) -> Sid:
        return self.ids[name].sid

    def converged(self, name: str) -> bool:
        return len(self.node(name).forwarding_table()) == len(self.names) - 1

    def run_until(self, cond: Callable[[], bool], limit: float, step: float = 0.1) -> float:
        """Run until ``cond()``; return the simulated time it took."""
        start = self.sim.now
        while not cond():
            assert self.sim.now - start < limit, "condition not met in time"
            self.sim.run_for(step)
        return self.sim.now - start

    def send(self, a: str, b: str, payload: bytes, src_port: int = 1234) -> None:
        dst = self.sid(b)
        self.sim.call(a, lambda node, now: node.mdp_send(dst, src_port, PORT, payload, now))

    def recv(self, name: str) -> list[tuple[str, bytes, int]]:
        return [(self.by_sid[d.src], d.payload, d.hops) for d in self.node(name).recv(PORT)]

    def c(self, name: str, key: str) -> int:
        return self.node(name).counters[key]

    def next_hop(self, a: str, b: str) -> str:
        iface_addr = self.node(a).forwarding_table()[bytes(self.sid(b))][1]
        assert isinstance(iface_addr, tuple)
        return str(iface_addr[0])

    def path(self, a: str, b: str) -> list[str]:
        p = [a]
        while p[-1] != b:
            p.append(self.next_hop(p[-1], b))
        return p


def _e2e_drops(m: Mesh, name: str) -> dict[str, int]:
    """Drops above routing: sessions, MDP, the stack (not link-local flooding: a node
    record from a neighbour whose hello has not arrived yet is dropped at start)."""
    c = m.node(name).counters
    return {
        k: v
        for k, v in c.items()
        if ".drop." in k and v and not k.startswith(("drop.", "noderec."))
    }


def corner_pair(m: Mesh) -> tuple[str, str]:
    return m.names[0], m.names[-1]


def _session_type(frame: bytes) -> int:
    return frame[DATA_HEADER_LEN] if len(frame) > DATA_HEADER_LEN else -1


def _is_data_to(frame: bytes, dst: Sid) -> bool:
    return frame[0] & 0x0F == KIND_DATA and frame[2:34] == bytes(dst)


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh()


def test_datagrams_between_random_pairs(mesh: Mesh) -> None:
    rng = random.Random(7)
    sent: dict[str, list[tuple[str, bytes]]] = {n: [] for n in mesh.names}
    for k in range(300):
        a, b = rng.sample(mesh.names, 2)
        payload = b"dg-%d-" % k + bytes(rng.randrange(200))
        mesh.send(a, b, payload)
        sent[b].append((a, payload))
        mesh.sim.run_for(0.02)
    mesh.sim.run_for(3.0)
    for n in mesh.names:
        got = mesh.recv(n)
        assert sorted((s, p) for s, p, _ in got) == sorted(sent[n])
        for src in mesh.names:  # each source's datagrams arrive in order (no loss, FIFO)
            assert [p for s, p, _ in got if s == src] == [p for s, p in sent[n] if s == src]
        for src, _, hops in got:
            route = {bytes(r.sid): r for r in mesh.node(src).routes()}[bytes(mesh.sid(n))]
            assert hops == route.hops
    for n in mesh.names:
        drops = _e2e_drops(mesh, n)
        assert not drops, (n, drops)
    assert mesh.sim.stats.lost == 0


def test_ping_across_the_mesh(mesh: Mesh) -> None:
    a, b = corner_pair(mesh)
    mesh.sim.call(a, lambda node, now: node.ping(mesh.sid(b), now, size=100))
    mesh.sim.run_for(2.0)
    (reply,) = mesh.node(a).ping_replies()
    assert reply.hops == len(mesh.path(a, b)) - 1 == 7


def test_transit_bit_flips_detected(mesh: Mesh) -> None:
    a, b = corner_pair(mesh)
    mesh.send(a, b, b"warm up")  # a session first, so the flips hit transport packets
    mesh.sim.run_for(1.0)
    assert mesh.recv(b) == [(a, b"warm up", 7)]
    path = mesh.path(a, b)
    m, after = path[3], path[4]  # a transit node in the middle flips bits
    flipped = 0
    rng = random.Random(3)

    def flip(frame: bytes) -> bytes:
        nonlocal flipped
        if not _is_data_to(frame, mesh.sid(b)) or _session_type(frame) != TYPE_TRANSPORT:
            return frame
        i = rng.randrange(DATA_HEADER_LEN + 13, len(frame))  # ciphertext or tag
        flipped += 1
        bad = bytearray(frame)
        bad[i] ^= 1 << rng.randrange(8)
        return bytes(bad)

    before = mesh.c(b, "session.drop.bad_tag")
    mesh.sim.set_tamper(m, after, flip)
    for k in range(50):
        mesh.send(a, b, b"tamper %d" % k)
        mesh.sim.run_for(0.05)
    mesh.sim.run_for(1.0)
    mesh.sim.set_tamper(m, after, None)
    assert flipped >= 50
    assert mesh.c(b, "session.drop.bad_tag") - before == flipped  # every one, no more
    assert mesh.recv(b) == []
    mesh.send(a, b, b"after")
    mesh.sim.run_for(1.0)
    assert mesh.recv(b) == [(a, b"after", 7)]


def test_transit_replay_detected() -> None:
    m = Mesh(seed=2, record=True)
    a, b = corner_pair(m)
    transit = m.path(a, b)[2]
    for k in range(20):
        m.send(a, b, b"once %d" % k)
        m.sim.run_for(0.05)
    m.sim.run_for(1.0)
    assert len(m.recv(b)) == 20
    assert m.sim.frame_log is not None
    # Everything the transit node saw heading for b, handed back to it later.
    seen = [
        (src, frame)
        for _, src, dst, frame in m.sim.frame_log
        if dst == (transit, 0) and _is_data_to(frame, m.sid(b))
    ]
    kinds = [_session_type(f) for _, f in seen]
    n_transport = kinds.count(TYPE_TRANSPORT)
    assert n_transport >= 20 and kinds.count(TYPE_INIT) == 1
    before = {k: m.c(b, k) for k in ("session.drop.replay", "session.drop.replayed_init")}
    for src, frame in seen:
        m.sim.inject(transit, 0, src, frame)
    m.sim.run_for(1.0)
    assert m.c(b, "session.drop.replay") - before["session.drop.replay"] == n_transport
    assert m.c(b, "session.drop.replayed_init") - before["session.drop.replayed_init"] == 1
    assert m.recv(b) == []
    # b's response replayed towards a is for a finished handshake: unknown index.
    back = [
        (src, dst, f)
        for _, src, dst, f in m.sim.frame_log
        if _is_data_to(f, m.sid(a)) and _session_type(f) == TYPE_RESP
    ]
    assert len(back) == len(m.path(b, a)) - 1  # one copy per hop
    src, dst, f = back[0]
    assert isinstance(dst, tuple)
    before_a = m.c(a, "session.drop.unknown_index")
    m.sim.inject(str(dst[0]), 0, src, f)
    m.sim.run_for(1.0)
    assert m.c(a, "session.drop.unknown_index") - before_a == 1


def test_forged_source_detected(mesh: Mesh) -> None:
    a, b = corner_pair(mesh)
    c = mesh.names[COLS - 1]
    path = mesh.path(a, b)
    transit, after = path[3], path[4]
    captured: list[bytes] = []

    def grab(frame: bytes) -> bytes:
        if (
            _is_data_to(frame, mesh.sid(b))
            and _session_type(frame) == TYPE_TRANSPORT
            and len(frame) > DATA_HEADER_LEN + TRANSPORT_OVERHEAD
        ):
            captured.append(frame)
        return frame

    mesh.sim.set_tamper(transit, after, grab)
    for k in range(10):
        mesh.send(a, b, b"real %d" % k)
        mesh.sim.run_for(0.05)
    mesh.sim.run_for(1.0)
    mesh.sim.set_tamper(transit, after, None)
    assert len(mesh.recv(b)) == 10 and len(captured) == 10
    before = mesh.c(b, "session.drop.forged_source")
    # 1. a's genuine ciphertext, re-labelled as coming from c (replay cannot catch it
    #    first: these counters were never seen under c's name).
    for f in captured:
        hop_limit, dst, _ = decode_data_header(f)
        forged = encode_data(dst, bytes(mesh.sid(c)), f[DATA_HEADER_LEN:], hop_limit)
        mesh.sim.inject(after, 0, (transit, 0), forged)
    # 2. The transit node's own, perfectly valid Noise init, claiming to be a.
    me = SessionManager(mesh.ids[transit], mesh.sim.now, random.Random(1), EPOCH * 2)
    for k in range(5):
        outs = me.send(mesh.sid(b), b"i am a", mesh.sim.now + k)
        (init,) = [o.payload for o in outs if isinstance(o, Transmit)]
        me = SessionManager(mesh.ids[transit], mesh.sim.now, random.Random(k), EPOCH * 3 + k)
        forged = encode_data(bytes(mesh.sid(b)), bytes(mesh.sid(a)), init)
        mesh.sim.inject(after, 0, (transit, 0), forged)
    mesh.sim.run_for(1.0)
    assert mesh.c(b, "session.drop.forged_source") - before == 10 + 5
    assert mesh.recv(b) == []
    # The real session is untouched.
    mesh.send(a, b, b"still me")
    mesh.sim.run_for(1.0)
    assert mesh.recv(b) == [(a, b"still me", 7)]


def test_rekey_under_continuous_traffic_loses_nothing() -> None:
    p = SessionParams(
        rekey_after_messages=25, rekey_after_time=4.0, init_rate=50.0, init_burst=50.0
    )
    m = Mesh(seed=3, params=p)
    pairs = [(m.names[0], m.names[-1]), (m.names[7], m.names[12]), (m.names[4], m.names[15])]
    for k in range(400):  # 20 s at 20 datagrams per second each way per pair
        for a, b in pairs:
            m.send(a, b, b"%s>%d" % (a.encode(), k))
            m.send(b, a, b"%s>%d" % (b.encode(), k))
        m.sim.run_for(0.05)
    m.sim.run_for(3.0)
    for a, b in pairs:
        for x, y in ((a, b), (b, a)):
            got = [p for s, p, _ in m.recv(y) if s == x]
            assert got == [b"%s>%d" % (x.encode(), k) for k in range(400)], (x, y)
        rekeys = m.node(a).sessions()
        (row,) = [r for r in rekeys if r["peer"] == str(m.sid(b))]
        assert row["rekeys"] >= 12  # both ends send: a rekey every ~25 packets in all
    for n in m.names:
        drops = _e2e_drops(m, n)
        assert not drops, (n, drops)


def test_restarted_node_talks_again_within_one_retry() -> None:
    m = Mesh(seed=4)
    r, p = m.names[6], m.names[18]
    m.send(r, p, b"before")
    m.send(p, r, b"before too")
    m.sim.run_for(1.0)
    assert [x for _, x, _ in m.recv(p)] == [b"before"]
    assert [x for _, x, _ in m.recv(r)] == [b"before too"]
    m.sim.run_for(12.0)  # keepalives exchanged; p still holds its old session with r
    m.sim.replace_node(r, m.make(r, EPOCH + 60 * 10**9, m.sim.now))
    m.run_until(lambda: bytes(m.sid(p)) in m.node(r).forwarding_table(), 20.0)
    t0 = m.sim.now
    m.send(r, p, b"i am back")
    got: list[tuple[str, bytes, int]] = []

    def arrived() -> bool:
        got.extend(m.recv(p))
        return bool(got)

    took = m.run_until(arrived, 5.0, 0.01)
    assert took <= SessionParams().handshake_retry_initial, took
    assert [x for _, x, _ in got] == [b"i am back"]
    assert m.c(p, "session.rekeyed") >= 1  # the fresh init replaced the old session
    m.send(p, r, b"welcome back")
    m.sim.run_for(1.0)
    assert [x for _, x, _ in m.recv(r)] == [b"welcome back"]
    assert m.sim.now - t0 < 3.0


def test_restart_seen_from_the_other_side() -> None:
    """The survivor speaks first: its packets hit keys the restarted node forgot, and
    the restarted node handshakes at once (restart probe), long before the survivor's
    liveness timer (keepalive + rekey timeout) would have."""
    m = Mesh(seed=5)
    r, p = m.names[3], m.names[16]
    m.send(p, r, b"before")
    m.sim.run_for(12.0)  # r's keepalive reached p
    assert [x for _, x, _ in m.recv(r)] == [b"before"]
    m.sim.replace_node(r, m.make(r, EPOCH + 60 * 10**9, m.sim.now))
    m.run_until(lambda: bytes(m.sid(r)) in m.node(p).forwarding_table(), 20.0)
    m.run_until(lambda: bytes(m.sid(p)) in m.node(r).forwarding_table(), 20.0)
    t0 = m.sim.now
    got: list[tuple[str, bytes, int]] = []

    def tick() -> bool:
        m.send(p, r, b"hello?")
        m.sim.run_for(0.5)
        got.extend(m.recv(r))
        return bool(got)

    m.run_until(tick, 30.0, step=0.0)
    assert m.sim.now - t0 <= 2.0  # the first packet's drop starts the handshake
    assert m.c(p, "session.peer_silent") == 0
    assert m.c(r, "session.drop.unknown_index") >= 1
    assert m.c(r, "session.handshake.restart_probe") == 1
