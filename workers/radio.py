"""Radio interface worker: one serial packet radio spoken in KISS.

It owns the serial device (opened with termios: raw, 8N1, the configured baud) and
talks to the control worker over the same pair of rings as a UDP interface worker;
what it receives goes where the receive classifier (meshpipe/classify.py) says, as
on a UDP interface: DATA frames relayed back onto the radio at once, or straight to
the crypto worker of their source's shard (``drx`` rings), the rest to the control
worker.
Frames on the radio carry a 4-byte link header (destination and source radio
address, see :mod:`meshpipe.link.kiss`); with KISS framing that is 7 bytes of
overhead per frame, plus escapes.

A radio carries a few kilobytes a second, so the worker never hands it more than
it can carry: frames wait in a bounded send queue (``queue_bytes``) and leave
paced by a token bucket at ``rate_bps`` (10 bits per byte, as on an async serial
line). The queue has three classes, served strictly in order: link control
(hellos and routing), small DATA frames (acks, pings, handshakes) and bulk DATA.
When the queue is full a lower class is dropped to make room for a higher one;
otherwise the new frame is dropped. Every drop is counted.

Ring records of its own (the UDP records carry IP addresses): ``REC_RADIO_IN``
(u8 iface, u16 source address, frame) up and to the crypto workers,
``REC_RADIO_SEND`` (u16 destination, frame; 0xFFFF = broadcast) down.

Per-hop recovery (``hop_recovery``, :mod:`meshpipe.link.recovery`) wraps unicast
DATA frames and unwraps what arrives, as the UDP worker does, with bounds for a slow
link (:data:`RADIO_RECOVERY`): acks queue as small frames, a retransmission in the
class of the frame it repeats.

Unicast DATA frames are header-compressed per neighbour (:mod:`meshpipe.link.compress`,
after the recovery wrapping, so a LINK frame goes as it is); compressed and context
frames are rebuilt on receipt before anything else sees them (``compress.*`` counters).

Counters: ``rx.frames``, ``rx.bytes``, ``rx.not_for_us`` (unicast for another
node), ``rx.addr_conflict`` (a frame claiming our own address), ``rx.malformed``,
``tx.frames``, ``tx.bytes`` (on the line, after KISS), ``transit.forwarded``,
``drop.queue_full.{control,small,bulk}``, ``drop.too_big``, ``drop.hop_limit``,
``drop.bad_record``, ``drop.queue_full`` (rx ring), ``tx.error`` and the decoder's
``kiss.*`` counters.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import selectors
import struct
import sys
import termios
import time
import tty
from collections import Counter, deque

from meshpipe import log, wire
from meshpipe.classify import CONTROL, Transit, classify
from meshpipe.config import InterfaceConfig, load_config
from meshpipe.errors import FrameError, RecordError
from meshpipe.link import compress, kiss
from meshpipe.link.recovery import F_DATA, OVERHEAD, HopRecovery, RecoveryParams
from meshpipe_workers import messages as msg
from meshpipe_workers.reload import follow_log_level
from meshpipe_workers.ring import Ring, RingSpec
from meshpipe_workers.stopflag import StopFlag

REC_RADIO_IN = 0x72  # 'r': radio worker -> control worker
REC_RADIO_SEND = 0x73  # 's': control worker -> radio worker
_IN = struct.Struct("!BBH")
_SEND = struct.Struct("!BH")

COUNTER_PERIOD = 1.0
BITS_PER_BYTE = 10  # start bit, 8 data bits, stop bit
SMALL_FRAME = 128  # DATA frames up to this size (acks, pings) jump ahead of bulk
PRIO_CONTROL, PRIO_SMALL, PRIO_BULK = 0, 1, 2
PRIO_NAMES = ("control", "small", "bulk")
_DATA_BYTE = (wire.WIRE_VERSION << 4) | wire.KIND_DATA
# A radio's ack RTT is air time plus its send queue (up to seconds), and MSP's RTO on
# such a path is at least as long: fewer, later tries, a small buffer.
RADIO_RECOVERY = RecoveryParams(
    max_frames=32,
    max_bytes=16 * 1024,
    max_tries=4,
    max_age=1.5,
    initial_rto=0.5,
    min_rto=0.1,
    max_rto=2.0,
)


# -- ring records ------------------------------------------------------------------------


def radio_in(iface: int, src: int, frame: bytes) -> bytes:
    return _IN.pack(REC_RADIO_IN, iface, src) + frame


def parse_radio_in(rec: bytes) -> tuple[int, int, bytes]:
    if len(rec) < _IN.size:
        raise RecordError("radio record truncated")
    _, iface, src = _IN.unpack_from(rec)
    return iface, src, rec[_IN.size :]


def radio_send(dst: int, frame: bytes) -> bytes:
    return _SEND.pack(REC_RADIO_SEND, dst) + frame


def parse_radio_send(rec: bytes) -> tuple[int, bytes]:
    if len(rec) < _SEND.size:
        raise RecordError("radio record truncated")
    _, dst = _SEND.unpack_from(rec)
    return dst, rec[_SEND.size :]


# -- the serial port -----------------------------------------------------------------------


def open_serial(path: str, baud: int) -> int:
    """Open ``path`` raw (no echo, no line discipline), 8N1 at ``baud``, non-blocking."""
    speed = getattr(termios, f"B{baud}", None)
    if speed is None:
        raise OSError(errno.EINVAL, f"baud rate {baud} not supported by termios")
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        tty.setraw(fd)
        attrs = termios.tcgetattr(fd)
        # CLOCAL: no modem control lines on a radio; CREAD: enable the receiver.
        attrs[2] = (attrs[2] & ~(termios.CSIZE | termios.PARENB | termios.CSTOPB)) | (
            termios.CS8 | termios.CLOCAL | termios.CREAD
        )
        attrs[4] = attrs[5] = speed
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- pacing and queueing (pure; tested without a device) --------------------------------------


class TokenBucket:
    """Bytes the radio may send now: refills at ``rate`` bytes/s up to ``burst``."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self, n: int, now: float) -> bool:
        self._refill(now)
        # The epsilon absorbs float rounding: waiting exactly wait_for() must succeed.
        if self.tokens + 1e-6 < min(n, self.burst):
            return False
        self.tokens -= n
        return True

    def wait_for(self, n: int, now: float) -> float:
        """Seconds until ``n`` bytes may go (0 if now)."""
        self._refill(now)
        return max(0.0, (min(n, self.burst) - self.tokens) / self.rate)


