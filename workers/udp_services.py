"""UDP services in the control worker: ``expose NAME --udp`` and ``forward NAME --udp``.

- **forward --udp**: a local UDP socket. Each client address that sends to it is one
  flow (:class:`meshpipe.services.udp_flows.FlowTable`: idle timeout, bounded, least
  recently used evicted first) and one MSP stream to the node that offers the service:
  datagram mode by default (one UDP datagram = one MSP datagram), or deadline mode
  (``--mode deadline --budget-ms N``: in order, late ones skipped; datagrams framed by
  :mod:`meshpipe.services.udp_framing`). What comes back on that stream is sent to
  that client address.
- **expose --udp**: the service's MSP port accepts datagram and deadline streams
  (its access list decides who may); each accepted stream gets its own connected UDP
  socket to the target, so the target's replies go back on the stream that asked.

Discovery announces these services with kind ``"udp"``; a UDP forward only picks
records of that kind (and a TCP forward never does).

Log events: ``service.exposed`` / ``service.unexposed`` (with ``protocol: "udp"``),
``forward.listen``, ``udp.flow.open``, ``udp.flow.closed`` (reason), ``forward.no_service``
and ``acl.denied`` (logged by :class:`~meshpipe_workers.services.Services`).
Counters (in ``status`` as ``udp.*``): ``udp.rx``, ``udp.tx``, ``udp.drop.no_service``,
``udp.drop.too_large``, ``udp.drop.send_error``, ``udp.flows.evicted``,
``udp.flows.expired``.
"""

from __future__ import annotations

import math
import selectors
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshpipe.config import format_hostport
from meshpipe.errors import MeshpipeError
from meshpipe.msp import (
    Mode,
    MspEvent,
    Stream,
    StreamClosed,
    StreamGap,
    StreamReadable,
)
from meshpipe.services.acl import Acl
from meshpipe.services.udp_flows import FlowTable
from meshpipe.services.udp_framing import FrameDecoder, frame
from meshpipe_workers.exposed import Exposed
from meshpipe_workers.streams import reset_reason

if TYPE_CHECKING:
    from meshpipe_workers.services import Services

UDP_KIND = "udp"
IDLE_TIMEOUT = 60.0  # a flow without a datagram either way for this long ends
MAX_FLOWS = 1024  # per forward and per exposed service
MAX_DATAGRAM = 65507
BATCH = 64  # datagrams read per wake-up and socket


class UdpServiceError(MeshpipeError):
    """A UDP service request cannot be carried out."""


def _udp_socket(addr: tuple[str, int], *, bind: bool) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if bind:
            sock.bind(addr)
        else:
            sock.connect(addr)
    except OSError as exc:
        sock.close()
        verb = "listen on" if bind else "reach"
        raise UdpServiceError(f"cannot {verb} {format_hostport(addr)}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


@dataclass
class _Pipe:
    """How a stream carries datagrams: MSP datagrams, or framed in a deadline stream."""

    stream: Stream
    decoder: FrameDecoder | None = None  # deadline mode only
    next_offset: int = 0

    def send(self, data: bytes, now: float) -> bool:
        st = self.stream
        if st.closed:
            return False
        if st.mode is Mode.DATAGRAM:
            st.send_datagram(data, now)
            return True
        if st.write_space < len(data) + 8:
            return False  # a full send buffer: late anyway, drop it like the network would
        st.write(frame(data), now)
        return True

    def receive(self) -> list[bytes]:
        st = self.stream
        out: list[bytes] = []
        if st.mode is Mode.DATAGRAM:
            while (msg := st.recv_datagram()) is not None:
                out.append(msg)
            return out
        assert self.decoder is not None
        for offset, data in st.read_chunks():
            if offset != self.next_offset:
                self.decoder.gap()
            self.next_offset = offset + len(data)
            out += self.decoder.feed(data)
        return out


def _pipe(st: Stream) -> _Pipe:
    return _Pipe(st, FrameDecoder() if st.mode is Mode.DEADLINE else None)


@dataclass
class UdpExposed(Exposed):
    kind: str = UDP_KIND
    flows: FlowTable[Stream, socket.socket] = field(
        default_factory=lambda: FlowTable(IDLE_TIMEOUT, MAX_FLOWS)
    )


@dataclass
class UdpForward:
    sock: socket.socket
    listen: tuple[str, int]
    service: str
    sid: str | None
    port: int | None
    mode: Mode
    budget: float | None
    flows: FlowTable[tuple[Any, ...], _Pipe] = field(
        default_factory=lambda: FlowTable(IDLE_TIMEOUT, MAX_FLOWS)
    )
    total: int = 0
    failed: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": "udp-forward",
            "listen": format_hostport(self.listen),
            "service": self.service,
            "sid": self.sid,
            "port": self.port,
            "mode": self.mode.name.lower(),
            "active": len(self.flows),
            "total": self.total,
            "failed": self.failed,
        }


