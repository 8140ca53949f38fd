"""Interface worker: owns one UDP socket, forwards transit frames, hands the rest up.

It never opens a payload: a DATA frame for another node that leaves by this same
interface is forwarded here, by looking its destination up in the forwarding table
the control worker pushes, with the hop limit decremented. Other DATA frames (for
this node, or in transit to another interface) go to the crypto worker that owns
their source SID's shard (one ``drx`` ring per crypto worker), so a flow keeps its
order and the control worker stays out of the data path. Hellos, routing and
discovery go to the control worker over the rx ring.

It sends what every producer puts on its tx rings: the control worker's (``tx``)
and one per crypto worker (``dtx``).

Per-hop recovery (:mod:`meshpipe.link.recovery`, ``[[interface]] hop_recovery``)
sits right at the socket: every unicast frame leaving passes ``HopRecovery.send``
(a DATA frame gets its per-neighbour sequence number and the latest ack), every frame
arriving passes ``HopRecovery.receive`` (unwrapped, duplicates and acks consumed)
before anything else looks at it, and after each loop turn ``HopRecovery.poll``
gives the retransmissions due and one ack per neighbour heard in that turn.
"""

from __future__ import annotations

import argparse
import errno
import json
import random
import selectors
import socket
import struct
import sys
import time
from collections import Counter

from meshpipe import fragments, log, wire
from meshpipe.classify import CONTROL, Transit, classify
from meshpipe.config import InterfaceConfig, load_config
from meshpipe.errors import RecordError
from meshpipe.link.recovery import HopRecovery
from meshpipe_workers import messages as msg
from meshpipe_workers.ifaddr import device_of
from meshpipe_workers.reload import follow_log_level
from meshpipe_workers.ring import Ring, RingSpec
from meshpipe_workers.stopflag import StopFlag

RECV_BATCH = 256
COUNTER_PERIOD = 1.0
# UDP segmentation offload (Linux >= 4.18) and its receive side (>= 5.0): a run of
# equal-sized frames to one peer leaves in one sendmsg() and, across a veth or a NIC
# that keeps the large packet, arrives in one recvmsg(), cut here. The kernel's
# limits: at most 64 segments and 64 kB per call.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux <netinet/in.h>


