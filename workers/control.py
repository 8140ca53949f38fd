"""Control worker: runs the sans-IO node core and serves the control socket.

It owns the clock: it feeds the core frames from the interface workers and timer
wake-ups, executes the actions the core returns (frames to send, forwarding-table
updates for the data plane, log events), and answers CLI requests.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from meshpipe import __version__, log
from meshpipe.actions import (
    Action,
    Event,
    ForwardingChanged,
    Open,
    Seal,
    SendFrame,
)
from meshpipe.config import Config, load_config
from meshpipe.dataplane import ForwardingMirror, shard_of
from meshpipe.errors import MeshpipeError, RecordError
from meshpipe.identity import Identity, Sid, resolve_sid
from meshpipe.mdp import MdpError
from meshpipe.msp import Stream
from meshpipe.names import lookup
from meshpipe.services.discovery import DiscoveryTiming
from meshpipe.stack import NodeStack, PingReply
from meshpipe_workers import messages as msg
from meshpipe_workers import metrics, radio, reload
from meshpipe_workers.coreparams import interface_params, timing
from meshpipe_workers.dnsserver import DnsServer
from meshpipe_workers.ring import Ring, RingSpec
from meshpipe_workers.services import COMMANDS as SERVICE_COMMANDS
from meshpipe_workers.services import Services
from meshpipe_workers.stopflag import StopFlag
from meshpipe_workers.stream_handoff import HANDOFF_ENV, StreamMover
from meshpipe_workers.streams import StreamHub, accept_conn, reset_reason, serve, stream_mode
from meshpipe_workers.trace_jobs import TraceJobs
from meshpipe_workers.tun import tunnel_status
from meshpipe_workers.txrings import FrameSender, flush_batches

STATS_PERIOD = 30.0
FAREWELL_REPEAT = 2  # goodbye frames go out twice: a lost one would cost the timeout
FAREWELL_DRAIN = 0.5  # at most this long for the interface workers to send them
MIRROR_PERIOD = 1.0
MAX_REQUEST = 64 * 1024


class Deferred:
    """Returned by a handler that answers later, possibly with several lines (ping)."""

    def __init__(self, start: Callable[[socket.socket], None]) -> None:
        self.start = start


class ControlServer:
    """Newline-delimited JSON requests on a Unix stream socket.

    Most requests get one reply line; a handler may return ``Deferred`` to keep the
    connection and stream progress lines, ending with a line that has ``"done"``.
    """

    def __init__(
        self, path: str, sel: selectors.BaseSelector, handler: Callable[[dict[str, Any]], Any]
    ):
        self.path = path
        self.sel = sel
        self.handler = handler
        self.buffers: dict[socket.socket, bytearray] = {}
        _remove_stale_socket(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the control socket is for the node's own user only
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        serve(self.sock, sel, self._accept)

    def _accept(self) -> None:
        conn = accept_conn(self.sock)
        if conn is None:
            return
        self.buffers[conn] = bytearray()
        self.sel.register(conn, selectors.EVENT_READ, lambda c=conn: self._read(c))

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        buf = self.buffers[conn]
        buf += data
        if b"\n" not in buf and data and len(buf) < MAX_REQUEST:
            return
        line = bytes(buf).split(b"\n", 1)[0]
        reply = self._answer(line)
        if isinstance(reply, Deferred):
            self.sel.unregister(conn)  # the job owns the connection from now on
            self.buffers.pop(conn, None)
            reply.start(conn)
            return
        self.write_line(conn, reply)
        self._close(conn)

    @staticmethod
    def write_line(conn: socket.socket, obj: Any) -> bool:
        try:
            conn.setblocking(True)
            conn.settimeout(2.0)
            conn.sendall(json.dumps(obj).encode() + b"\n")
            return True
        except OSError:
            return False

    def _answer(self, line: bytes) -> dict[str, Any] | Deferred:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("request must be an object with a string 'cmd'")
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        try:
            result = self.handler(req)
            return result if isinstance(result, Deferred) else {"ok": True, "result": result}
        except MeshpipeError as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bad request must not take the node down
            log.get().error("control.error", cmd=req.get("cmd"), error=repr(exc))
            return {"ok": False, "error": f"internal error: {exc!r}"}

    def _close(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        self.buffers.pop(conn, None)
        conn.close()

    def close(self) -> None:
        for conn in list(self.buffers):
            self._close(conn)
        self.sel.unregister(self.sock)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class PingJob:
    """One `meshpipe ping` in progress: its probes, replies and connection."""

    TIMEOUT = 2.0  # wait this long after the last probe for stragglers

    def __init__(
        self,
        conn: socket.socket,
        dst: bytes,
        count: int,
        interval: float,
        size: int,
        now: float,
        pattern: bytes = b"",
    ) -> None:
        self.pattern = pattern
        self.conn = conn
        self.dst = dst
        self.count = count
        self.interval = interval
        self.size = size
        self.next_send = now
        self.sent = 0
        self.sent_at: dict[int, float] = {}
        self.rtts: list[float] = []
        self.hops: int | None = None
        self.error = ""

    def on_reply(self, rep: PingReply, server: ControlServer) -> None:
        if bytes(rep.sid) != self.dst or rep.seq not in self.sent_at:
            return
        del self.sent_at[rep.seq]
        rtt_ms = round(rep.rtt * 1000, 3)
        self.rtts.append(rtt_ms)
        self.hops = rep.hops
        server.write_line(
            self.conn, {"reply": True, "seq": rep.seq, "rtt_ms": rtt_ms, "hops": rep.hops}
        )

    def finished(self, now: float) -> bool:
        if self.sent < self.count:
            return False
        return not self.sent_at or now >= self.next_send - self.interval + self.TIMEOUT

    def summary(self) -> dict[str, Any]:
        return {
            "done": True,
            "ok": not self.error,
            "error": self.error,
            "result": {
                "sid": self.dst.hex(),
                "sent": self.sent,
                "received": len(self.rtts),
                "rtt_ms": self.rtts,
                "hops": self.hops,
            },
        }


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left by a dead node; refuse to start beside a live one."""
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise MeshpipeError(f"another node is already running on control socket {path}")


