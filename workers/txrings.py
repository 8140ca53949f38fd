"""SendFrame actions -> records on the interface and radio workers' tx rings.

Used by every producer of frames (the control worker and each crypto worker; each
has its own tx ring to every interface worker, as the rings are single-producer).
Records for one ring are published as one batch, with one wake-up, by ``flush``.
"""

from __future__ import annotations

from collections import Counter

from meshpipe.actions import BROADCAST, MULTICAST, SendFrame
from meshpipe.config import Config
from meshpipe.link.kiss import RADIO_BROADCAST
from meshpipe_workers import messages as msg
from meshpipe_workers import radio
from meshpipe_workers.ring import Ring


class FrameSender:
    def __init__(self, cfg: Config, rings: dict[int, list[Ring]], counters: Counter[str]) -> None:
        self.radio = [i.kind == "radio" for i in cfg.interfaces]
        self.rings = rings  # interface index -> its workers' rings (worker k at k)
        self.counters = counters
        self.pending: dict[Ring, list[bytes]] = {}

    def queue(self, a: SendFrame) -> None:
        workers = self.rings.get(a.iface)
        if not workers:
            self.counters["drop.no_interface"] += 1
            return
        if self.radio[a.iface]:
            # Radio link addresses are ints; flooding is one broadcast transmission.
            if a.dest == BROADCAST or a.dest == MULTICAST:
                dst = RADIO_BROADCAST
            elif isinstance(a.dest, int):
                dst = a.dest
            else:
                self.counters["drop.bad_dest"] += 1
                return
            rec, ring = radio.radio_send(dst, a.frame), workers[0]
        elif a.dest == MULTICAST:
            rec, ring = msg.multicast(a.frame), workers[0]
        elif isinstance(a.dest, tuple):
            # Several workers share the socket (SO_REUSEPORT): one peer, one worker.
            rec, ring = msg.send(a.dest, a.frame), workers[hash(a.dest) % len(workers)]
        else:
            self.counters["drop.bad_dest"] += 1
            return
        self.pending.setdefault(ring, []).append(rec)

    def flush(self) -> None:
        flush_batches(self.pending, self.counters, "drop.tx_queue_full")


def flush_batches(pending: dict[Ring, list[bytes]], counters: Counter[str], drop: str) -> None:
    """Publish each ring's records as one batch; what does not fit is counted as ``drop``."""
    for ring, recs in pending.items():
        written = ring.put_batch(recs)
        if written < len(recs):
            counters[drop] += len(recs) - written
    pending.clear()