class InterfaceWorker:
    def __init__(
        self,
        cfg: InterfaceConfig,
        iface_index: int,
        worker_index: int,
        own_sid: bytes,
        rx: Ring,
        tx: Ring,
        reuse_port: bool,
        crypto_tx: list[Ring] | None = None,
        to_crypto: list[Ring] | None = None,
        offload: bool = True,
    ) -> None:
        self.cfg = cfg
        self.iface = iface_index
        self.worker = worker_index
        self.own_sid = own_sid
        self.rx = rx
        self.tx = tx
        self.txs = [tx, *(crypto_tx or [])]
        self.to_crypto = to_crypto or []
        self.counters: Counter[str] = Counter()
        self.forwarding: dict[bytes, tuple[int, msg.UdpAddr]] = {}
        self.hop = HopRecovery(cfg.hop_recovery, self.counters, random.Random())
        # Fragments for this node are joined here, below the session (no keys needed):
        # the crypto worker gets one frame per sealed packet instead of dozens.
        self.joiner = fragments.Reassembler()
        self.now = time.monotonic()  # once per batch: the recovery's clock
        self.log = log.get()
        self.sock = self._open_unicast(reuse_port)
        self.gso = offload and _try_option(self.sock, UDP_SEGMENT, 0)
        self.gro = offload and _try_option(self.sock, UDP_GRO, 1)
        self.mcast_sock: socket.socket | None = None
        self.group: msg.UdpAddr | None = None
        if cfg.discovery:
            self.group = (cfg.multicast_group, cfg.listen[1])
            self._setup_multicast_send()
            if worker_index == 0:  # one receiver per interface, or every hello arrives N times
                self.mcast_sock = self._open_multicast_recv()

    # -- sockets ------------------------------------------------------------------

    def _family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.cfg.listen[0] else socket.AF_INET

    def _open_unicast(self, reuse_port: bool) -> socket.socket:
        s = socket.socket(self._family(), socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            except OSError:
                pass
        s.bind(self.cfg.listen)
        s.setblocking(False)
        return s

    def _setup_multicast_send(self) -> None:
        # Hellos leave through this interface's address only, one hop (TTL 1), and
        # do not loop back to ourselves.
        assert self._family() == socket.AF_INET, "discovery is IPv4 multicast"
        self.sock.setsockopt(
            socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self.cfg.listen[0])
        )
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)

    def _open_multicast_recv(self) -> socket.socket:
        assert self.group is not None
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Pin the group socket to the device that owns our address: a node with two
        # links must hear each neighbour only on the link it is really on.
        dev = device_of(self.cfg.listen[0])
        if dev is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
        s.bind(self.group)
        mreq = struct.pack(
            "4s4s", socket.inet_aton(self.group[0]), socket.inet_aton(self.cfg.listen[0])
        )
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        # Without this, every socket bound to the group hears the group on *every*
        # interface, and a node with two links would see each neighbour on both.
        s.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        s.setblocking(False)
        return s

    # -- receive path ---------------------------------------------------------------

    def on_readable(self, sock: socket.socket) -> None:
        self.now = time.monotonic()
        up: list[bytes] = []
        n = len(self.to_crypto)
        data: list[list[bytes]] = [[] for _ in range(n)]
        gro = self.gro and sock is self.sock
        for _ in range(RECV_BATCH):
            try:
                if gro:
                    buf, anc, _flags, addr = sock.recvmsg(65535, _GRO_CMSG_SPACE)
                    frames = _cut(buf, anc)
                else:
                    buf, addr = sock.recvfrom(65535)
                    frames = [buf]
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # ICMP errors surface here on some kernels
                self.counters["rx.error"] += 1
                if exc.errno not in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self.log.warning("interface.rx_error", error=str(exc))
                continue
            self.counters["rx.frames"] += len(frames)
            self.counters["rx.bytes"] += len(buf)
            if len(frames) > 1:
                self.counters["rx.gro_reads"] += 1
            src = (addr[0], addr[1])
            for link_frame in frames:
                frame = self.hop.receive(src, link_frame, self.now)
                if frame is None:
                    continue  # an ack, a duplicate, or a damaged link frame (counted)
                verdict = classify(frame, self.own_sid, self.forwarding, self.iface, n)
                if isinstance(verdict, int):
                    if verdict != CONTROL and frame[_FRAG_AT : _FRAG_AT + 1] == _FRAG_BYTE:
                        joined = fragments.join_frame(self.joiner, frame, self.own_sid, self.now)
                        if joined is None:
                            continue
                        frame = joined
                    rec = msg.frame_in(self.iface, src, frame)
                    (up if verdict == CONTROL else data[verdict]).append(rec)
                elif isinstance(verdict, Transit):
                    self._sendto(self.hop.send(verdict.dest, verdict.frame, self.now), verdict.dest)
                    self.counters["transit.forwarded"] += 1
                else:
                    self.counters[verdict.reason] += 1
        if up:
            sent = self.rx.put_batch(up)
            if sent < len(up):
                self.counters["drop.queue_full"] += len(up) - sent
        for ring, recs in zip(self.to_crypto, data, strict=True):
            if recs:
                sent = ring.put_batch(recs)
                if sent < len(recs):
                    self.counters["drop.crypto_queue_full"] += len(recs) - sent

    # -- transmit path --------------------------------------------------------------

    def _sendto(self, frame: bytes, addr: msg.UdpAddr) -> None:
        try:
            self.sock.sendto(frame, addr)
            self.counters["tx.frames"] += 1
            self.counters["tx.bytes"] += len(frame)
        except (BlockingIOError, InterruptedError):
            self.counters["drop.tx_busy"] += 1
        except OSError:
            self.counters["tx.error"] += 1

    def on_tx_ring(self, ring: Ring) -> None:
        """Send a ring's records; runs of frames to one peer go out with UDP GSO."""
        self.now = time.monotonic()
        for batch in ring.drain():
            run: list[bytes] = []
            run_addr: msg.UdpAddr | None = None
            run_bytes = 0
            for rec in batch:
                if rec[:1] == _RUN_TAG:
                    self._send_run(run_addr, run)
                    run, run_addr, run_bytes = [], None, 0
                    self._send_run_record(rec)
                    continue
                if rec[:1] != _SEND_TAG or not self.gso:
                    self._send_run(run_addr, run)
                    run, run_addr, run_bytes = [], None, 0
                    self._handle_tx(rec)
                    continue
                try:
                    addr, frame = msg.parse_send(rec)
                except RecordError:
                    self.counters["drop.bad_record"] += 1
                    continue
                frame = self.hop.send(addr, frame, self.now)  # same header size: runs stay equal
                # One GSO send: one peer, equal sizes (only the last may be shorter).
                if run and (
                    addr != run_addr
                    or len(frame) > len(run[0])
                    or len(run[-1]) < len(run[0])
                    or len(run) >= GSO_MAX_SEGMENTS
                    or run_bytes + len(frame) > GSO_MAX_BYTES
                ):
                    self._send_run(run_addr, run)
                    run, run_bytes = [], 0
                run.append(frame)
                run_addr = addr
                run_bytes += len(frame)
            self._send_run(run_addr, run)

    def _send_run_record(self, rec: bytes) -> None:
        """REC_SEND_RUN: one peer's frames of one size, one GSO send (or one by one)."""
        try:
            addr, frames = msg.parse_send_run(rec)
        except RecordError:
            self.counters["drop.bad_record"] += 1
            return
        hop, now = self.hop, self.now
        self._send_run(addr, [hop.send(addr, f, now) for f in frames])

    def _send_run(self, addr: msg.UdpAddr | None, frames: list[bytes]) -> None:
        if addr is None or not frames:
            return
        if len(frames) == 1 or not self.gso:
            for f in frames:
                self._sendto(f, addr)
            return
        seg = struct.pack("=H", len(frames[0]))
        try:
            self.sock.sendmsg([b"".join(frames)], [(SOL_UDP, UDP_SEGMENT, seg)], 0, addr)
        except (BlockingIOError, InterruptedError):
            self.counters["drop.tx_busy"] += len(frames)
            return
        except OSError as exc:
            # EIO/EINVAL: this device or path cannot segment; send one by one from now on.
            self.gso = False
            self.log.warning("interface.gso_off", error=str(exc))
            for f in frames:
                self._sendto(f, addr)
            return
        self.counters["tx.frames"] += len(frames)
        self.counters["tx.bytes"] += sum(len(f) for f in frames)
        self.counters["tx.gso_sends"] += 1

    def _handle_tx(self, rec: bytes) -> None:
        tag = rec[0] if rec else -1
        try:
            if tag == msg.REC_SEND:
                addr, frame = msg.parse_send(rec)
                self._sendto(self.hop.send(addr, frame, self.now), addr)
            elif tag == msg.REC_MULTICAST:
                if self.group is not None:
                    self._sendto(rec[1:], self.group)
            elif tag == msg.REC_FORWARDING:
                full, entries = msg.parse_forwarding(rec)
                if full:
                    self.forwarding.clear()
                for dst, e in entries.items():
                    if e is not None and isinstance(e[1], tuple):
                        self.forwarding[dst] = (e[0], e[1])
                    else:  # removed, or a radio next hop (never this interface)
                        self.forwarding.pop(dst, None)
            else:
                self.counters["drop.bad_record"] += 1
        except RecordError as exc:  # malformed: counted and dropped
            self.counters["drop.bad_record"] += 1
            self.log.warning("interface.bad_record", tag=tag, error=str(exc))
        except Exception as exc:  # a bad record must not kill the data plane
            self.counters["drop.bad_record"] += 1
            self.log.error("interface.bad_record", tag=tag, error=repr(exc))

    def poll_hop(self) -> None:
        """Retransmissions due and the acks this turn owes (one frame per neighbour)."""
        self.now = time.monotonic()
        for addr, frame in self.hop.poll(self.now):
            self._sendto(frame, addr)  # type: ignore[arg-type]

    def report_counters(self) -> None:
        body = {
            "iface": self.iface,
            "worker": self.worker,
            "counters": {**self.counters, **self.joiner.counters},
            "rx_ring_depth": self.rx.depth(),
            "rx_ring_dropped": self.rx.dropped_full,
            "crypto_ring_depth": sum(r.depth() for r in self.to_crypto),
            "crypto_ring_dropped": sum(r.dropped_full for r in self.to_crypto),
            "hop_links": self.hop.info(),
        }
        self.rx.put(msg.packed(msg.REC_COUNTERS, body))

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "sock")
        if self.mcast_sock is not None:
            sel.register(self.mcast_sock, selectors.EVENT_READ, "mcast")
        for ring in self.txs:
            sel.register(ring.consumer_fd(), selectors.EVENT_READ, ring)
        self.rx.put(msg.worker_up(self.iface, self.worker))
        for ring in self.txs:  # records queued while this worker was down; no wake-up will come
            self.on_tx_ring(ring)
        self.log.info(
            "interface.start", iface=self.cfg.name, worker=self.worker, listen=_fmt(self.cfg.listen)
        )
        next_report = time.monotonic() + COUNTER_PERIOD
        stop = StopFlag()
        while not stop:
            wake = min(next_report, self.hop.next_deadline())
            timeout = max(0.0, wake - time.monotonic())
            for key, _ in sel.select(timeout):
                if isinstance(key.data, Ring):
                    self.on_tx_ring(key.data)
                else:
                    self.on_readable(key.fileobj)  # type: ignore[arg-type]
            self.poll_hop()
            if time.monotonic() >= next_report:
                self.report_counters()
                next_report = time.monotonic() + COUNTER_PERIOD