class ControlWorker:
    def __init__(self, cfg: Config, identity: Identity, rings: dict[str, Any]) -> None:
        self.cfg = cfg
        self.identity = identity
        self.log = log.get()
        self.started = time.monotonic()
        # epoch_ns makes handshake timestamps grow across restarts of this node, so
        # peers accept our new handshakes and reject replayed old ones.
        self.core = NodeStack(
            identity,
            interface_params(cfg),
            timing(cfg),
            now=self.started,
            epoch_ns=time.time_ns(),
            discovery_timing=DiscoveryTiming(
                lifetime=cfg.discovery.lifetime, refresh=cfg.discovery.refresh
            ),
            discovery_limits=cfg.limits.discovery_limits(),
            msp_params=cfg.limits.msp_params(),
            limits=cfg.limits.core_limits(),
            sharded=True,  # sessions live in the crypto workers
            node_name=cfg.node.name,
            name=cfg.node.name or "",  # told to whoever traces a path through us
        )
        self.pings: list[PingJob] = []
        self.counters: Counter[str] = Counter()
        self.sel = selectors.DefaultSelector()
        # interface index -> list of (worker index, tx ring)
        self.tx: dict[int, list[Ring]] = {}
        self.rx: list[Ring] = []
        self.worker_reports: dict[tuple[int, int], dict[str, Any]] = {}
        self.supervisor_state: dict[str, Any] = {}
        self.memory = metrics.MemoryReader()  # the processes' RSS/PSS for `status`
        for w in rings["interfaces"]:
            rx = Ring.attach(RingSpec.from_json(w["rx"]))
            tx = Ring.attach(RingSpec.from_json(w["tx"]))
            self.rx.append(rx)
            self.tx.setdefault(int(w["iface"]), []).append(tx)
            self.sel.register(rx.consumer_fd(), selectors.EVENT_READ, lambda r=rx: self._on_rx(r))
        if "supervisor" in rings:
            self._listen(Ring.attach(RingSpec.from_json(rings["supervisor"])))
        # Crypto workers: ring k goes to (and comes from) the owner of shard k.
        self.to_crypto: list[Ring] = []
        for c in rings.get("crypto", []):
            self.to_crypto.append(Ring.attach(RingSpec.from_json(c["to"])))
            self._listen(Ring.attach(RingSpec.from_json(c["from"])))
        self.crypto_reports: dict[int, dict[str, Any]] = {}
        self.mirror = ForwardingMirror()
        self.frames = FrameSender(cfg, self.tx, self.counters)
        self._pending: dict[Ring, list[bytes]] = {}  # records for the crypto workers

        self.server = ControlServer(cfg.node.control_socket, self.sel, self._handle_request)
        self.hub = StreamHub(self.sel, time.monotonic)
        # Bridged service streams run in the crypto worker of their peer.
        self.mover = self._start_mover(cfg, len(self.to_crypto))
        self.hub.mover = self.mover
        self.traces = TraceJobs(self.core, self.server.write_line, self.known_sids)
        # Exposed services, forwards, SOCKS and the exit (workers/services.py).
        self.services = Services(
            self.core, self.hub, self.sel, cfg, self.execute, time.monotonic, self.known_sids
        )
        self.reloader = reload.control_reloader(self)  # workers/reload.py: register sections
        self.reload_wanted = False
        self.dns = self._start_dns()

    def _start_mover(self, cfg: Config, shards: int) -> StreamMover | None:
        if not shards or os.environ.get(HANDOFF_ENV) == "off":
            return None
        try:
            return StreamMover(
                self.sel, cfg.node.control_socket, shards, self.core.msp, self.counters
            )
        except OSError as exc:  # the streams then stay here, as with no crypto workers
            self.log.error("handoff.unavailable", error=str(exc))
            return None

    def _start_dns(self) -> DnsServer | None:
        """The [dns] responder; a node whose address is taken keeps running without it."""
        if self.cfg.dns.listen is None:
            return None
        try:
            server = DnsServer(self.cfg.dns.listen, self.sel, self.core.node_claimants)
        except OSError as exc:
            self.log.error("dns.unavailable", listen=list(self.cfg.dns.listen), error=str(exc))
            return None
        self.log.info("dns.listen", listen=list(self.cfg.dns.listen))
        return server

    def _listen(self, ring: Ring) -> None:
        self.rx.append(ring)
        self.sel.register(ring.consumer_fd(), selectors.EVENT_READ, lambda r=ring: self._on_rx(r))

    # -- data from the interface workers ------------------------------------------

    def _on_rx(self, ring: Ring) -> None:
        for batch in ring.drain():
            now = time.monotonic()
            for rec in batch:
                self._handle_record(rec, now)

    def _handle_record(self, rec: bytes, now: float) -> None:
        tag = rec[0] if rec else -1
        try:
            if tag == msg.REC_FRAME_IN:
                iface, addr, frame = msg.parse_frame_in(rec)
                self.execute(self.core.on_frame(iface, addr, frame, now))
            elif tag == radio.REC_RADIO_IN:
                iface, raddr, frame = radio.parse_radio_in(rec)
                self.execute(self.core.on_frame(iface, raddr, frame, now))
            elif tag == msg.REC_WORKER_UP:
                self._push_full_table(*msg.parse_worker_up(rec))
            elif tag == msg.REC_COUNTERS:
                body = msg.unpacked_map(rec, ("iface", "worker"), ("counters",))
                if body["iface"] >= len(self.cfg.interfaces):
                    raise RecordError(f"counters record for interface {body['iface']}")
                self.worker_reports[(body["iface"], body["worker"])] = body
            elif tag == msg.REC_OPENED:
                src, hops, pt = msg.parse_sid_hops_record(rec)
                if self.mover is None or not self.mover.forward(src, pt, hops):
                    self.execute(self.core.on_opened(src, pt, hops, now))
            elif tag == msg.REC_CRYPTO_REPORT:
                body = msg.unpacked_map(rec, ("index",), ("counters",))
                if not isinstance(body.get("sessions", []), list):
                    raise RecordError("crypto report: sessions is not a list")
                self.crypto_reports[body["index"]] = body
            elif tag == msg.REC_CRYPTO_UP:
                self._push_to_shards(
                    dict(self.mirror.table), full=True, only=msg.parse_crypto_up(rec)
                )
            elif tag == msg.REC_SUPERVISOR:
                self.supervisor_state = msg.unpacked_map(rec)
            else:
                self.counters["drop.bad_record"] += 1
        except RecordError as exc:  # malformed: counted and dropped
            self.counters["drop.bad_record"] += 1
            self.log.warning("control.bad_record", tag=tag, error=str(exc))
        except Exception as exc:  # the core counts bad frames; this guards the record layer
            self.counters["drop.bad_record"] += 1
            self.log.error("control.bad_record", tag=tag, error=repr(exc))

    # -- executing the core's actions ---------------------------------------------------

    def execute(self, actions: Iterable[Action]) -> None:
        try:
            self._execute(actions)
        finally:
            self._flush_tx()

    def _flush_tx(self) -> None:
        """Publish the queued records: one batch (and one wake-up) per ring."""
        self.frames.flush()
        flush_batches(self._pending, self.counters, "drop.crypto_queue_full")

    def _execute(self, actions: Iterable[Action]) -> None:
        n = len(self.to_crypto)
        for a in actions:
            if isinstance(a, SendFrame):
                self.frames.queue(a)
            elif isinstance(a, Seal):
                ring = self.to_crypto[shard_of(a.dst, n)] if n else None
                self._queue(ring, msg.sid_record(msg.REC_SEAL, a.dst, a.plaintext))
            elif isinstance(a, Open):
                ring = self.to_crypto[shard_of(a.src, n)] if n else None
                self._queue(ring, msg.sid_hops_record(msg.REC_OPEN, a.src, a.hops, a.packet))
            elif isinstance(a, Event):
                self.log.info(a.name, **a.fields)
            elif isinstance(a, ForwardingChanged):
                self._push_forwarding(a.entries, full=False)
                self._push_to_shards(self.mirror.changes(self.core, a.entries), full=False)

    def _queue(self, ring: Ring | None, rec: bytes) -> None:
        if ring is None:
            self.counters["drop.no_crypto_worker"] += 1
        else:
            self._pending.setdefault(ring, []).append(rec)

    def _push_to_shards(
        self, entries: dict[bytes, Any], full: bool, only: int | None = None
    ) -> None:
        """Next hop and path MTU per destination for the crypto workers."""
        if not entries and not full:
            return
        rec = msg.forwarding(entries, full)
        rings = self.to_crypto if only is None else self.to_crypto[only : only + 1]
        for ring in rings:
            if not ring.put(rec):
                self.counters["drop.crypto_queue_full"] += 1

    def _push_forwarding(
        self, entries: dict[bytes, Any], full: bool, only: Ring | None = None
    ) -> None:
        rec = msg.forwarding(entries, full)
        rings = [only] if only is not None else [r for rs in self.tx.values() for r in rs]
        for ring in rings:
            if not ring.put(rec):
                self.counters["drop.tx_queue_full"] += 1

    def _push_full_table(self, iface: int, worker: int) -> None:
        rings = self.tx.get(iface, [])
        if worker < len(rings):
            table: dict[bytes, Any] = dict(self.core.forwarding_table())
            self._push_forwarding(table, full=True, only=rings[worker])

    # -- control API ----------------------------------------------------------------

    def _handle_request(self, req: dict[str, Any]) -> Any:
        cmd = req["cmd"]
        handler = {
            "id": self.api_id,
            "status": self.api_status,
            "peers": self.api_peers,
            "routes": self.api_routes,
            "sessions": self.api_sessions,
            "streams": self.api_streams,
            "topology": self.core.topology,
        }.get(cmd)
        if cmd == "metrics":
            return metrics.snapshot(self)
        if cmd == "reload":
            return self.api_reload()
        if cmd == "resolve":
            return self.api_resolve(req)
        if cmd == "ping":
            return self.api_ping(req)
        if cmd == "trace":
            return Deferred(self.traces.request(req))
        if cmd == "msp.connect":
            return self.api_msp_connect(req)
        if cmd == "msp.listen":
            return self.api_msp_listen(req)
        if cmd in SERVICE_COMMANDS:
            return self.services.handle(cmd, req)
        if handler is None:
            raise MeshpipeError(f"unknown command {cmd!r}")
        return handler()

    # -- reload and shutdown (workers/reload.py) ------------------------------------------

    def api_reload(self) -> dict[str, Any]:
        """Validate the file (a bad one is refused: ConfigError), then ask the
        supervisor to reload; it passes SIGHUP back to us and the other workers."""
        new = reload.load_for_reload(self.cfg.path)
        live, restart = self.reloader.plan(self.cfg, new)
        reload.signal_supervisor(self.supervisor_state.get("pid"))
        return {"file": self.cfg.path, "live": live, "restart_needed": restart}

    def apply_reload(self) -> None:
        try:
            new = reload.load_for_reload(self.cfg.path)
        except MeshpipeError:
            return
        out = self.reloader.apply(self.cfg, new)
        self.cfg = out.config
        self.services.cfg = out.config
        self.log.info(
            "config.reloaded",
            applied=out.applied,
            restart_needed=out.restart_needed,
            failed=out.failed,
        )

    def farewell(self) -> None:
        """Retract our routes and withdraw our services before we exit, so the
        neighbours converge at once instead of when their timers run out."""
        actions = self.core.farewell(time.monotonic())
        for _ in range(FAREWELL_REPEAT):
            self.execute(actions)
            time.sleep(0.02)
        deadline = time.monotonic() + FAREWELL_DRAIN
        rings = [r for rs in self.tx.values() for r in rs]
        while time.monotonic() < deadline and any(r.depth() for r in rings):
            time.sleep(0.01)
        self.log.info("control.farewell", frames=sum(isinstance(a, SendFrame) for a in actions))

    def known_sids(self) -> set[bytes]:
        known = {bytes(r.sid) for r in self.core.routes()}
        known.update(bytes(n.sid) for n in self.core.neighbours())
        return known

    def api_resolve(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        """Every node claiming a name (or SID prefix), nearest first; names are claims."""
        name = req.get("name")
        if not isinstance(name, str) or not name:
            raise MeshpipeError("resolve: want a name")
        return [
            {**c.as_json(), "hops": self.core.nodes.hops(c.sid) or 0}
            for c in lookup(name, self.core.node_claimants())
        ]

    def api_sessions(self) -> list[dict[str, Any]]:
        """The crypto workers' sessions, as of their last reports (at most 1 s old)."""
        rows: list[dict[str, Any]] = []
        for _, body in sorted(self.crypto_reports.items()):
            rows.extend(body.get("sessions", []))
        return rows

    def api_ping(self, req: dict[str, Any]) -> Deferred:
        dst = resolve_sid(str(req.get("sid", "")), self.known_sids())
        count = int(req.get("count", 4))
        interval = float(req.get("interval", 1.0))
        size = int(req.get("size", 0))
        try:
            pattern = bytes.fromhex(str(req.get("pattern", "")))
        except ValueError as exc:
            raise MeshpipeError("ping: pattern must be hex") from exc
        if not 1 <= count <= 100000 or not 0.01 <= interval <= 60 or not 0 <= size <= 65535:
            raise MeshpipeError("ping: count 1..100000, interval 0.01..60 s, size 0..65535")
        if dst == self.identity.sid:
            raise MeshpipeError("ping: that is this node's own SID")
        route = next((r for r in self.core.routes() if bytes(r.sid) == dst), None)
        if route is None:
            raise MeshpipeError(f"ping: no route to {dst.hex()[:16]}")

        def start(conn: socket.socket) -> None:
            job = PingJob(conn, dst, count, interval, size, time.monotonic(), pattern)
            self.server.write_line(
                conn, {"start": True, "sid": dst.hex(), "hops": route.hops, "size": size}
            )
            self.pings.append(job)

        return Deferred(start)

    # -- MSP streams for the CLI (meshpipe msp connect / listen) ---------------------

    def api_streams(self) -> list[dict[str, Any]]:
        """The control worker's streams, then those handed to crypto workers (as of
        their last report)."""
        return self.core.msp.info(time.monotonic()) + self.moved_streams()

    def moved_streams(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for _k, body in sorted(self.crypto_reports.items()):
            rows = body.get("streams", [])
            out.extend(r for r in rows if isinstance(r, dict)) if isinstance(rows, list) else None
        return out

    def api_msp_connect(self, req: dict[str, Any]) -> Deferred:
        dst = resolve_sid(str(req.get("sid", "")), self.known_sids())
        port = _port(req.get("port"))
        mode, budget = stream_mode(req)
        if dst == self.identity.sid:
            raise MeshpipeError("msp connect: that is this node's own SID")

        def start(conn: socket.socket) -> None:
            stream = self.core.msp.open(dst, port, time.monotonic(), mode, budget)
            self.log.info(
                "stream.open",
                stream=str(stream.id),
                port=port,
                mode=mode.name.lower(),
                direction="out",
            )

            def opened(st: Stream) -> None:
                info = {
                    "stream": str(st.id),
                    "sid": dst.hex(),
                    "port": port,
                    "mode": st.mode.name.lower(),
                }
                if self.server.write_line(conn, {"ok": True, "result": info}):
                    self.hub.attach(conn, st, framed=True)
                else:
                    st.reset(time.monotonic())
                    conn.close()

            def failed(st: Stream) -> None:
                reason = reset_reason(st.reset_code)
                err = f"msp connect: stream to {dst.hex()[:16]} port {port} {reason}"
                self.server.write_line(conn, {"ok": False, "error": err})
                conn.close()

            self.hub.when_open(stream, opened, failed)

        return Deferred(start)

    def api_msp_listen(self, req: dict[str, Any]) -> Deferred:
        port = _port(req.get("port"))
        allow_raw = req.get("allow") or []
        if not isinstance(allow_raw, list):
            raise MeshpipeError("msp listen: allow must be a list of SIDs")
        allow = {bytes(Sid.parse(str(a))) for a in allow_raw}
        if self.core.msp.is_listening(port):
            raise MeshpipeError(f"msp listen: port {port} is already in use on this node")
        msp = self.core.msp
        msp.listen(port, allow=(lambda sid: sid in allow) if allow else None)

        def start(conn: socket.socket) -> None:
            def gone() -> None:  # the CLI left before anyone connected
                try:
                    still_there = conn.recv(1, socket.MSG_PEEK) != b""
                except BlockingIOError:
                    still_there = True
                except OSError:
                    still_there = False
                if not still_there:
                    self.sel.unregister(conn)
                    conn.close()
                    self.hub.acceptors.pop(port, None)
                    msp.unlisten(port)

            def accepted(st: Stream) -> None:
                self.hub.acceptors.pop(port, None)
                msp.unlisten(port)  # like nc -l: one stream per listen
                self.sel.unregister(conn)
                info = {
                    "stream": str(st.id),
                    "sid": st.peer.hex(),
                    "port": port,
                    "mode": st.mode.name.lower(),
                    "budget_ms": round(st.budget * 1000),
                }
                if self.server.write_line(conn, {"ok": True, "result": info}):
                    self.hub.attach(conn, st, framed=True)
                else:
                    st.reset(time.monotonic())
                    conn.close()

            conn.setblocking(False)
            self.sel.register(conn, selectors.EVENT_READ, gone)
            self.hub.acceptors[port] = accepted

        return Deferred(start)

    def _service_pings(self, now: float) -> None:
        replies = self.core.ping_replies()
        for job in list(self.pings):
            for rep in replies:
                job.on_reply(rep, self.server)
            if job.sent < job.count and now >= job.next_send:
                try:
                    actions = self.core.ping(job.dst, now, job.size, job.pattern)
                except MdpError as exc:
                    job.error = str(exc)
                    job.sent = job.count
                else:
                    job.sent_at[self.core.last_ping_seq] = now
                    job.sent += 1
                    job.next_send = now + job.interval
                    self.execute(actions)
            if job.finished(now):
                self.server.write_line(job.conn, job.summary())
                job.conn.close()
                self.pings.remove(job)

    def _ping_deadline(self) -> float:
        return min((j.next_send for j in self.pings if j.sent < j.count), default=float("inf"))

    def api_id(self) -> dict[str, Any]:
        sid = self.identity.sid
        return {"sid": str(sid), "ipv6": str(sid.ipv6()), "name": self.cfg.node.name}

    def api_peers(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        for n in self.core.neighbours():
            d = n.as_json()
            d.pop("last_heard", None)  # a monotonic timestamp means nothing to the CLI
            d["last_heard_s"] = round(now - n.last_heard, 2)
            out.append(d)
        return out

    def api_routes(self) -> list[dict[str, Any]]:
        return [r.as_json() for r in self.core.routes()]

    def api_status(self) -> dict[str, Any]:
        counters = Counter(self.core.counters)
        counters.update(self.counters)
        if self.dns is not None:
            counters.update(self.dns.counters)
        workers = []
        for (iface, worker), body in sorted(self.worker_reports.items()):
            workers.append(
                {
                    "role": "interface",
                    "iface": self.cfg.interfaces[iface].name,
                    "worker": worker,
                    "counters": body.get("counters", {}),
                    "rx_queue_depth": body.get("rx_ring_depth", 0),
                    "rx_queue_dropped": body.get("rx_ring_dropped", 0),
                    "crypto_queue_depth": body.get("crypto_ring_depth", 0),
                    "crypto_queue_dropped": body.get("crypto_ring_dropped", 0),
                    "hop_links": body.get("hop_links", []),
                }
            )
        for k, body in sorted(self.crypto_reports.items()):
            counters.update(body.get("counters", {}))
            workers.append(
                {
                    "role": "crypto",
                    "worker": k,
                    "sessions": len(body.get("sessions", [])),
                    "tunnel_peers": body.get("tunnel_peers", 0),
                    "handshakes_in_progress": body.get("handshakes_in_progress", 0),
                    "counters": body.get("counters", {}),
                    "in_queue_depth": body.get("in_queue_depth", 0),
                    "in_queue_dropped": body.get("in_queue_dropped", 0),
                }
            )
        tunnel = None
        if self.cfg.tunnel.enabled:
            tunnel = tunnel_status(self.cfg.tunnel, counters, self.crypto_reports)
        return {
            **self.api_id(),
            **({"tunnel": tunnel} if tunnel is not None else {}),
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started, 1),
            "neighbours": len(self.core.neighbours()),
            "routes": len(self.core.routes()),
            "streams": len(self.core.msp.streams()) + len(self.moved_streams()),
            "listening": [{"port": p} for p in self.core.msp.listening()],
            "counters": dict(counters),
            "workers": workers,
            "supervisor": self._supervisor_with_memory(),
        }

    def _supervisor_with_memory(self) -> dict[str, Any]:
        """The supervisor's worker table with each process's RSS and PSS (bytes; PSS at
        most metrics.PSS_MAX_AGE old), the supervisor's and the zygote's too."""
        sup = dict(self.supervisor_state)
        if not sup:
            return sup

        def mem(pid: Any) -> dict[str, int | None]:
            got = self.memory(int(pid)) if pid else None
            return {"rss_bytes": got[0] if got else None, "pss_bytes": got[1] if got else None}

        sup["workers"] = [{**w, **mem(w.get("pid"))} for w in sup.get("workers", [])]
        sup.update(mem(sup.get("pid")))
        if sup.get("zygote"):
            sup["zygote"] = {**sup["zygote"], **mem(sup["zygote"].get("pid"))}
        pids = {int(w["pid"]) for w in sup["workers"] if w.get("pid")}
        zygote = int((sup.get("zygote") or {}).get("pid") or 0)
        self.memory.forget_except(pids | {int(sup.get("pid") or 0), zygote})
        return sup

    # -- main loop --------------------------------------------------------------------

    def stats(self) -> None:
        s = self.api_status()
        self.log.info(
            "stats",
            neighbours=s["neighbours"],
            routes=s["routes"],
            counters=s["counters"],
            workers=s["workers"],
            **({"tunnel": s["tunnel"]} if "tunnel" in s else {}),
        )

    def run(self) -> None:
        stop = StopFlag()
        signal.signal(signal.SIGHUP, lambda _s, _f: setattr(self, "reload_wanted", True))
        self.log.info("control.start", control_socket=self.cfg.node.control_socket)
        next_stats = time.monotonic() + STATS_PERIOD
        next_mirror = time.monotonic() + MIRROR_PERIOD
        self.execute(self.core.on_timer(time.monotonic()))
        for ring in self.rx:  # records queued before a restart; their wake-up may be gone
            self._on_rx(ring)
        while not stop:
            now = time.monotonic()
            wake = min(
                self.core.next_deadline(),
                next_stats,
                self._ping_deadline(),
                self.services.next_deadline(),
            )
            if self.pings or self.traces.jobs:
                wake = min(wake, now + 0.05)  # replies and timeouts are checked on wake-ups
            for key, _ in self.sel.select(max(0.0, min(wake - now, 1.0))):
                key.data()
            if self.reload_wanted:
                self.reload_wanted = False
                self.apply_reload()
            now = time.monotonic()
            if now >= self.core.next_deadline():
                self.execute(self.core.on_timer(now))
            if self.pings:
                self._service_pings(now)
            self.services.on_timer(now)
            if self.traces.jobs:
                self.traces.poll()
            events = self.core.msp.events()
            if events:
                self.hub.dispatch(self.services.filter(events))
            if now >= next_mirror:  # path MTUs change without a new next hop too
                self._push_to_shards(self.mirror.changes(self.core), full=False)
                next_mirror = now + MIRROR_PERIOD
            if now >= next_stats:
                self.stats()
                next_stats = now + STATS_PERIOD
        self.farewell()
        self.services.close()
        if self.mover is not None:
            self.mover.close()
        if self.dns is not None:
            self.dns.close()
        self.server.close()
        self.log.info("control.stop")


def _port(value: Any) -> int:
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise MeshpipeError(f"port must be 1-65535, not {value!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshpipe-control-worker")
    p.add_argument("--config", required=True)
    p.add_argument("--rings", required=True)
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    identity = Identity.load(cfg.node.key)
    log.configure(node=identity.sid.short, role="control", level=cfg.node.log_level)
    try:
        worker = ControlWorker(cfg, identity, json.loads(a.rings))
    except MeshpipeError as exc:
        log.get().error("control.start_failed", error=str(exc))
        return 3
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
