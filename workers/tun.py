"""The IP tunnel's shell: the TUN worker process.

TUN worker (``python -m meshpipe_workers.tun``, started by the supervisor when
``[tunnel] enabled``): creates the TUN device (``/dev/net/tun``, ``IFF_TUN |
IFF_NO_PI``), configures it with pyroute2 (the node's overlay IPv6 /128, the
``fd00::/8`` route, the ``[[tunnel.route]]`` prefixes, the extra addresses, the MTU,
link up), then reads packets in batches. Each packet is mapped to the SID that owns
its destination (cryptokey routing, :class:`meshpipe.tunnel.Tunnel`, with the SIDs
the control worker pushes) and handed to that SID's crypto worker
(``REC_TUN_TO_PEER``), which sends it on the tunnel's datagram stream; ICMP errors
made here go straight back into the device. Packets the crypto workers received
and source-checked come back as ``REC_TUN_PACKET`` and are written to the device.
The device is not persistent: if the worker dies the kernel removes it with its
routes, and the restarted worker makes it again.

One queue: the reader is a single Python process, so a multi-queue device would
only add fds nobody reads in parallel; the parallel stage is the crypto workers.

Counters (``REC_TUN_STATS`` every second to the control worker): ``tun.read.*``,
``tun.write.*``, ``tun.drop.up_queue_full``, ``tun.drop.write_error``,
``tun.drop.bad_record`` and the outbound ``tunnel.*`` (see meshpipe/tunnel.py);
the crypto workers report the inbound ones. All are in ``meshpipe status --json``
(``tunnel``, built by :func:`tunnel_status`) and the ``stats`` log event.
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
from typing import Any

from meshpipe import log
from meshpipe.config import TunnelSection, load_config
from meshpipe.dataplane import shard_of
from meshpipe.errors import MeshpipeError
from meshpipe.identity import overlay_ipv6
from meshpipe.offload import (
    VNET_HDR_LEN,
    ZERO_HDR,
    Offload,
    OffloadError,
    join_message,
    segment,
    split_message,
)
from meshpipe.tunnel import OVERLAY, TUNNEL_PORT, ToPeer, ToTun, Tunnel
from meshpipe_workers import messages as msg
from meshpipe_workers.ring import Ring, RingSpec
from meshpipe_workers.stopflag import StopFlag

# Ring records (first byte), next to the tags in messages.py.
REC_TUN_PACKET = 0x50  # 'P': a packet, TUN worker -> control (read) or back (to write)
REC_TUN_STATS = 0x54  # 'T': msgpack {"counters", "up_depth", "up_dropped", "down_depth"}
REC_TUN_UP = 0x55  # 'U': TUN worker -> control: (re)started, send the full table

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
READ_BATCH = 256
REPORT_PERIOD = 1.0
MAX_PACKET = 65535


class TunError(MeshpipeError):
    """The TUN device could not be created or configured."""


# -- the TUN worker process ---------------------------------------------------------------


def open_tun(name: str, offload: bool = False) -> tuple[int, bool]:
    """Create TUN device ``name`` (no packet-info header; with ``offload``, a
    virtio_net_hdr before each packet and TCP segmentation offloads); its
    non-blocking fd and whether the offloads are on."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        raise TunError(f"cannot create TUN device {name}: {exc.strerror}") from None
    if offload:
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
        except OSError as exc:  # an old kernel: plain packets, still with the header
            log.get().warning("tun.offload_unavailable", device=name, error=exc.strerror)
    return fd, offload


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
    def __init__(
        self,
        fd: int,
        tcfg: TunnelSection,
        sid: bytes,
        rings: dict[str, Any],
        vnet: bool = False,
    ) -> None:
        self.fd = fd
        self.vnet = vnet  # every read and write starts with a virtio_net_hdr
        self.stats = Ring.attach(RingSpec.from_json(rings["stats"]))
        self.ctl = Ring.attach(RingSpec.from_json(rings["ctl"]))
        self.to_crypto = [Ring.attach(RingSpec.from_json(r)) for r in rings["to_crypto"]]
        self.from_crypto = [Ring.attach(RingSpec.from_json(r)) for r in rings["from_crypto"]]
        self.known: set[bytes] = set()  # SIDs with a route, from the control worker
        self.tunnel = Tunnel(
            sid,
            [(r.prefix, r.via) for r in tcfg.routes],
            tcfg.mtu,
            lambda: self.known,
            time.monotonic(),
        )
        self.counters: Counter[str] = Counter()
        self.log = log.get()

    def on_tun(self) -> None:
        """Read a batch, map each packet to its SID, hand it to that SID's crypto worker."""
        n = len(self.to_crypto)
        out: list[list[bytes]] = [[] for _ in range(n)]
        back: list[bytes] = []  # ICMP errors made here
        nbytes = count = 0
        now = time.monotonic()
        for _ in range(READ_BATCH):
            try:
                pkt = os.read(self.fd, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            count += 1
            nbytes += len(pkt)
            off = None
            if self.vnet:
                try:
                    off = Offload.parse(pkt)
                except OffloadError:
                    self.counters["tun.drop.malformed"] += 1
                    continue
                pkt = pkt[VNET_HDR_LEN:]
                if off.gso:
                    self.counters["tun.read.large_segments"] += 1
            res = self.tunnel.outbound(pkt, now, gso=off is not None and off.gso)
            if isinstance(res, ToPeer):
                message = join_message(off, res.packet)
                out[shard_of(res.sid, n)].append(
                    msg.sid_record(msg.REC_TUN_TO_PEER, res.sid, message)
                )
            elif isinstance(res, ToTun):
                back.append(res.packet)
        if not count:
            return
        self.counters["tun.read.packets"] += count
        self.counters["tun.read.bytes"] += nbytes
        for ring, recs in zip(self.to_crypto, out, strict=True):
            if recs:
                sent = ring.put_batch(recs)
                if sent < len(recs):
                    self.counters["tun.drop.up_queue_full"] += len(recs) - sent
        for pkt in back:
            self._write(ZERO_HDR + pkt if self.vnet else pkt)

    def on_down(self, ring: Ring) -> None:
        for batch in ring.drain():
            for rec in batch:
                if not rec or rec[0] != REC_TUN_PACKET:
                    self.counters["tun.drop.bad_record"] += 1
                    continue
                self._write_message(rec[1:])

    def _write_message(self, message: bytes) -> None:
        """A tunnel message from the mesh: with its offload header as the device wants it."""
        try:
            off, packet = split_message(message)
            if self.vnet:
                self._write((ZERO_HDR if off is None else off.pack()) + packet)
            elif off is None:
                self._write(packet)
            else:  # a large segment, and this device cannot take it: cut it here
                for p in segment(off, packet):
                    self._write(p)
        except OffloadError:
            self.counters["tun.drop.malformed"] += 1

    def _write(self, packet: bytes | memoryview) -> None:
        try:
            n = os.write(self.fd, packet)
        except OSError as exc:
            # EAGAIN: the device's queue is full; EINVAL: a packet it rejects.
            self.counters["tun.drop.write_error"] += 1
            if exc.errno not in (errno.EAGAIN, errno.EINVAL, errno.EIO):
                self.log.warning("tun.write_error", error=str(exc))
            return
        self.counters["tun.write.packets"] += 1
        self.counters["tun.write.bytes"] += n

    def on_ctl(self) -> None:
        for batch in self.ctl.drain():
            for rec in batch:
                if rec[:1] != bytes((msg.REC_FORWARDING,)):
                    self.counters["tun.drop.bad_record"] += 1
                    continue
                body = msg.unpacked(rec)
                if body.get("full"):
                    self.known.clear()
                for dst, hop in body["entries"].items():
                    if hop is None:
                        self.known.discard(bytes(dst))
                    else:
                        self.known.add(bytes(dst))

    def report(self) -> None:
        counters = Counter(self.counters)
        counters.update(self.tunnel.counters)
        body = {
            "counters": dict(counters),
            "up_depth": sum(r.depth() for r in self.to_crypto),
            "up_dropped": sum(r.dropped_full for r in self.to_crypto),
            "down_depth": sum(r.depth() for r in self.from_crypto),
        }
        self.stats.put(msg.packed(REC_TUN_STATS, body))

    def run(self) -> None:
        stop = StopFlag()
        sel = selectors.DefaultSelector()
        sel.register(self.fd, selectors.EVENT_READ, self.on_tun)
        sel.register(self.ctl.consumer_fd(), selectors.EVENT_READ, self.on_ctl)
        for ring in self.from_crypto:
            sel.register(ring.consumer_fd(), selectors.EVENT_READ, lambda r=ring: self.on_down(r))
        self.stats.put(bytes((REC_TUN_UP,)))  # asks for the full table of known SIDs
        self.on_ctl()
        for ring in self.from_crypto:  # packets queued while this worker was down
            self.on_down(ring)
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
    try:
        fd, vnet = open_tun(cfg.tunnel.name, cfg.tunnel.offload)
        configure_tun(cfg.tunnel, sid)
    except (MeshpipeError, OSError) as exc:
        log.get().error("tun.start_failed", device=cfg.tunnel.name, error=str(exc))
        return 3
    log.get().info(
        "tun.start",
        device=cfg.tunnel.name,
        mtu=cfg.tunnel.mtu,
        ipv6=str(overlay_ipv6(sid)),
        offload=vnet,
    )
    TunWorker(fd, cfg.tunnel, sid, rings, vnet).run()
    os.close(fd)
    return 0


# -- the control worker's view ------------------------------------------------------------


def tunnel_status(
    tcfg: TunnelSection,
    counters: Counter[str],
    tun_report: dict[str, Any],
    crypto_reports: dict[int, dict[str, Any]],
) -> dict[str, Any]:
    """Per-stage counters for ``status --json``: read, to mesh, from mesh, write.

    ``counters`` already holds the TUN worker's and every crypto worker's."""

    def pick(prefix: str) -> dict[str, int]:
        return {k[len(prefix) :]: v for k, v in sorted(counters.items()) if k.startswith(prefix)}

    return {
        "device": tcfg.name,
        "mtu": tcfg.mtu,
        "port": TUNNEL_PORT,
        "peers": sum(int(r.get("tunnel_peers", 0)) for r in crypto_reports.values()),
        "crypto_workers": len(crypto_reports),
        "stages": {
            "tun_read": pick("tun.read."),
            "to_mesh": pick("tunnel.tx."),
            "from_mesh": pick("tunnel.rx."),
            "tun_write": pick("tun.write."),
        },
        "drops": {**pick("tun.drop."), **pick("tunnel.drop.")},
        "icmp": pick("tunnel.icmp."),
        "queues": {
            "up_depth_bytes": int(tun_report.get("up_depth", 0)),
            "up_dropped": int(tun_report.get("up_dropped", 0)),
            "down_depth_bytes": int(tun_report.get("down_depth", 0)),
            "crypto_in_depth_bytes": sum(
                int(r.get("in_queue_depth", 0)) for r in crypto_reports.values()
            ),
            "crypto_in_dropped": sum(
                int(r.get("in_queue_dropped", 0)) for r in crypto_reports.values()
            ),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