def priority(frame: bytes) -> int:
    if frame and frame[0] == _DATA_BYTE:
        return PRIO_SMALL if len(frame) <= SMALL_FRAME else PRIO_BULK
    return PRIO_CONTROL  # hellos and routing (and anything we cannot classify)


class SendQueue:
    """Bounded (in bytes) strict-priority queue of wire-ready frames."""

    def __init__(self, limit: int, counters: Counter[str]) -> None:
        self.limit = limit
        self.counters = counters
        self.classes: tuple[deque[bytes], ...] = (deque(), deque(), deque())
        self.bytes = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self.classes)

    def push(self, data: bytes, prio: int) -> bool:
        need = self.bytes + len(data) - self.limit
        # Make room by dropping the newest frames of lower classes, lowest first.
        for lower in range(len(self.classes) - 1, prio, -1):
            q = self.classes[lower]
            while need > 0 and q:
                dropped = q.pop()
                self.bytes -= len(dropped)
                need -= len(dropped)
                self.counters[f"drop.queue_full.{PRIO_NAMES[lower]}"] += 1
        if need > 0:
            self.counters[f"drop.queue_full.{PRIO_NAMES[prio]}"] += 1
            return False
        self.classes[prio].append(data)
        self.bytes += len(data)
        return True

    def peek(self) -> bytes | None:
        for q in self.classes:
            if q:
                return q[0]
        return None

    def pop(self) -> bytes:
        for q in self.classes:
            if q:
                data = q.popleft()
                self.bytes -= len(data)
                return data
        raise IndexError("empty send queue")


# -- the worker ------------------------------------------------------------------------------


