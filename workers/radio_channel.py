"""A simulated packet-radio channel for tests: pseudo-terminals on one shared air.

Each station gets a pseudo-terminal (``os.openpty``); a node opens the slave path
as its radio ``device``. A relay thread reads KISS frames from every master into
that station's send queue and puts them on the air, each taking ``len *
bits_per_byte / rate_bps`` seconds (10 bits a byte, as on an async serial line).

Access is CSMA-like: a station with a frame waits until it hears the channel idle,
then a random backoff of 0..``cw`` slots (``slot`` seconds each; a fresh one each
time it finds the channel busy), then sends. A transmission is heard by the others
only ``sense_delay`` seconds after it starts (a radio's receive-to-transmit
turnaround), so two stations that start within that time collide. ``hidden`` pairs
of stations do not hear each other at all: they never defer to each other, and a
station that hears both loses both frames when they overlap (the hidden-node
problem). Every station hearing a frame that overlapped no other frame it hears
gets it, each losing it independently with probability ``loss``. Up to
``max_queue`` bytes wait in all queues together, beyond which frames are dropped.

The channel counts what crossed the air (``stats()``), which is how the tests
measure a radio's idle control traffic: ``air.bytes``/``air.frames`` overall,
``air.bytes.<kind>`` by the first byte of the mesh frame (``hello``, ``routing``,
``data``, ``node``, ``discovery``, ``link``, ``trace``, ``compressed``, ``lc.control``
for the compression's context frames), ``tx.bytes.<name>`` per station,
``delivered``, ``lost``, ``collided``, ``drop.queue_full``, ``drop.rx_full``.
"""

from __future__ import annotations

import os
import random
import selectors
import threading
import time
import tty
from collections import Counter, deque
from dataclasses import dataclass, field
from types import TracebackType

from meshpipe import wire
from meshpipe.link import compress, kiss

DEFAULT_RATE = 19_200
KIND_NAMES = {
    wire.KIND_HELLO: "hello",
    wire.KIND_ROUTING: "routing",
    wire.KIND_DATA: "data",
    wire.KIND_DISCOVERY: "discovery",
    wire.KIND_LINK: "link",
    wire.KIND_NODE: "node",
    wire.KIND_TRACE: "trace",
}


def frame_class(frame: bytes) -> str:
    """What a radio frame (link header + mesh frame, before KISS) carries, for stats."""
    body = frame[kiss.RADIO_HEADER_LEN :]
    if not body:
        return "empty"
    if compress.is_link_frame(body):
        return "compressed" if body[0] < compress.T_DEFINE else "lc.control"
    if body[0] >> 4 == wire.WIRE_VERSION:
        return KIND_NAMES.get(body[0] & 0x0F, f"kind{body[0] & 0x0F}")
    return "other"


@dataclass
class Station:
    name: str
    master: int
    slave: int  # kept open so the master never sees a hang-up while a node restarts
    path: str
    decoder: kiss.KissDecoder = field(default_factory=lambda: kiss.KissDecoder(1 << 16))
    queue: deque[tuple[bytes, str]] = field(default_factory=deque)
    ready_at: float | None = None  # end of the backoff, once it has heard the air idle


@dataclass
class _Tx:
    sender: Station
    wire: bytes
    what: str
    start: float
    end: float
    hit: set[str] = field(default_factory=set)  # receivers for which it collided


