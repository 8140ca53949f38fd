"""A line of NodeStacks in the simulator for MSP tests: A - B - C - D by default."""

from __future__ import annotations

import random
from collections.abc import Callable

from meshpipe.actions import BROADCAST
from meshpipe.dataplane import ShardedNode
from meshpipe.identity import Identity, Sid
from meshpipe.link.recovery import OVERHEAD, RecoveringNode
from meshpipe.msp import Msp, MspParams, Stream
from meshpipe.node import InterfaceParams, Timing
from meshpipe.session import SessionParams
from meshpipe.sim import LinkProfile, SimMesh
from meshpipe.stack import NodeStack
from meshpipe.tunnel import IPNetwork

EPOCH = 1_700_000_000 * 10**9


def path_loss_per_link(path_loss: float, links: int) -> float:
    """Per-link loss that gives ``path_loss`` end to end over ``links`` links."""
    return 1.0 - (1.0 - path_loss) ** (1.0 / links)


class Line:
    """Nodes in a line, routing converged; ``profile`` applies to every link."""

    def __init__(
        self,
        n: int = 4,
        seed: int = 1,
        profile: LinkProfile | None = None,
        msp_params: MspParams | None = None,
        mtu: int = 1400,
        shards: int = 0,
        tunnel_routes: list[tuple[IPNetwork, bytes]] | None = None,
        session_params: SessionParams | None = None,
        hop_recovery: str | None = None,
        timing: Timing | None = None,
    ) -> None:
        """``shards`` > 0: ShardedNodes (sessions in that many crypto shards, as the
        worker processes run them) instead of plain NodeStacks. ``hop_recovery``: put
        every node behind a :class:`RecoveringNode` in that mode, as the workers do."""
        self.sim = SimMesh(seed=seed)
        self.rng = random.Random(seed)
        self.names = [chr(ord("A") + i) for i in range(n)]
        self.ids = {
            m: Identity.from_seed(f"{seed}-{m}".encode().ljust(32, b".")) for m in self.names
        }
        core_mtu = mtu if hop_recovery is None else mtu - OVERHEAD
        for m in self.names:
            ifaces = [InterfaceParams("sim", mtu=core_mtu, flood_dest=BROADCAST, timing=timing)]
            node: NodeStack | ShardedNode
            if shards:
                node = ShardedNode(
                    self.ids[m],
                    ifaces,
                    rng=random.Random(f"{seed}-{m}"),
                    shards=shards,
                    epoch_ns=EPOCH,
                    random_bytes=self.rng.randbytes,
                    msp_params=msp_params,
                    tunnel_routes=tunnel_routes,
                    session_params=session_params,
                )
            else:
                node = NodeStack(
                    self.ids[m],
                    ifaces,
                    rng=random.Random(f"{seed}-{m}"),
                    epoch_ns=EPOCH,
                    random_bytes=self.rng.randbytes,
                    msp_params=msp_params,
                )
            if hop_recovery is None:
                self.sim.add_node(m, node)
            else:
                rec = RecoveringNode(node, [hop_recovery], random.Random(f"{seed}-{m}-hop"))
                self.sim.add_node(m, rec)
        for a, b in zip(self.names, self.names[1:], strict=False):
            self.sim.connect(a, b, LinkProfile(mtu=mtu))
        self.run_until(
            lambda: all(len(self.stack(m).forwarding_table()) == n - 1 for m in self.names), 30.0
        )
        if profile is not None:
            for a, b in zip(self.names, self.names[1:], strict=False):
                self.sim.set_profile(a, b, profile)

    def core(self, name: str) -> object:
        """The node's core (behind its RecoveringNode, if any)."""
        node = self.sim.node(name)
        return node.node if isinstance(node, RecoveringNode) else node

    def recovery(self, name: str) -> RecoveringNode:
        return self.sim.node_as(name, RecoveringNode)

    def stack(self, name: str) -> NodeStack:
        node = self.core(name)
        if isinstance(node, ShardedNode):
            return node.stack
        assert isinstance(node, NodeStack)
        return node

    def sharded(self, name: str) -> ShardedNode:
        node = self.core(name)
        assert isinstance(node, ShardedNode)
        return node

    def msp(self, name: str) -> Msp:
        return self.stack(name).msp

    def sid(self, name: str) -> Sid:
        return self.ids[name].sid

    def open(self, src: str, dst: str, port: int, **kw: object) -> Stream:
        box: list[Stream] = []

        def do(node: NodeStack | ShardedNode, now: float) -> list[object]:
            msp = self.stack(src).msp
            box.append(msp.open(self.sid(dst), port, now, **kw))  # type: ignore[arg-type]
            return list(node.on_timer(now))

        self.sim.call(src, do)  # type: ignore[arg-type]
        return box[0]

    def act(self, name: str, fn: Callable[[NodeStack, float], object]) -> None:
        """Run ``fn`` on a node now and send what it caused."""

        def do(node: NodeStack | ShardedNode, now: float) -> list[object]:
            fn(self.stack(name), now)
            return list(node.on_timer(now)) if node.next_deadline() <= now else []

        self.sim.call(name, do)  # type: ignore[arg-type]

    def run_until(self, cond: Callable[[], bool], limit: float, step: float = 0.05) -> float:
        start = self.sim.now
        while not cond():
            if self.sim.now - start > limit:
                raise AssertionError(f"condition not met within {limit} s simulated")
            self.sim.run_for(step)
        return self.sim.now - start

    @property
    def now(self) -> float:
        return self.sim.now