_SEND_TAG = bytes((msg.REC_SEND,))
_FRAG_AT = wire.DATA_HEADER_LEN
_FRAG_BYTE = bytes((fragments.TYPE_FRAGMENT,))
_RUN_TAG = bytes((msg.REC_SEND_RUN,))


def _try_option(sock: socket.socket, option: int, value: int) -> bool:
    """Set a SOL_UDP option; False where the kernel does not know it."""
    try:
        sock.setsockopt(SOL_UDP, option, value)
    except OSError:
        return False
    return True


def _cut(buf: bytes, ancdata: list[tuple[int, int, bytes]]) -> list[bytes]:
    """The datagrams in a GRO read: ``buf`` in pieces of the size the kernel reports."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
            size = int.from_bytes(data[:4], sys.byteorder)
            if 0 < size < len(buf):
                return [buf[i : i + size] for i in range(0, len(buf), size)]
    return [buf]


def _fmt(addr: msg.UdpAddr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshpipe-interface-worker")
    p.add_argument("--config", required=True)
    p.add_argument("--iface", type=int, required=True)
    p.add_argument("--worker", type=int, required=True)
    p.add_argument("--sid", required=True)
    p.add_argument("--rings", required=True, help="JSON {rx, tx, dtx: [...], drx: [...]}")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    icfg = cfg.interfaces[a.iface]
    sid = bytes.fromhex(a.sid)
    log.configure(
        node=sid.hex()[:8], role=f"interface:{icfg.name}:{a.worker}", level=cfg.node.log_level
    )
    follow_log_level(a.config)
    rings = json.loads(a.rings)
    rx = Ring.attach(RingSpec.from_json(rings["rx"]))
    tx = Ring.attach(RingSpec.from_json(rings["tx"]))
    dtx = [Ring.attach(RingSpec.from_json(r)) for r in rings.get("dtx", [])]
    drx = [Ring.attach(RingSpec.from_json(r)) for r in rings.get("drx", [])]
    try:
        worker = InterfaceWorker(
            icfg,
            a.iface,
            a.worker,
            sid,
            rx,
            tx,
            reuse_port=cfg.workers.per_interface > 1,
            crypto_tx=dtx,
            to_crypto=drx,
            offload=cfg.workers.udp_offload,
        )
    except OSError as exc:
        log.get().error(
            "interface.bind_failed", iface=icfg.name, listen=_fmt(icfg.listen), error=str(exc)
        )
        return 3
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