class RadioWorker:
    def __init__(
        self,
        cfg: InterfaceConfig,
        iface_index: int,
        own_sid: bytes,
        rx: Ring,
        tx: Ring,
        crypto_tx: list[Ring] | None = None,
        to_crypto: list[Ring] | None = None,
    ) -> None:
        self.cfg = cfg
        self.iface = iface_index
        self.own_sid = own_sid
        self.addr = kiss.radio_addr(own_sid)
        self.rx = rx
        self.tx = tx
        self.txs = [tx, *(crypto_tx or [])]  # the control worker's, then each crypto worker's
        self.to_crypto = to_crypto or []  # DATA frames, to the shard of their source
        self.log = log.get()
        self.counters: Counter[str] = Counter()
        self.forwarding: dict[bytes, tuple[int, int]] = {}
        self.hop = HopRecovery(cfg.hop_recovery, self.counters, random.Random(), RADIO_RECOVERY)
        self.decoder = kiss.KissDecoder(cfg.mtu)
        # Header compression per neighbour (meshpipe.link.compress): the core's data MTU
        # on this radio counts its gain (workers.coreparams), so it is always on.
        self.comp = compress.LinkCompressor(
            cfg.mtu - kiss.RADIO_HEADER_LEN, random.Random(), self.counters
        )
        self.queue = SendQueue(cfg.queue_bytes, self.counters)
        # One worst-case frame of burst: never more than one frame ahead of the air.
        self.bucket = TokenBucket(
            cfg.rate_bps / BITS_PER_BYTE, 2 * cfg.mtu + kiss.KISS_OVERHEAD, time.monotonic()
        )
        self.fd = open_serial(cfg.device, cfg.baud)
        self.out = b""  # the part of the current frame the tty has not taken yet
        self.sel = selectors.DefaultSelector()

    # -- receive --------------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # EIO: the other end of a pty (or a USB radio) went away for a moment.
            self.counters["rx.error"] += 1
            if exc.errno != errno.EIO:
                self.log.warning("radio.rx_error", error=str(exc))
            time.sleep(0.05)
            return
        up: list[bytes] = []
        data_recs: list[list[bytes]] = [[] for _ in self.to_crypto]
        for raw in self.decoder.feed(data):
            self._on_frame(raw, up, data_recs)
        if up:
            sent = self.rx.put_batch(up)
            if sent < len(up):
                self.counters["drop.queue_full"] += len(up) - sent
        for ring, recs in zip(self.to_crypto, data_recs, strict=True):
            if recs:
                sent = ring.put_batch(recs)
                if sent < len(recs):
                    self.counters["drop.crypto_queue_full"] += len(recs) - sent

    def _on_frame(self, raw: bytes, up: list[bytes], data_recs: list[list[bytes]]) -> None:
        try:
            dst, src, frame = kiss.decode_radio(raw)
        except FrameError:
            self.counters["rx.malformed"] += 1
            return
        if src == self.addr:
            self.counters["rx.addr_conflict"] += 1
            return
        if dst != self.addr and dst != kiss.RADIO_BROADCAST:
            self.counters["rx.not_for_us"] += 1  # overheard unicast: normal on a radio
            return
        self.counters["rx.frames"] += 1
        self.counters["rx.bytes"] += len(raw)
        now = time.monotonic()
        if compress.is_link_frame(frame):
            rebuilt, replies = self.comp.decode(src, frame, now)
            for reply in replies:
                self._queue(src, reply, PRIO_CONTROL)
            if rebuilt is None:
                return
            frame = rebuilt
        inner = self.hop.receive(src, frame, now)
        if inner is None:
            return
        verdict = classify(inner, self.own_sid, self.forwarding, self.iface, len(data_recs))
        if isinstance(verdict, int):
            rec = radio_in(self.iface, src, inner)
            (up if verdict == CONTROL else data_recs[verdict]).append(rec)
        elif isinstance(verdict, Transit):  # relayed back onto this radio
            self.enqueue(verdict.dest, verdict.frame)
            self.counters["transit.forwarded"] += 1
        else:
            self.counters[verdict.reason] += 1

    # -- transmit ---------------------------------------------------------------------

    def enqueue(self, dst: int, frame: bytes) -> None:
        prio = priority(frame)  # of the mesh frame, before the recovery header
        if dst == kiss.RADIO_BROADCAST:
            self._queue(dst, frame, prio)
            return
        now = time.monotonic()
        *setup, frame = self.comp.encode(dst, self.hop.send(dst, frame, now), now)
        for link_frame in setup:
            self._queue(dst, link_frame, PRIO_CONTROL)
        self._queue(dst, frame, prio)

    def _queue(self, dst: int, frame: bytes, prio: int) -> None:
        if len(frame) + kiss.RADIO_HEADER_LEN > self.cfg.mtu:
            self.counters["drop.too_big"] += 1
            return
        data = kiss.encode(kiss.encode_radio(dst, self.addr, frame))
        self.queue.push(data, prio)

    def poll_hop(self) -> float:
        """Queue the retransmissions due and the acks owed; seconds until the next."""
        now = time.monotonic()
        for dst, frame in self.hop.poll(now):
            prio = priority(frame[OVERHEAD:]) if frame[1] & F_DATA else PRIO_SMALL
            self._queue(dst, frame, prio)  # type: ignore[arg-type]
        return self.hop.next_deadline() - now

    def pump(self) -> float:
        """Write what the bucket allows; return seconds until it may write again."""
        now = time.monotonic()
        while True:
            if self.out:
                try:
                    n = os.write(self.fd, self.out)
                except (BlockingIOError, InterruptedError):
                    return 0.05
                except OSError as exc:
                    self.counters["tx.error"] += 1
                    if exc.errno != errno.EIO:
                        self.log.warning("radio.tx_error", error=str(exc))
                    self.out = b""
                    return 0.05
                self.counters["tx.bytes"] += n
                self.out = self.out[n:]
                if self.out:
                    return 0.01  # the tty buffer is full: try again shortly
            head = self.queue.peek()
            if head is None:
                return COUNTER_PERIOD
            if not self.bucket.take(len(head), now):
                return self.bucket.wait_for(len(head), now)
            self.out = self.queue.pop()
            self.counters["tx.frames"] += 1

    def on_tx_ring(self, ring: Ring) -> None:
        for batch in ring.drain():
            for rec in batch:
                self._handle_tx(rec)

    def _handle_tx(self, rec: bytes) -> None:
        tag = rec[0] if rec else -1
        try:
            if tag == REC_RADIO_SEND:
                dst, frame = parse_radio_send(rec)
                self.enqueue(dst, frame)
            elif tag == msg.REC_MULTICAST:
                self.enqueue(kiss.RADIO_BROADCAST, rec[1:])
            elif tag == msg.REC_FORWARDING:
                full, entries = msg.parse_forwarding(rec)
                if full:
                    self.forwarding.clear()
                for sid, e in entries.items():
                    if e is not None and e[0] == self.iface and isinstance(e[1], int):
                        self.forwarding[sid] = (e[0], e[1])
                    else:
                        self.forwarding.pop(sid, None)
            else:
                self.counters["drop.bad_record"] += 1
        except RecordError as exc:  # malformed: counted and dropped
            self.counters["drop.bad_record"] += 1
            self.log.warning("radio.bad_record", tag=tag, error=str(exc))
        except Exception as exc:  # a bad record must not kill the data plane
            self.counters["drop.bad_record"] += 1
            self.log.error("radio.bad_record", tag=tag, error=repr(exc))

    def report_counters(self) -> None:
        counters = dict(self.counters)
        counters.update(self.decoder.counters)
        body = {
            "iface": self.iface,
            "worker": 0,
            "counters": counters,
            "rx_ring_depth": self.rx.depth(),
            "rx_ring_dropped": self.rx.dropped_full,
            "tx_queue_bytes": self.queue.bytes,
            "tx_queue_frames": len(self.queue),
        }
        self.rx.put(msg.packed(msg.REC_COUNTERS, body))

    def run(self) -> None:
        self.sel.register(self.fd, selectors.EVENT_READ, "tty")
        for ring in self.txs:
            self.sel.register(ring.consumer_fd(), selectors.EVENT_READ, ring)
        self.rx.put(msg.worker_up(self.iface, 0))
        for ring in self.txs:  # records queued while this worker was down; no wake-up will come
            self.on_tx_ring(ring)
        self.log.info(
            "radio.start",
            iface=self.cfg.name,
            device=self.cfg.device,
            baud=self.cfg.baud,
            rate_bps=self.cfg.rate_bps,
            link_addr=f"{self.addr:04x}",
        )
        stop = StopFlag()
        next_report = time.monotonic() + COUNTER_PERIOD
        while not stop:
            hop_wait = self.poll_hop()
            wait = self.pump()
            timeout = max(0.0, min(wait, hop_wait, next_report - time.monotonic()))
            for key, _ in self.sel.select(timeout):
                if isinstance(key.data, Ring):
                    self.on_tx_ring(key.data)
                else:
                    self.on_readable()
            if time.monotonic() >= next_report:
                self.report_counters()
                next_report = time.monotonic() + COUNTER_PERIOD
        os.close(self.fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshpipe-radio-worker")
    p.add_argument("--config", required=True)
    p.add_argument("--iface", type=int, required=True)
    p.add_argument("--worker", type=int, default=0, help="always 0: one worker per radio")
    p.add_argument("--sid", required=True)
    p.add_argument("--rings", required=True, help="JSON {rx, tx, dtx: [...], drx: [...]}")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    icfg = cfg.interfaces[a.iface]
    sid = bytes.fromhex(a.sid)
    log.configure(node=sid.hex()[:8], role=f"radio:{icfg.name}", level=cfg.node.log_level)
    follow_log_level(a.config)
    rings = json.loads(a.rings)
    rx = Ring.attach(RingSpec.from_json(rings["rx"]))
    tx = Ring.attach(RingSpec.from_json(rings["tx"]))
    dtx = [Ring.attach(RingSpec.from_json(r)) for r in rings.get("dtx", [])]
    drx = [Ring.attach(RingSpec.from_json(r)) for r in rings.get("drx", [])]
    try:
        worker = RadioWorker(icfg, a.iface, sid, rx, tx, dtx, drx)
    except OSError as exc:
        log.get().error("radio.open_failed", iface=icfg.name, device=icfg.device, error=str(exc))
        return 3
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
