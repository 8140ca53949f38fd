"""Kernel-side packet loss for tests and the demo: nftables drop rules in a namespace.

This kernel has no netem, so loss is a ``numgen random`` rule in an output chain of
the node's own namespace (never the host's): every UDP frame the node sends to the
mesh port is dropped with the given probability, i.e. each link direction leaving
that node loses that share. nftables sees a UDP GSO batch as one packet, so per-frame
loss also needs the node's ``[workers] udp_offload = false`` and the veths'
offloads off (:func:`offloads_off`).
"""

from __future__ import annotations

from meshpipe_workers.netns import Link, Topology

TABLE = "meshpipe_loss"


def _nft(topo: Topology, name: str, *args: str) -> None:
    res = topo.run(name, ["nft", *args], timeout=10)
    if res.returncode != 0:
        raise RuntimeError(f"nft {' '.join(args)} in {name}: {res.stderr.strip()}")


def add_udp_loss(
    topo: Topology, name: str, port: int, percent: int, towards: str | None = None
) -> None:
    """Drop ``percent`` % of the UDP datagrams node ``name`` sends to ``port`` (only
    those on its link to node ``towards``, if given)."""
    if not 0 <= percent <= 100:
        raise ValueError("percent is 0-100")
    clear_loss(topo, name)
    _nft(topo, name, "add", "table", "inet", TABLE)
    _nft(
        topo,
        name,
        "add",
        "chain",
        "inet",
        TABLE,
        "out",
        "{ type filter hook output priority 0 ; }",
    )
    rule = f"udp dport {port} numgen random mod 100 < {percent} counter drop"
    if towards is not None:
        rule = f"oifname {link_between(topo, name, towards).ifname} {rule}"
    _nft(topo, name, "add", "rule", "inet", TABLE, "out", *rule.split())


def link_between(topo: Topology, one: str, other: str) -> Link:
    for link in topo.links:
        if {link.left, link.right} == {one, other}:
            return link
    raise KeyError(f"no link between {one!r} and {other!r}")


def clear_loss(topo: Topology, name: str) -> None:
    """Remove the loss rules of node ``name`` (nothing if there are none)."""
    topo.run(name, ["nft", "delete", "table", "inet", TABLE], timeout=10)


def dropped(topo: Topology, name: str) -> int:
    """Packets the loss rule of node ``name`` has dropped so far."""
    res = topo.run(name, ["nft", "list", "table", "inet", TABLE], timeout=10)
    for word, nxt in zip(res.stdout.split(), res.stdout.split()[1:], strict=False):
        if word == "packets":
            return int(nxt)
    return 0


def offloads_off(topo: Topology, name: str) -> None:
    """GSO/TSO/GRO off on every veth of node ``name``, so nftables sees single frames."""
    for link in topo.links:
        if name in (link.left, link.right):
            topo.run(name, ["ethtool", "-K", link.ifname, "gso", "off", "tso", "off", "gro", "off"])


__all__ = ["add_udp_loss", "clear_loss", "dropped", "link_between", "offloads_off"]
