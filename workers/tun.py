"""The IP tunnel's shells: the TUN device, its owner process and its queues.

The device is a multi-queue TUN (``IFF_MULTI_QUEUE``, ``IFF_NO_PI``, and with
``[tunnel] offload`` ``IFF_VNET_HDR`` and TCP segmentation offloads, see
meshpipe/offload.py). Every crypto worker attaches its own queue
(:class:`TunQueue`) and reads and writes it itself: the kernel spreads the flows
it sends over the queues, and a packet read by a worker that does not own the
destination's session is handed to the owner over a ring. A packet from the mesh
is written by the worker that received it. So the tunnel's path is TUN -> crypto
worker -> interface worker and back, with no process in between.

The TUN worker (``python -m meshpipe_workers.tun``, started by the supervisor when
``[tunnel] enabled``) owns the device: it attaches a queue (creating the device if
no crypto worker has yet), sets the offloads, configures it with pyroute2 (the
node's overlay IPv6 /128, the ``fd00::/8`` route, the ``[[tunnel.route]]``
prefixes, the extra addresses, the MTU, link up), then detaches its queue, so no
flow is sent to it, and only holds it: while any queue is open the device, its
addresses and routes stay, whichever worker is restarted. It uses no rings.

Counters (in each crypto worker's report): ``tun.read.packets``/``bytes``,
``tun.read.large_segments``, ``tun.write.packets``/``bytes``,
``tun.drop.write_error``, ``tun.drop.malformed``.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import struct
import sys
from collections import Counter
from typing import Any

from meshpipe import log
from meshpipe.config import TunnelSection, load_config
from meshpipe.errors import MeshpipeError
from meshpipe.identity import overlay_ipv6
from meshpipe.offload import (
    VNET_HDR_LEN,
    ZERO_HDR,
    Offload,
    OffloadError,
    segment,
    split_message,
)
from meshpipe.tunnel import OVERLAY, TUNNEL_PORT
from meshpipe_workers.reload import follow_log_level
from meshpipe_workers.stopflag import StopFlag

# Ring records (first byte), next to the tags in messages.py.
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETQUEUE = 0x400454D9
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_DETACH_QUEUE = 0x0400
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
READ_BATCH = 256
REPORT_PERIOD = 1.0
MAX_PACKET = 65535


class TunError(MeshpipeError):
    """The TUN device could not be created or configured."""


def open_queue(name: str, offload: bool) -> int:
    """Attach a queue of multi-queue TUN device ``name`` (creating the device if it
    does not exist); its non-blocking fd. Every queue must ask for the same flags."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | (IFF_VNET_HDR if offload else 0)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        raise TunError(f"cannot attach to TUN device {name}: {exc.strerror}") from None
    return fd


class TunQueue:
    """One queue of the device, read and written by one crypto worker."""

    def __init__(self, fd: int, vnet: bool, counters: Counter[str]) -> None:
        self.fd = fd
        self.vnet = vnet  # every read and write starts with a virtio_net_hdr
        self.counters = counters
        self.log = log.get()

    def read_batch(self) -> list[tuple[Offload | None, bytes]]:
        """Up to READ_BATCH packets, each with its offload header (None without)."""
        out: list[tuple[Offload | None, bytes]] = []
        nbytes = 0
        for _ in range(READ_BATCH):
            try:
                pkt = os.read(self.fd, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                break
            nbytes += len(pkt)
            if not self.vnet:
                out.append((None, pkt))
                continue
            try:
                off = Offload.parse(pkt)
            except OffloadError:
                self.counters["tun.drop.malformed"] += 1
                continue
            if off.gso:
                self.counters["tun.read.large_segments"] += 1
            out.append((off, pkt[VNET_HDR_LEN:]))
        self.counters["tun.read.packets"] += len(out)
        self.counters["tun.read.bytes"] += nbytes
        return out

    def write_message(self, message: bytes) -> None:
        """A tunnel message from the mesh: with its offload header as the device wants it."""
        try:
            off, packet = split_message(message)
            if self.vnet:
                self.write((ZERO_HDR if off is None else off.pack()) + packet)
            elif off is None:
                self.write(packet)
            else:  # a large segment, and this device cannot take it: cut it here
                for p in segment(off, packet):
                    self.write(p)
        except OffloadError:
            self.counters["tun.drop.malformed"] += 1

    def write_packet(self, packet: bytes) -> None:
        """A plain IP packet made here (an ICMP error)."""
        self.write(ZERO_HDR + packet if self.vnet else packet)

    def write(self, data: bytes) -> None:
        try:
            n = os.write(self.fd, data)
        except OSError as exc:
            # EAGAIN: the device's queue is full; EINVAL: a packet it rejects; EIO: down.
            self.counters["tun.drop.write_error"] += 1
            if exc.errno not in (errno.EAGAIN, errno.EINVAL, errno.EIO):
                self.log.warning("tun.write_error", error=str(exc))
            return
        self.counters["tun.write.packets"] += 1
        self.counters["tun.write.bytes"] += n


# -- the TUN worker: owner of the device -----------------------------------------------------


def set_offloads(fd: int, name: str) -> None:
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN)
    except OSError as exc:  # an old kernel: plain packets, still with the header
        log.get().warning("tun.offload_unavailable", device=name, error=exc.strerror)


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


def configure_in_child(tcfg: TunnelSection, sid: bytes) -> None:
    """:func:`configure_tun` in a short-lived child: pyroute2 (about 12 MB once
    imported) never enters this long-lived worker. Raises TunError with the child's."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            configure_tun(tcfg, sid)
        except BaseException as exc:
            os.write(w, f"{type(exc).__name__}: {exc}".encode()[:4000])
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        error = f.read().decode(errors="replace")
    _pid, status = os.waitpid(pid, 0)
    if error or os.waitstatus_to_exitcode(status) != 0:
        raise TunError(f"configuring {tcfg.name}: {error or 'the child failed'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshpipe-tun-worker")
    p.add_argument("--config", required=True)
    p.add_argument("--sid", required=True)
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    sid = bytes.fromhex(a.sid)
    log.configure(node=a.sid[:8], role="tun", level=cfg.node.log_level)
    follow_log_level(a.config)
    tcfg = cfg.tunnel
    try:
        fd = open_queue(tcfg.name, tcfg.offload)
        if tcfg.offload:
            set_offloads(fd, tcfg.name)
        configure_in_child(tcfg, sid)
        # Hold the device without taking flows: the crypto workers' queues read them.
        fcntl.ioctl(fd, TUNSETQUEUE, struct.pack("16sH", b"", IFF_DETACH_QUEUE))
    except (MeshpipeError, OSError) as exc:
        log.get().error("tun.start_failed", device=tcfg.name, error=str(exc))
        return 3
    log.get().info(
        "tun.start",
        device=tcfg.name,
        mtu=tcfg.mtu,
        ipv6=str(overlay_ipv6(sid)),
        offload=tcfg.offload,
    )
    stop = StopFlag()
    while not stop:
        stop.sleep(60.0)  # nothing to do but hold the device: wake for signals only
    os.close(fd)
    return 0


# -- the control worker's view ------------------------------------------------------------


def tunnel_status(
    tcfg: TunnelSection, counters: Counter[str], crypto_reports: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """Per-stage counters for ``status --json``: read, to mesh, from mesh, write.

    ``counters`` already holds every crypto worker's."""

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
            # Rings into the crypto workers (from the control worker, the interface
            # workers and, for packets read by another worker's TUN queue, each other).
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
