"""Crypto worker: one shard of the node's sessions (meshpipe/dataplane.py).

``python -m meshpipe_workers.crypto --index K --count N`` is started by the
supervisor, N of them (``[workers] crypto``, "auto" = one per core). Worker K owns
the sessions of the peers with ``shard_of(sid, N) == K``: handshakes, keys, nonce
counters, replay windows, and the tunnel's datagram streams to those peers.

Rings (all single-producer single-consumer, made by the supervisor):

- from the control worker: ``REC_SEAL`` (encrypt and send), ``REC_OPEN`` (a packet
  that reached the control worker), ``REC_FORWARDING`` (next hop and
  path MTU per destination); to it: ``REC_OPENED`` (plaintexts for its protocols),
  ``REC_CRYPTO_UP`` and ``REC_CRYPTO_REPORT`` (every second and after a session event);
- from every UDP interface worker: ``REC_FRAME_IN``, and from every radio worker
  ``REC_RADIO_IN``, with DATA frames of peers in this shard, for this node or in
  transit to another interface; to every interface (and radio) worker: ``REC_SEND``
  / ``REC_RADIO_SEND``;
- with ``[tunnel]``: its own queue of the TUN device (workers/tun.py), read and
  written here; a packet read for a peer of another shard goes to that worker as
  ``REC_TUN_TO_PEER`` on a ring between the two (one per ordered pair).

Each input ring is drained in batches; everything a batch causes leaves as one
batch per output ring. A full ring drops (counted), never blocks. Killed, the worker
is restarted by the supervisor with empty state: its peers' sessions are
handshaken again and their tunnel streams reset and reopened.

Counters (in its report, so in ``meshpipe status --json`` under ``workers`` and
merged into ``counters``): the shard's (see meshpipe/dataplane.py) and
``crypto.rx.records``, ``crypto.drop.bad_record``, ``drop.tx_queue_full`` (an
interface worker's ring), ``crypto.drop.queue_full`` (the control worker's or another
crypto worker's).
"""

from __future__ import annotations

import argparse
import json
import math
import selectors
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from meshpipe import log
from meshpipe.actions import Action, Event, Opened, SendFrame, TunWrite
from meshpipe.config import Config, load_config
from meshpipe.dataplane import CryptoShard, shard_of
from meshpipe.errors import RecordError
from meshpipe.identity import Identity
from meshpipe.offload import join_message
from meshpipe.tunnel import ToPeer, ToTun
from meshpipe_workers import messages as msg
from meshpipe_workers import radio
from meshpipe_workers.coreparams import interface_params
from meshpipe_workers.reload import follow_log_level
from meshpipe_workers.ring import Ring, RingSpec
from meshpipe_workers.stopflag import StopFlag
from meshpipe_workers.stream_handoff import ShardStreams
from meshpipe_workers.tun import TunError, TunQueue, open_queue
from meshpipe_workers.txrings import FrameSender, flush_batches

REPORT_PERIOD = 1.0
REPORT_SOON = 0.05  # after a session event: the CLI's `sessions` should see it at once
TABLE_WAIT = 2.0  # at start, wait this long at most for the forwarding table
TUN_RETRY = 5.0  # a TUN queue that could not be attached is tried again this often


def _attach(spec: dict[str, Any]) -> Ring:
    return Ring.attach(RingSpec.from_json(spec))