class RadioChannel:
    """One broadcast channel shared by the named stations."""

    def __init__(
        self,
        names: list[str],
        rate_bps: int = DEFAULT_RATE,
        loss: float = 0.0,
        seed: int = 0,
        bits_per_byte: int = 10,
        max_queue: int = 64 * 1024,
        *,
        slot: float = 0.005,
        cw: int = 15,
        sense_delay: float = 0.002,
        hidden: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.rate_bps = rate_bps
        self.slot = slot
        self.cw = cw
        self.sense_delay = sense_delay
        self.hidden = {frozenset(p) for p in hidden}
        self.loss = loss
        self.bits_per_byte = bits_per_byte
        self.max_queue = max_queue
        self.rng = random.Random(seed)
        self.stations: dict[str, Station] = {}
        self._counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._on_air: list[_Tx] = []
        self._queued = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            for name in names:
                master, slave = os.openpty()
                tty.setraw(slave)  # no echo, no line editing: bytes pass untouched
                os.set_blocking(master, False)
                self.stations[name] = Station(name, master, slave, os.ttyname(slave))
        except BaseException:
            self.close()
            raise

    def path(self, name: str) -> str:
        """The device path a node named ``name`` should open."""
        return self.stations[name].path

    def stats(self) -> dict[str, int]:
        """Counters: ``air.bytes``/``air.frames`` overall and ``tx.bytes.<name>`` per
        station, ``delivered``, ``lost``, ``drop.queue_full``, ``drop.rx_full``."""
        with self._lock:
            return dict(self._counters)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> RadioChannel:
        self._thread = threading.Thread(target=self._run, name="radio-channel", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> RadioChannel:
        return self.start()

    def __exit__(
        self,
        typ: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        for st in self.stations.values():
            for fd in (st.master, st.slave):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.stations.clear()

    # -- the relay ----------------------------------------------------------------------

    def hears(self, listener: Station, sender: Station) -> bool:
        return listener is not sender and frozenset((listener.name, sender.name)) not in self.hidden

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for st in self.stations.values():
            sel.register(st.master, selectors.EVENT_READ, st)
        while not self._stop.is_set():
            wake = self._step(time.monotonic())
            timeout = min(0.1, max(0.0, wake - time.monotonic()))
            for key, _ in sel.select(timeout):
                self._read(key.data)

    def _busy_for(self, st: Station, now: float) -> float | None:
        """When the air ``st`` hears goes idle, or None if it hears it idle now."""
        ends = [
            tx.end
            for tx in self._on_air
            if self.hears(st, tx.sender) and tx.start + self.sense_delay <= now < tx.end
        ]
        return max(ends) if ends else None

    def _step(self, now: float) -> float:
        """Finish, deliver and start transmissions; return when to look again."""
        for tx in [t for t in self._on_air if t.end <= now]:
            self._on_air.remove(tx)
            self._deliver(tx)
        wake = now + 0.1
        for st in self.stations.values():
            if not st.queue or any(t.sender is st for t in self._on_air):
                continue
            busy = self._busy_for(st, now)
            if busy is not None:  # defer, and draw a new backoff for after it
                st.ready_at = busy + self.rng.randint(0, self.cw) * self.slot
                wake = min(wake, busy)
                continue
            if st.ready_at is None:
                st.ready_at = now + self.rng.randint(0, self.cw) * self.slot
            if now < st.ready_at:
                wake = min(wake, st.ready_at)
                continue
            st.ready_at = None
            frame, what = st.queue.popleft()
            with self._lock:
                self._queued -= len(frame)
            tx = _Tx(st, frame, what, now, now + len(frame) * self.bits_per_byte / self.rate_bps)
            for other in self._on_air:  # overlaps: each hurts the receivers hearing both
                for rx in self.stations.values():
                    if self.hears(rx, st) and self.hears(rx, other.sender):
                        tx.hit.add(rx.name)
                        other.hit.add(rx.name)
                tx.hit.add(other.sender.name)  # half duplex: a sender hears nothing
                other.hit.add(st.name)
            self._on_air.append(tx)
        for tx in self._on_air:
            sensed = tx.start + self.sense_delay
            wake = min(wake, tx.end, sensed if sensed > now else wake)
        return wake

    def _read(self, st: Station) -> None:
        try:
            data = os.read(st.master, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            time.sleep(0.01)  # EIO: nobody has the slave open right now
            return
        for frame in st.decoder.feed(data):
            wire_bytes = kiss.encode(frame)
            with self._lock:
                if self._queued + len(wire_bytes) > self.max_queue:
                    self._counters["drop.queue_full"] += 1
                    continue
                self._counters[f"tx.bytes.{st.name}"] += len(wire_bytes)
                self._counters[f"tx.frames.{st.name}"] += 1
                self._queued += len(wire_bytes)
            st.queue.append((wire_bytes, frame_class(frame)))

    def _deliver(self, tx: _Tx) -> None:
        with self._lock:
            self._counters["air.bytes"] += len(tx.wire)
            self._counters[f"air.bytes.{tx.what}"] += len(tx.wire)
            self._counters["air.frames"] += 1
        for st in self.stations.values():
            if not self.hears(st, tx.sender):
                continue
            if st.name in tx.hit:
                outcome = "collided"
            elif self.loss and self.rng.random() < self.loss:
                outcome = "lost"
            else:
                try:
                    os.write(st.master, tx.wire)
                    outcome = "delivered"
                except OSError:
                    outcome = "drop.rx_full"  # the node is not reading (or not running)
            with self._lock:
                self._counters[outcome] += 1


def radio_interface_toml(device: str, baud: int = DEFAULT_RATE, name: str = "radio0") -> str:
    """An ``[[interface]]`` table for a radio on ``device`` (for Lab's node_config)."""
    return f'[[interface]]\nname = "{name}"\nkind = "radio"\ndevice = "{device}"\nbaud = {baud}\n'
