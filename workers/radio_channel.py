"""A simulated packet-radio channel for tests: pseudo-terminals on one shared air.

Each station gets a pseudo-terminal (``os.openpty``); a node opens the slave path
as its radio ``device``. A relay thread reads KISS frames from every master and
puts them on the air one at a time, each taking ``len * bits_per_byte / rate_bps``
seconds (10 bits a byte, as on an async serial line). When a frame's air time is
over, every *other* station hears it, each losing it independently with
probability ``loss``. Stations waiting to send queue in order (an ideal CSMA: no
collisions), up to ``max_queue`` bytes, beyond which frames are dropped.

The channel counts what crossed the air (``stats()``), which is how the tests
measure a radio's idle control traffic.
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

from meshpipe.link import kiss

DEFAULT_RATE = 19_200


@dataclass
class Station:
    name: str
    master: int
    slave: int  # kept open so the master never sees a hang-up while a node restarts
    path: str
    decoder: kiss.KissDecoder = field(default_factory=lambda: kiss.KissDecoder(1 << 16))


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
    ) -> None:
        self.rate_bps = rate_bps
        self.loss = loss
        self.bits_per_byte = bits_per_byte
        self.max_queue = max_queue
        self.rng = random.Random(seed)
        self.stations: dict[str, Station] = {}
        self._counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._air: deque[tuple[Station, bytes]] = deque()
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

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for st in self.stations.values():
            sel.register(st.master, selectors.EVENT_READ, st)
        on_air: tuple[Station, bytes] | None = None
        done_at = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if on_air is not None and now >= done_at:
                self._deliver(*on_air)
                on_air = None
            if on_air is None and self._air:
                on_air = self._air.popleft()
                self._queued -= len(on_air[1])
                done_at = now + len(on_air[1]) * self.bits_per_byte / self.rate_bps
            timeout = 0.1 if on_air is None else max(0.0, done_at - now)
            for key, _ in sel.select(timeout):
                self._read(key.data)

    def _read(self, st: Station) -> None:
        try:
            data = os.read(st.master, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            time.sleep(0.01)  # EIO: nobody has the slave open right now
            return
        for frame in st.decoder.feed(data):
            wire = kiss.encode(frame)
            with self._lock:
                if self._queued + len(wire) > self.max_queue:
                    self._counters["drop.queue_full"] += 1
                    continue
                self._counters[f"tx.bytes.{st.name}"] += len(wire)
                self._counters[f"tx.frames.{st.name}"] += 1
            self._air.append((st, wire))
            self._queued += len(wire)

    def _deliver(self, sender: Station, wire: bytes) -> None:
        with self._lock:
            self._counters["air.bytes"] += len(wire)
            self._counters["air.frames"] += 1
        for st in self.stations.values():
            if st is sender:
                continue
            if self.loss and self.rng.random() < self.loss:
                with self._lock:
                    self._counters["lost"] += 1
                continue
            try:
                os.write(st.master, wire)
                outcome = "delivered"
            except OSError:
                outcome = "drop.rx_full"  # the node is not reading (or not running)
            with self._lock:
                self._counters[outcome] += 1


def radio_interface_toml(device: str, baud: int = DEFAULT_RATE, name: str = "radio0") -> str:
    """An ``[[interface]]`` table for a radio on ``device`` (for Lab's node_config)."""
    return f'[[interface]]\nname = "{name}"\nkind = "radio"\ndevice = "{device}"\nbaud = {baud}\n'
