"""The IP tunnel's shells: the TUN worker process and its bridge in the control worker.

TUN worker (``python -m meshpipe_workers.tun``, started by the supervisor when
``[tunnel] enabled``): creates the TUN device (``/dev/net/tun``, ``IFF_TUN |
IFF_NO_PI``), configures it with pyroute2 (the node's overlay IPv6 /128, the
``fd00::/8`` route, the ``[[tunnel.route]]`` prefixes, the extra addresses, the MTU,
link up), then reads packets in batches onto the *up* ring and writes the packets it
finds on the *down* ring. The device is not persistent: if the worker dies the
kernel removes it with its routes, and the restarted worker makes it again.

One queue: the reader is a single Python process, so a multi-queue device would
only add fds nobody reads in parallel.

:class:`TunnelBridge` lives in the control worker, which owns the sessions: it maps
each packet from the up ring to a SID (:class:`meshpipe.tunnel.Tunnel`), sends it on
a datagram-mode MSP stream to that node's tunnel port (``TUNNEL_PORT``, one stream
per peer), and puts packets received on such streams, once their source address
passed the cryptokey check, on the down ring.

Counters: the TUN worker's ``tun.read.packets``/``bytes``, ``tun.write.packets``/
``bytes``, ``tun.drop.up_queue_full``, ``tun.drop.write_error``; the bridge's
``tunnel.*`` (see meshpipe/tunnel.py), ``tunnel.drop.down_queue_full``,
``tunnel.drop.stream_error`` and the rings' depths, all in ``meshpipe status
--json`` (``tunnel``) and the ``stats`` log event.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import selectors
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from meshpipe import log
from meshpipe.config import TunnelSection, load_config
from meshpipe.errors import MeshpipeError
from meshpipe.identity import overlay_ipv6
from meshpipe.msp import (
    Mode,
    Msp,
    MspEvent,
    Stream,
    StreamAccepted,
    StreamClosed,
    StreamError,
    StreamReadable,
)
from meshpipe.tunnel import OVERLAY, TUNNEL_PORT, ToPeer, ToTun, Tunnel
from meshpipe_workers import messages as msg
from meshpipe_workers.ring import Ring, RingSpec
from meshpipe_workers.stopflag import StopFlag

# Ring records (first byte), next to the tags in messages.py.
REC_TUN_PACKET = 0x50  # 'P': a packet, TUN worker -> control (read) or back (to write)
REC_TUN_STATS = 0x54  # 'T': msgpack {"counters": {...}, "down_depth", "down_dropped"}

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
READ_BATCH = 256
REPORT_PERIOD = 1.0
MAX_PACKET = 65535


class TunError(MeshpipeError):
    """The TUN device could not be created or configured."""


# -- the TUN worker process ---------------------------------------------------------------


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (no packet-info header); its non-blocking fd."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise TunError(f"cannot create TUN device {name}: {exc.strerror}") from None
    return fd


def configure_tun(tcfg: TunnelSection, own_sid: bytes) -> None:
    """Address, routes and MTU of the device, and link up (netlink via pyroute2)."""
    from pyroute2 import IPRoute

    own = str(overlay_ipv6(own_sid))
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=tcfg.name)
        if not links:
            raise TunError(f"TUN device {tcfg.name} vanished")
        idx = links[0]
        ipr.link("set", index=idx, mtu=tcfg.mtu, state="up")
        # nodad: the address is ours by construction (derived from our key).
        ipr.addr("replace", index=idx, address=own, prefixlen=128, flags=0x02)
        for a in tcfg.addresses:
            ipr.addr("replace", index=idx, address=str(a.ip), prefixlen=a.network.prefixlen)
        ipr.route("replace", dst=str(OVERLAY), oif=idx)
        for r in tcfg.routes:
            if r.via != own_sid:  # a prefix via ourselves is our own LAN
                ipr.route("replace", dst=str(r.prefix), oif=idx)


class TunWorker:
    def __init__(self, fd: int, up: Ring, down: Ring) -> None:
        self.fd = fd
        self.up = up
        self.down = down
        self.counters: Counter[str] = Counter()
        self.log = log.get()

    def on_tun(self) -> None:
        batch: list[bytes] = []
        nbytes = 0
        for _ in range(READ_BATCH):
            try:
                pkt = os.read(self.fd, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            batch.append(bytes((REC_TUN_PACKET,)) + pkt)
            nbytes += len(pkt)
        if not batch:
            return
        self.counters["tun.read.packets"] += len(batch)
        self.counters["tun.read.bytes"] += nbytes
        sent = self.up.put_batch(batch)
        if sent < len(batch):
            self.counters["tun.drop.up_queue_full"] += len(batch) - sent

    def on_down(self) -> None:
        for batch in self.down.drain():
            for rec in batch:
                if not rec or rec[0] != REC_TUN_PACKET:
                    self.counters["tun.drop.bad_record"] += 1
                    continue
                try:
                    n = os.write(self.fd, memoryview(rec)[1:])
                except OSError as exc:
                    # EAGAIN: the device's queue is full; EINVAL: a packet it rejects.
                    self.counters["tun.drop.write_error"] += 1
                    if exc.errno not in (errno.EAGAIN, errno.EINVAL, errno.EIO):
                        self.log.warning("tun.write_error", error=str(exc))
                    continue
                self.counters["tun.write.packets"] += 1
                self.counters["tun.write.bytes"] += n

    def report(self) -> None:
        body = {
            "counters": dict(self.counters),
            "up_dropped": self.up.dropped_full,
            "down_depth": self.down.depth(),
        }
        self.up.put(msg.packed(REC_TUN_STATS, body))

    def run(self) -> None:
        stop = StopFlag()
        sel = selectors.DefaultSelector()
        sel.register(self.fd, selectors.EVENT_READ, self.on_tun)
        sel.register(self.down.consumer_fd(), selectors.EVENT_READ, self.on_down)
        self.on_down()  # packets queued while this worker was down; no wake-up will come
        next_report = time.monotonic()
        while not stop:
            for key, _ in sel.select(max(0.0, next_report - time.monotonic())):
                key.data()
            if time.monotonic() >= next_report:
                self.report()
                next_report = time.monotonic() + REPORT_PERIOD


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshpipe-tun-worker")
    p.add_argument("--config", required=True)
    p.add_argument("--sid", required=True)
    p.add_argument("--rings", required=True, help="JSON {up: spec, down: spec}")
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    sid = bytes.fromhex(a.sid)
    log.configure(node=a.sid[:8], role="tun", level=cfg.node.log_level)
    rings = json.loads(a.rings)
    up = Ring.attach(RingSpec.from_json(rings["up"]))
    down = Ring.attach(RingSpec.from_json(rings["down"]))
    try:
        fd = open_tun(cfg.tunnel.name)
        configure_tun(cfg.tunnel, sid)
    except (MeshpipeError, OSError) as exc:
        log.get().error("tun.start_failed", device=cfg.tunnel.name, error=str(exc))
        return 3
    log.get().info(
        "tun.start", device=cfg.tunnel.name, mtu=cfg.tunnel.mtu, ipv6=str(overlay_ipv6(sid))
    )
    TunWorker(fd, up, down).run()
    os.close(fd)
    return 0


# -- the control worker's side -------------------------------------------------------------


class TunnelBridge:
    """Packets between the TUN worker's rings and per-peer MSP datagram streams."""

    def __init__(
        self,
        tcfg: TunnelSection,
        msp: Msp,
        rings: dict[str, Any],
        sel: selectors.BaseSelector,
        known_sids: Callable[[], Iterable[bytes]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = tcfg
        self.msp = msp
        self.clock = clock
        self.log = log.get()
        self.tunnel = Tunnel(
            msp.sid,
            [(r.prefix, r.via) for r in tcfg.routes],
            tcfg.mtu,
            known_sids,
            clock(),
        )
        self.up = Ring.attach(RingSpec.from_json(rings["up"]))
        self.down = Ring.attach(RingSpec.from_json(rings["down"]))
        self.streams: dict[bytes, Stream] = {}  # peer SID -> the stream we send on
        self.counters: Counter[str] = Counter()
        self.worker: dict[str, Any] = {}  # the TUN worker's last report
        msp.listen(TUNNEL_PORT, modes=frozenset({Mode.DATAGRAM}))
        sel.register(self.up.consumer_fd(), selectors.EVENT_READ, self.on_up)

    # -- TUN -> mesh -----------------------------------------------------------------

    def on_up(self) -> None:
        for batch in self.up.drain():
            now = self.clock()
            back: list[bytes] = []
            for rec in batch:
                if rec[:1] == bytes((REC_TUN_PACKET,)):
                    self._outbound(rec[1:], now, back)
                elif rec[:1] == bytes((REC_TUN_STATS,)):
                    self.worker = msg.unpacked(rec)
                else:
                    self.counters["tunnel.drop.bad_record"] += 1
            if back:
                self._to_tun(back)

    def _outbound(self, packet: bytes, now: float, back: list[bytes]) -> None:
        out = self.tunnel.outbound(packet, now)
        if isinstance(out, ToTun):
            back.append(bytes((REC_TUN_PACKET,)) + out.packet)
        elif isinstance(out, ToPeer):
            try:
                self._stream(out.sid, now).send_datagram(out.packet, now)
            except StreamError as exc:  # too many streams, a closed one: drop this packet
                self.counters["tunnel.drop.stream_error"] += 1
                self.log.debug("tunnel.stream_error", sid=out.sid.hex()[:16], error=str(exc))

    def _stream(self, sid: bytes, now: float) -> Stream:
        st = self.streams.get(sid)
        if st is None or st.closed:
            st = self.msp.open(sid, TUNNEL_PORT, now, mode=Mode.DATAGRAM)
            self.streams[sid] = st
        return st

    # -- mesh -> TUN -----------------------------------------------------------------

    def on_events(self, events: list[MspEvent]) -> None:
        """The control worker's MSP events; the tunnel's own streams are handled here."""
        recs: list[bytes] = []
        for ev in events:
            if isinstance(ev, StreamReadable) and ev.stream.port == TUNNEL_PORT:
                st = ev.stream
                while (packet := st.recv_datagram()) is not None:
                    ok = self.tunnel.inbound(st.peer, packet)
                    if ok is not None:
                        recs.append(bytes((REC_TUN_PACKET,)) + ok)
            elif isinstance(ev, StreamAccepted) and ev.stream.port == TUNNEL_PORT:
                mine = self.streams.get(ev.stream.peer)
                if mine is None or mine.closed:
                    self.streams[ev.stream.peer] = ev.stream  # answer on the peer's stream
            elif isinstance(ev, StreamClosed) and self.streams.get(ev.stream.peer) is ev.stream:
                del self.streams[ev.stream.peer]
        if recs:
            self._to_tun(recs)

    def _to_tun(self, recs: list[bytes]) -> None:
        sent = self.down.put_batch(recs)
        if sent < len(recs):
            self.counters["tunnel.drop.down_queue_full"] += len(recs) - sent

    # -- status ----------------------------------------------------------------------

    def all_counters(self) -> Counter[str]:
        c = Counter(self.tunnel.counters)
        c.update(self.counters)
        c.update(self.worker.get("counters", {}))
        return c

    def status(self) -> dict[str, Any]:
        """Per-stage counters for ``status --json``: read, to mesh, from mesh, write."""
        c = self.all_counters()

        def pick(prefix: str) -> dict[str, int]:
            return {k[len(prefix) :]: v for k, v in sorted(c.items()) if k.startswith(prefix)}

        return {
            "device": self.cfg.name,
            "mtu": self.cfg.mtu,
            "port": TUNNEL_PORT,
            "peers": len(self.streams),
            "stages": {
                "tun_read": pick("tun.read."),
                "to_mesh": pick("tunnel.tx."),
                "from_mesh": pick("tunnel.rx."),
                "tun_write": pick("tun.write."),
            },
            "drops": {**pick("tun.drop."), **pick("tunnel.drop.")},
            "icmp": pick("tunnel.icmp."),
            "queues": {
                "up_depth_bytes": self.up.depth(),
                "up_dropped": int(self.worker.get("up_dropped", 0)),
                "down_depth_bytes": self.down.depth(),
                "down_dropped": self.down.dropped_full,
            },
        }


if __name__ == "__main__":
    sys.exit(main())
