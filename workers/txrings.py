"""SendFrame actions -> records on the interface and radio workers' tx rings.

Used by every producer of frames (the control worker and each crypto worker; each
has its own tx ring to every interface worker, as the rings are single-producer).
Records for one ring are published as one batch, with one wake-up, by ``flush``.
Frames queued in a row for one UDP peer, of one size (the last maybe shorter: the
fragments of one packet, meshpipe/fragments.py) travel as one ``REC_SEND_RUN``
record, sent with one UDP GSO call.
"""

from __future__ import annotations

from collections import Counter

from meshpipe.actions import BROADCAST, MULTICAST, SendFrame
from meshpipe.config import Config
from meshpipe.link.kiss import RADIO_BROADCAST
from meshpipe_workers import messages as msg
from meshpipe_workers import radio
from meshpipe_workers.ring import Ring

# A run record holds what one UDP GSO send can carry (workers/interface.py).
RUN_MAX_FRAMES = 64
RUN_MAX_BYTES = 60000  # below 64 kB with every frame's per-hop recovery header


class FrameSender:
    def __init__(self, cfg: Config, rings: dict[int, list[Ring]], counters: Counter[str]) -> None:
        self.radio = [i.kind == "radio" for i in cfg.interfaces]
        self.rings = rings  # interface index -> its workers' rings (worker k at k)
        self.counters = counters
        self.pending: dict[Ring, list[bytes]] = {}
        self._run: tuple[Ring, msg.UdpAddr, list[bytes]] | None = None

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
            ring = workers[hash(a.dest) % len(workers)]
            run = self._run
            if (
                run is not None
                and run[0] is ring
                and run[1] == a.dest
                and _extends(run[2], a.frame)
            ):
                run[2].append(a.frame)
                return
            self._close_run()
            self._run = (ring, a.dest, [a.frame])
            return
        else:
            self.counters["drop.bad_dest"] += 1
            return
        self._close_run()  # records to one ring keep their order
        self.pending.setdefault(ring, []).append(rec)

    def _close_run(self) -> None:
        """Frames queued for one peer in a row: one record (REC_SEND_RUN for several)."""
        if self._run is None:
            return
        ring, addr, frames = self._run
        self._run = None
        rec = msg.send(addr, frames[0]) if len(frames) == 1 else msg.send_run(addr, frames)
        self.pending.setdefault(ring, []).append(rec)

    def flush(self) -> None:
        self._close_run()
        flush_batches(self.pending, self.counters, "drop.tx_queue_full")


def _extends(run: list[bytes], frame: bytes) -> bool:
    """Can ``frame`` join ``run`` in one GSO send (equal sizes, only the last shorter)?"""
    size = len(run[0])
    return (
        len(frame) <= size
        and len(run[-1]) == size
        and len(run) < RUN_MAX_FRAMES
        and (len(run) + 1) * size <= RUN_MAX_BYTES
    )


def flush_batches(pending: dict[Ring, list[bytes]], counters: Counter[str], drop: str) -> None:
    """Publish each ring's records as one batch; what does not fit is counted as ``drop``."""
    for ring, recs in pending.items():
        written = ring.put_batch(recs)
        if written < len(recs):
            counters[drop] += len(recs) - written
    pending.clear()
