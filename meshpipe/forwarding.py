"""The forwarding table and the work done on DATA frames with it.

:class:`NodeCore` (the control worker) keeps one, filled from routing; every
crypto shard (:mod:`meshpipe.dataplane`) keeps a copy pushed to it, so the data
plane sends, receives and forwards DATA frames without asking the control worker.
Only the 66-byte header is read: a frame for another node is forwarded with its
hop limit lowered and is never opened.

Counters (in the ``Counter`` the owner passes in): ``data.sent``,
``data.delivered``, ``data.forwarded``, ``data.no_route``, ``drop.hop_limit``,
``drop.too_big``.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

from meshpipe import wire
from meshpipe.actions import Action, Deliver, LinkAddr, SendFrame

NextHop = tuple[int, LinkAddr]  # (interface index, link address)


class Forwarder:
    def __init__(
        self, sid: bytes, iface_mtus: Sequence[int], counters: collections.Counter[str]
    ) -> None:
        self.sid = bytes(sid)
        self.iface_mtus = tuple(iface_mtus)
        self.counters = counters
        self.table: dict[bytes, NextHop] = {}

    def update(self, entries: Mapping[bytes, NextHop | None], full: bool = False) -> None:
        """Apply changed entries (None removes one); ``full`` replaces the table."""
        if full:
            self.table.clear()
        for dst, hop in entries.items():
            if hop is None:
                self.table.pop(bytes(dst), None)
            else:
                self.table[bytes(dst)] = hop

    def send_data(
        self, dst: bytes, payload: bytes, hop_limit: int = wire.DEFAULT_HOP_LIMIT
    ) -> list[Action]:
        """Route a DATA frame from this node to ``dst``; [] (and data.no_route) if no route."""
        dst = bytes(dst)
        if dst == self.sid:
            return [Deliver(self.sid, payload, 0)]
        hop = self.table.get(dst)
        if hop is None:
            self.counters["data.no_route"] += 1
            return []
        frame = wire.encode_data(dst, self.sid, payload, hop_limit)
        if len(frame) > self.iface_mtus[hop[0]]:
            self.counters["drop.too_big"] += 1
            return []
        self.counters["data.sent"] += 1
        return [SendFrame(hop[0], hop[1], frame)]

    def send_many(self, dst: bytes, payloads: list[bytes]) -> list[Action]:
        """send_data for several payloads to one ``dst`` (the fragments of one packet):
        one lookup, one header; the first payload must be the largest."""
        dst = bytes(dst)
        hop = self.table.get(dst)
        if hop is None or dst == self.sid:
            return [a for p in payloads for a in self.send_data(dst, p)]
        head = wire.DATA_HEADER.pack(
            (wire.WIRE_VERSION << 4) | wire.KIND_DATA, wire.DEFAULT_HOP_LIMIT, dst, self.sid
        )
        if len(head) + len(payloads[0]) > self.iface_mtus[hop[0]]:
            self.counters["drop.too_big"] += len(payloads)
            return []
        self.counters["data.sent"] += len(payloads)
        iface, addr = hop
        return [SendFrame(iface, addr, head + p) for p in payloads]

    def on_data(self, frame: bytes) -> list[Action]:
        """A received DATA frame: Deliver if it is ours, else forward it (or drop, counted).

        Raises FrameError for a malformed header (the caller counts it)."""
        hop_limit, dst, src = wire.decode_data_header(frame)
        if hop_limit == 0:
            self.counters["drop.hop_limit"] += 1
            return []
        if dst == self.sid:
            self.counters["data.delivered"] += 1
            hops = wire.DEFAULT_HOP_LIMIT - hop_limit + 1
            return [Deliver(src, wire.data_payload(frame), hops)]
        if hop_limit <= 1:
            self.counters["drop.hop_limit"] += 1  # it would leave with hop limit 0
            return []
        hop = self.table.get(dst)
        if hop is None:
            self.counters["data.no_route"] += 1
            return []
        if len(frame) > self.iface_mtus[hop[0]]:
            self.counters["drop.too_big"] += 1
            return []
        self.counters["data.forwarded"] += 1
        return [SendFrame(hop[0], hop[1], wire.with_hop_limit(frame, hop_limit - 1))]