class CryptoWorker:
    def __init__(
        self, cfg: Config, identity: Identity, index: int, count: int, rings: dict[str, Any]
    ) -> None:
        self.index = index
        self.count = count
        self.log = log.get()
        self.counters: Counter[str] = Counter()
        now = time.monotonic()
        self.shard = CryptoShard(
            identity,
            [p.routed_mtu for p in interface_params(cfg)],
            now,
            # Handshake timestamps from the wall clock: a restarted worker's are newer.
            epoch_ns=time.time_ns(),
            tunnel_routes=[(r.prefix, r.via) for r in cfg.tunnel.routes]
            if cfg.tunnel.enabled
            else None,
            tunnel_mtu=cfg.tunnel.mtu,
        )
        self.from_control = _attach(rings["from_control"])
        self.to_control = _attach(rings["to_control"])
        self.from_ifaces = [_attach(s) for s in rings["from_ifaces"]]
        tx: dict[int, list[Ring]] = {}
        for t in rings["to_ifaces"]:
            tx.setdefault(int(t["iface"]), []).append(_attach(t["ring"]))
        self.sender = FrameSender(cfg, tx, self.counters)
        # Packets read from our TUN queue for peers of other shards, and theirs for ours.
        self.to_peers = {int(k): _attach(v) for k, v in rings.get("to_peers", {}).items()}
        self.from_peers = [_attach(r) for r in rings.get("from_peers", [])]
        self.tcfg = cfg.tunnel
        self.control_socket = cfg.node.control_socket
        self.streams: ShardStreams | None = None  # service streams moved here, from run()
        self.tun: TunQueue | None = None
        self.tun_retry_at = now if cfg.tunnel.enabled else math.inf
        self.up: list[bytes] = []  # REC_OPENED for the control worker
        self.handoff: dict[int, list[bytes]] = {}  # REC_TUN_TO_PEER per other worker
        self.report_at = now + REPORT_PERIOD
        self.have_table = False

    # -- inputs --------------------------------------------------------------------

    def _drain(self, ring: Ring, handle: Callable[[bytes, float], None]) -> None:
        for batch in ring.drain():
            now = time.monotonic()
            self.counters["crypto.rx.records"] += len(batch)
            for rec in batch:
                try:
                    handle(rec, now)
                except RecordError as exc:  # malformed: counted and dropped
                    self.counters["crypto.drop.bad_record"] += 1
                    self.log.warning("crypto.bad_record", tag=rec[:1].hex(), error=str(exc))
                except Exception as exc:  # a bad record costs itself, never the worker
                    self.counters["crypto.drop.bad_record"] += 1
                    self.log.error("crypto.bad_record", tag=rec[:1].hex(), error=repr(exc))
            if self.shard.next_deadline() <= now:  # e.g. tunnel datagrams queued
                self._execute(self.shard.on_timer(now))
            self._flush()

    def on_control(self, rec: bytes, now: float) -> None:
        tag = rec[0] if rec else -1
        if tag == msg.REC_SEAL:
            dst, pt = msg.parse_sid_record(rec)
            self._execute(self.shard.seal(dst, pt, now))
        elif tag == msg.REC_OPEN:
            src, hops, packet = msg.parse_sid_hops_record(rec)
            self._execute(self.shard.open(src, packet, hops, now))
        elif tag == msg.REC_FORWARDING:
            full, entries = msg.parse_forwarding(rec)
            self.shard.set_forwarding(entries, full)
            self.have_table = self.have_table or full
        else:
            self.counters["crypto.drop.bad_record"] += 1

    def on_iface(self, rec: bytes, now: float) -> None:
        link: msg.UdpAddr | int
        if rec[0] == msg.REC_FRAME_IN:
            iface, link, frame = msg.parse_frame_in(rec)
        elif rec[0] == radio.REC_RADIO_IN:
            iface, link, frame = radio.parse_radio_in(rec)
        else:
            self.counters["crypto.drop.bad_record"] += 1
            return
        self._execute(self.shard.on_frame(frame, now, (iface, link)))

    def on_peer(self, rec: bytes, now: float) -> None:
        """A packet another worker read from its TUN queue for one of our peers."""
        if rec[0] != msg.REC_TUN_TO_PEER:
            self.counters["crypto.drop.bad_record"] += 1
            return
        dst, message = msg.parse_sid_record(rec)
        self.shard.tun_packet(dst, message, now)  # sent by the on_timer after the batch

    def on_tun(self) -> None:
        """Read our TUN queue: our peers' packets are sent, others' handed over."""
        assert self.tun is not None
        now = time.monotonic()
        for off, pkt in self.tun.read_batch():
            res = self.shard.outbound(pkt, now, gso=off is not None and off.gso)
            if isinstance(res, ToPeer):
                message = join_message(off, res.packet)
                k = shard_of(res.sid, self.count)
                if k == self.index:
                    self.shard.tun_packet(res.sid, message, now)
                else:
                    rec = msg.sid_record(msg.REC_TUN_TO_PEER, res.sid, message)
                    self.handoff.setdefault(k, []).append(rec)
            elif isinstance(res, ToTun):
                self.tun.write_packet(res.packet)
        if self.shard.next_deadline() <= now:
            self._execute(self.shard.on_timer(now))
        self._flush()

    # -- outputs -------------------------------------------------------------------

    def _execute(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, SendFrame):
                self.sender.queue(a)
            elif isinstance(a, TunWrite):
                if self.tun is not None:
                    self.tun.write_message(a.packet)
            elif isinstance(a, Opened):
                self.up.append(msg.sid_hops_record(msg.REC_OPENED, a.src, a.hops, a.plaintext))
            elif isinstance(a, Event):
                self.log.info(a.name, **a.fields)
                if a.name.startswith("session."):
                    self.report_at = min(self.report_at, time.monotonic() + REPORT_SOON)

    def _run(self, actions: list[Action]) -> None:
        self._execute(actions)
        self._flush()

    def _flush(self) -> None:
        self.sender.flush()
        pending: dict[Ring, list[bytes]] = {}
        if self.up:
            pending[self.to_control] = self.up
        for k, recs in self.handoff.items():
            pending[self.to_peers[k]] = recs
        flush_batches(pending, self.counters, "crypto.drop.queue_full")
        self.up, self.handoff = [], {}

    def report(self, now: float) -> None:
        counters = self.shard.all_counters()
        counters.update(self.counters)
        inputs = [self.from_control, *self.from_ifaces, *self.from_peers]
        body = {
            "index": self.index,
            "counters": dict(counters),
            "sessions": self.shard.sessions(now),
            "tunnel_peers": len(self.shard.tunnel_streams),
            "handshakes_in_progress": self.shard.session.handshakes_in_progress(),
            "in_queue_depth": sum(r.depth() for r in inputs),
            "in_queue_dropped": sum(r.dropped_full for r in inputs),
            "streams": [] if self.streams is None else self.streams.report(now),
        }
        if not self.to_control.put(msg.packed(msg.REC_CRYPTO_REPORT, body)):
            self.counters["crypto.drop.queue_full"] += 1

    # -- loop ----------------------------------------------------------------------

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        handlers: list[tuple[Ring, Callable[[bytes, float], None]]] = [
            (self.from_control, self.on_control),
            *((r, self.on_iface) for r in self.from_ifaces),
        ]
        handlers.extend((r, self.on_peer) for r in self.from_peers)
        for ring, handle in handlers:
            sel.register(ring.consumer_fd(), selectors.EVENT_READ, (ring, handle))
        self.streams = streams = ShardStreams(
            sel, self.control_socket, self.index, self.shard, time.monotonic, self._run
        )
        self.to_control.put(bytes((msg.REC_CRYPTO_UP, self.index)))
        self.log.info("crypto.start", index=self.index, count=self.count)
        # A restarted worker finds its peers' packets queued; without the table its
        # first answers (the handshakes that recover the sessions) would have no route.
        waiting = selectors.DefaultSelector()
        waiting.register(self.from_control.consumer_fd(), selectors.EVENT_READ)
        deadline = time.monotonic() + TABLE_WAIT
        while not self.have_table and time.monotonic() < deadline:
            self._drain(self.from_control, self.on_control)
            if not self.have_table:
                waiting.select(0.05)
        waiting.close()
        for ring, handle in handlers:  # records queued while this worker was down
            self._drain(ring, handle)
        stop = StopFlag()
        while not stop:
            now = time.monotonic()
            if now >= self.tun_retry_at:  # only now: packets read need the table
                self._attach_tun(sel, now)
            wake = min(
                self.shard.next_deadline(),
                self.report_at,
                self.tun_retry_at,
                streams.next_deadline(),
            )
            for key, _ in sel.select(max(0.0, min(wake - now, 1.0))):
                if key.data is None:
                    self.on_tun()
                elif callable(key.data):  # a handed-over stream's socket, or its channel
                    key.data()
                else:
                    ring, handle = key.data
                    self._drain(ring, handle)
            now = time.monotonic()
            streams.poll(now)
            if streams.changed:  # `meshpipe streams` should see it at once
                streams.changed = False
                self.report_at = min(self.report_at, now + REPORT_SOON)
            if now >= self.shard.next_deadline():
                self._execute(self.shard.on_timer(now))
                self._flush()
            if now >= self.report_at:
                self.report(now)
                self.report_at = now + REPORT_PERIOD
        self.log.info("crypto.stop", index=self.index)

    def _attach_tun(self, sel: selectors.BaseSelector, now: float) -> None:
        """Attach our TUN queue. Without one (no CAP_NET_ADMIN, say) the node still
        works, tunnel aside: log it and try again later instead of exiting."""
        try:
            fd = open_queue(self.tcfg.name, self.tcfg.offload)
        except TunError as exc:
            if self.counters["tun.attach_failed"] == 0:
                self.log.error("crypto.tun_unavailable", device=self.tcfg.name, error=str(exc))
            self.counters["tun.attach_failed"] += 1
            self.tun_retry_at = now + TUN_RETRY
            return
        self.tun = TunQueue(fd, self.tcfg.offload, self.counters)
        sel.register(fd, selectors.EVENT_READ, None)
        self.tun_retry_at = math.inf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshpipe-crypto-worker")
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rings", required=True)
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    identity = Identity.load(cfg.node.key)
    log.configure(node=identity.sid.short, role=f"crypto:{a.index}", level=cfg.node.log_level)
    follow_log_level(a.config)
    CryptoWorker(cfg, identity, a.index, a.count, json.loads(a.rings)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
