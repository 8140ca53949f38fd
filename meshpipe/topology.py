"""The mesh as one node knows it, from the node records: nodes, links and a Graphviz picture.

Nodes are this node and every node with a live record that is reachable (a route or a
neighbour), so a node that stopped leaves the picture when routing forgets it, not only
when its record expires. Links come from the records' neighbour lists, between listed
nodes only, one per pair of nodes (``a`` the lower SID); when both ends report the link,
its cost is the higher of the two (the worse direction bounds the pair)::

    {"self": sid, "nodes": [{"sid", "name"}], "links": [{"a", "b", "cost"}]}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshpipe.noderecord import NodeRecord


def build(self_sid: bytes, records: Iterable[NodeRecord], reachable: set[bytes]) -> dict[str, Any]:
    me = bytes(self_sid)
    live = {bytes(r.origin): r for r in records if bytes(r.origin) in reachable | {me}}
    costs: dict[tuple[bytes, bytes], int] = {}
    for origin, r in live.items():
        for nb, cost in r.neighbours:
            nb = bytes(nb)
            if nb not in live:
                continue
            pair = (min(origin, nb), max(origin, nb))
            costs[pair] = max(cost, costs.get(pair, 0))
    return {
        "self": me.hex(),
        "nodes": [{"sid": s.hex(), "name": live[s].name} for s in sorted(live)],
        "links": [{"a": a.hex(), "b": b.hex(), "cost": c} for (a, b), c in sorted(costs.items())],
    }


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _quote(text: str) -> str:
    return f'"{_esc(text)}"'


def to_dot(topo: dict[str, Any]) -> str:
    """A Graphviz (dot) graph: one box per node (name and short SID), this node filled."""
    lines = [
        "graph mesh {",
        "  node [shape=box, fontname=Helvetica];",
        "  edge [fontname=Helvetica];",
    ]
    for n in topo["nodes"]:
        label = f"{_esc(n['name'])}\\n{n['sid'][:8]}" if n["name"] else n["sid"][:8]
        style = (
            ", style=filled, fillcolor=lightblue, penwidth=2" if n["sid"] == topo["self"] else ""
        )
        lines.append(f'  {_quote(n["sid"][:16])} [label="{label}"{style}];')
    for link in topo["links"]:
        a, b = _quote(link["a"][:16]), _quote(link["b"][:16])
        lines.append(f"  {a} -- {b} [label={_quote(str(link['cost']))}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


__all__ = ["build", "to_dot"]