class UdpServices:
    """The UDP side of :class:`~meshpipe_workers.services.Services` (its owner)."""

    def __init__(self, owner: Services) -> None:
        self.owner = owner
        self.core = owner.core
        self.sel = owner.sel
        self.log = owner.log
        self.exposed: dict[str, UdpExposed] = {}
        self.forwards: dict[int, UdpForward] = {}  # local UDP port -> forward
        # Our streams: (exposed service, target socket) or (forward, client address).
        self.by_stream: dict[Stream, tuple[UdpExposed | UdpForward, Any, _Pipe]] = {}
        self.counters: Counter[str] = Counter()

    # -- expose ------------------------------------------------------------------------

    def expose(
        self, spec: tuple[str, tuple[str, int], int | None, Acl, bool], now: float
    ) -> UdpExposed:
        """Offer ``(name, target, MSP port or None, acl, hidden)`` to the mesh."""
        name, to, port, acl, hidden = spec
        port = self.owner.claim(name, port)
        msp = self.core.msp
        svc = UdpExposed(name, to, port, acl, hidden)
        self.owner._announce(name, port, UDP_KIND, hidden, now)
        msp.listen(
            port,
            allow=lambda sid: svc.acl.allows(sid),
            modes=frozenset({Mode.DATAGRAM, Mode.DEADLINE}),
        )
        self.owner.hub.acceptors[port] = lambda st: self._accepted(svc, st)
        self.exposed[name] = svc
        self.log.info("service.exposed", **svc.as_json())
        return svc

    def unexpose(self, name: str, now: float) -> dict[str, Any] | None:
        svc = self.exposed.pop(name, None)
        if svc is None:
            return None
        self.core.msp.unlisten(svc.port)
        self.owner.hub.acceptors.pop(svc.port, None)
        self.owner.execute(self.core.withdraw_service(name, now))
        for st, _sock in svc.flows.items():
            st.shutdown(now)
        self.log.info("service.unexposed", name=name, port=svc.port, protocol="udp")
        return svc.as_json()

    def _accepted(self, svc: UdpExposed, st: Stream) -> None:
        now = self.owner.now()
        try:
            sock = _udp_socket(svc.to, bind=False)
        except UdpServiceError as exc:
            self.log.info("service.target_failed", service=svc.name, error=str(exc))
            st.reset(now)
            return
        for old, _old_sock in svc.flows.add(st, sock, now):
            self.counters["udp.flows.evicted"] += 1
            self._end(old, now)  # its socket closes with the stream (_closed)
        self.by_stream[st] = (svc, sock, _pipe(st))
        self.sel.register(sock, selectors.EVENT_READ, lambda: self._target_readable(svc, st))
        self.log.info(
            "udp.flow.open", service=svc.name, sid=st.peer.hex(), mode=st.mode.name.lower()
        )

    def _target_readable(self, svc: UdpExposed, st: Stream) -> None:
        entry = self.by_stream.get(st)
        if entry is None:
            return
        _, sock, pipe = entry
        now = self.owner.now()
        for _ in range(BATCH):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ECONNREFUSED: the target port is closed (ICMP)
                self.counters["udp.drop.send_error"] += 1
                continue
            self.counters["udp.rx"] += 1
            svc.flows.touch(st, now)
            if not pipe.send(data, now):
                self.counters["udp.drop.too_large"] += 1

    # -- forward ------------------------------------------------------------------------

    def add_forward(
        self,
        service: str,
        sid: str | None,
        listen: tuple[str, int],
        port: int | None,
        mode: Mode,
        budget: float | None,
        now: float,
    ) -> dict[str, Any]:
        if mode is Mode.RELIABLE:
            raise UdpServiceError("a UDP forward runs in datagram or deadline mode")
        sock = _udp_socket(listen, bind=True)
        local = sock.getsockname()[1]
        if local in self.forwards:
            sock.close()
            raise UdpServiceError(f"UDP port {local} already has a forward")
        fwd = UdpForward(sock, (listen[0], local), service, sid, port, mode, budget)
        self.forwards[local] = fwd
        self.sel.register(sock, selectors.EVENT_READ, lambda: self._client_readable(fwd))
        found = self._resolve(fwd, now)
        if found is None:
            self.owner._query(service, now)
        info = fwd.as_json()
        info["found"] = None if found is None else {"sid": found[0].hex(), "port": found[1]}
        self.log.info("forward.listen", listen=info["listen"], service=service, protocol="udp")
        return info

    def remove_forward(self, port: int) -> dict[str, Any] | None:
        fwd = self.forwards.pop(port, None)
        if fwd is None:
            return None
        now = self.owner.now()
        self.sel.unregister(fwd.sock)
        fwd.sock.close()
        for _addr, pipe in fwd.flows.items():
            self._end(pipe.stream, now)
        self.log.info("forward.closed", kind="udp-forward", listen=format_hostport(fwd.listen))
        return fwd.as_json()

    def _resolve(self, fwd: UdpForward, now: float) -> tuple[bytes, int] | None:
        rows = [r for r in self.core.services(now) if r["kind"] == UDP_KIND]
        return self.owner.find_service(rows, fwd.service, fwd.sid, fwd.port)

    def _client_readable(self, fwd: UdpForward) -> None:
        now = self.owner.now()
        for _ in range(BATCH):
            try:
                data, addr = fwd.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self.counters["udp.rx"] += 1
            pipe = fwd.flows.get(addr)
            if pipe is None or pipe.stream.closed:
                pipe = self._open_flow(fwd, addr, now)
                if pipe is None:
                    continue
            fwd.flows.touch(addr, now)
            if not pipe.send(data, now):
                self.counters["udp.drop.too_large"] += 1

    def _open_flow(self, fwd: UdpForward, addr: Any, now: float) -> _Pipe | None:
        found = self._resolve(fwd, now)
        if found is None:
            fwd.failed += 1
            self.counters["udp.drop.no_service"] += 1
            self.owner._query(fwd.service, now)
            self.log.info("forward.no_service", service=fwd.service, sid=fwd.sid)
            return None
        sid, port = found
        try:
            st = self.core.msp.open(sid, port, now, fwd.mode, fwd.budget)
        except MeshpipeError as exc:
            fwd.failed += 1
            self.log.info("forward.failed", service=fwd.service, error=str(exc))
            return None
        fwd.total += 1
        pipe = _pipe(st)
        for _old_addr, old in fwd.flows.add(addr, pipe, now):
            self.counters["udp.flows.evicted"] += 1
            self._end(old.stream, now)
        self.by_stream[st] = (fwd, addr, pipe)
        self.log.info(
            "udp.flow.open",
            service=fwd.service,
            client=format_hostport(addr[:2]),
            sid=sid.hex(),
            port=port,
            mode=fwd.mode.name.lower(),
            stream=str(st.id),
        )
        return pipe

    # -- streams ------------------------------------------------------------------------

    def filter(self, events: list[MspEvent]) -> list[MspEvent]:
        """Take the events of our streams (a close still goes on, for its log line)."""
        out: list[MspEvent] = []
        for ev in events:
            stream = getattr(ev, "stream", None)
            entry = self.by_stream.get(stream) if isinstance(stream, Stream) else None
            if entry is None:
                out.append(ev)
                continue
            if isinstance(ev, StreamReadable):
                self._stream_readable(entry)
            elif isinstance(ev, StreamClosed):
                self._closed(ev)
                out.append(ev)
            elif isinstance(ev, StreamGap):
                out.append(ev)
        return out

    def _stream_readable(self, entry: tuple[UdpExposed | UdpForward, Any, _Pipe]) -> None:
        owner, where, pipe = entry
        now = self.owner.now()
        for data in pipe.receive():
            try:
                if isinstance(owner, UdpForward):
                    owner.flows.touch(where, now)
                    owner.sock.sendto(data, where)
                else:
                    owner.flows.touch(pipe.stream, now)
                    where.send(data)
                self.counters["udp.tx"] += 1
            except OSError:
                self.counters["udp.drop.send_error"] += 1

    def _closed(self, ev: StreamClosed) -> None:
        entry = self.by_stream.pop(ev.stream, None)
        if entry is None:
            return
        owner, where, pipe = entry
        if isinstance(owner, UdpForward):
            if owner.flows.get(where) is pipe:
                owner.flows.remove(where)
            if not ev.stream.established and ev.code is not None:
                owner.failed += 1
        else:
            owner.flows.remove(ev.stream)
            try:
                self.sel.unregister(where)
            except (KeyError, ValueError):
                pass
            where.close()
        self.log.info("udp.flow.closed", stream=str(ev.stream.id), reason=reset_reason(ev.code))

    def _end(self, st: Stream, now: float) -> None:
        # Datagram streams close at once (RST ABORTED); deadline ones send their FIN.
        st.shutdown(now)

    # -- timers -------------------------------------------------------------------------

    def next_deadline(self) -> float:
        t = math.inf
        for svc in self.exposed.values():
            t = min(t, svc.flows.next_deadline())
        for fwd in self.forwards.values():
            t = min(t, fwd.flows.next_deadline())
        return t

    def on_timer(self, now: float) -> None:
        for svc in self.exposed.values():
            for st, _sock in svc.flows.expire(now):
                self.counters["udp.flows.expired"] += 1
                self._end(st, now)
        for fwd in self.forwards.values():
            for _addr, pipe in fwd.flows.expire(now):
                self.counters["udp.flows.expired"] += 1
                self._end(pipe.stream, now)

    def close(self) -> None:
        for fwd in self.forwards.values():
            self.sel.unregister(fwd.sock)
            fwd.sock.close()
        self.forwards.clear()


__all__ = ["UDP_KIND", "UdpExposed", "UdpForward", "UdpServiceError", "UdpServices"]
