"""Service streams handed from the control worker to the crypto worker of their peer.

The control worker decides everything about a stream: discovery and the choice of
service or exit, access lists, the exit policy, the SOCKS and proxy handshakes. Once
a stream is bridged to a socket (``StreamHub.attach``: a port forward, SOCKS, an
exposed service, the exit, ``msp connect`` / ``msp listen``), it moves to the crypto
worker that owns the peer's session (shard ``shard_of(peer, N)``), with the socket:
its bytes then never cross the control worker, and several peers' streams run in
parallel, one crypto worker each.

The move, over one ``AF_UNIX`` ``SOCK_SEQPACKET`` connection per crypto worker (an
abstract address named after the control socket's path; both ends check that the
other runs as our user, ``SO_PEERCRED``):

- crypto -> control ``H`` + JSON ``{"index": k}``: hello, once connected (a crypto
  worker connects, and after a control restart reconnects, on its own);
- control -> crypto ``A`` + u16 length + JSON ``{"token", "framed"}`` + the stream
  (``Msp.export``), the socket as an ``SCM_RIGHTS`` fd: adopt and bridge it;
- control -> crypto ``S`` + source SID + u8 hops + plaintext: a segment of a moved
  stream that the control worker got (one in flight during the move);
- crypto -> control ``E`` + JSON ``{"token"}``: that stream's bridge has ended (the
  forward's or SOCKS listener's ``active`` count goes down).

Kept in the control worker, as before: datagram-mode streams, streams whose buffers
are bigger than :data:`MAX_STREAM_BYTES`, and every stream while the owning crypto
worker is not connected. A crypto worker that dies loses its moved streams (their
peers are reset when their next segment meets an unknown stream); the control
worker ends their bridges' bookkeeping. A restarted control worker leaves the moved
streams running.

With ``MESHPIPE_STREAM_HANDOFF=off`` in its environment the control worker keeps
every stream, as before this module (for comparisons: bench/msp_goodput.py).

The crypto worker reports its streams (``Stream.info`` plus ``"worker"``) in its
report each second, so ``meshpipe streams``, ``status --json`` and the metrics list
them. Counters: ``handoff.moved``, ``handoff.kept``, ``handoff.forwarded``,
``handoff.drop.send_failed`` (control); ``handoff.adopted``,
``handoff.drop.bad_message`` (crypto).
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshpipe import log
from meshpipe.actions import Action
from meshpipe.dataplane import CryptoShard, shard_of
from meshpipe.errors import MeshpipeError
from meshpipe.msp import Msp, Stream, stream_number
from meshpipe_workers.streams import StreamHub, StreamPipe, accept_conn, serve

HANDOFF_ENV = "MESHPIPE_STREAM_HANDOFF"
MAX_STREAM_BYTES = 96 * 1024  # a serialised stream bigger than this stays in control
RECV_SIZE = MAX_STREAM_BYTES + 64 * 1024
SNDBUF = 1 << 20
RETRY = 0.5  # a crypto worker tries to reach the control worker this often
T_HELLO, T_ADOPT, T_SEGMENT, T_ENDED = b"H", b"A", b"S", b"E"
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_HEAD = struct.Struct("!H")


def handoff_address(control_socket: str) -> str:
    """The abstract Unix address of a node's hand-over socket (one per node)."""
    digest = hashlib.sha256(os.path.realpath(control_socket).encode()).hexdigest()[:32]
    return "\0meshpipe-streams-" + digest


def _same_user(sock: socket.socket) -> bool:
    try:
        _pid, uid, _gid = _CREDS.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size)
        )
    except OSError:
        return False
    return bool(uid == os.getuid())


def _seqpacket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    except OSError:
        pass
    return sock


def _json(data: bytes) -> dict[str, Any]:
    body = json.loads(data)
    if not isinstance(body, dict):
        raise ValueError("not an object")
    return body


@dataclass
class _Moved:
    worker: socket.socket
    key: tuple[bytes, int]
    on_end: Callable[[StreamPipe | None], None] | None


class StreamMover:
    """The control worker's end: moves bridged streams to their crypto workers."""

    def __init__(
        self,
        sel: selectors.BaseSelector,
        control_socket: str,
        shards: int,
        msp: Msp,
        counters: Counter[str],
    ) -> None:
        self.sel = sel
        self.shards = shards
        self.msp = msp
        self.counters = counters
        self.log = log.get()
        self.workers: dict[int, socket.socket] = {}
        self.moved: dict[int, _Moved] = {}  # token -> the stream's bookkeeping
        self.by_key: dict[tuple[bytes, int], int] = {}  # (peer, number) -> token
        self.next_token = 1
        self.sock = _seqpacket()
        self.sock.bind(handoff_address(control_socket))
        serve(self.sock, sel, self._accept)

    def _accept(self) -> None:
        conn = accept_conn(self.sock)
        if conn is None:
            return
        if not _same_user(conn):
            conn.close()
            return
        self.sel.register(conn, selectors.EVENT_READ, lambda c=conn: self._read(c))

    def _read(self, conn: socket.socket) -> None:
        while True:
            try:
                data = conn.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lost(conn)
                return
            try:
                body = _json(data[1:])
                if data[:1] == T_HELLO:
                    k = int(body["index"])
                    old = self.workers.get(k)
                    if old is not None and old is not conn:
                        self._lost(old)
                    self.workers[k] = conn
                    self.log.info("handoff.connected", worker=k)
                elif data[:1] == T_ENDED:
                    self._ended(int(body["token"]))
            except (ValueError, KeyError, TypeError):
                self.counters["handoff.drop.bad_message"] += 1

    def _lost(self, conn: socket.socket) -> None:
        """A crypto worker went away: its moved streams went with it."""
        try:
            self.sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()
        for k, c in list(self.workers.items()):
            if c is conn:
                del self.workers[k]
                self.log.info("handoff.disconnected", worker=k)
        for token, m in list(self.moved.items()):
            if m.worker is conn:
                self._ended(token)

    def _ended(self, token: int) -> None:
        m = self.moved.pop(token, None)
        if m is None:
            return
        self.by_key.pop(m.key, None)
        if m.on_end is not None:
            m.on_end(None)

    def move(
        self,
        sock: socket.socket,
        stream: Stream,
        framed: bool,
        on_end: Callable[[StreamPipe | None], None] | None,
    ) -> bool:
        """Hand ``stream`` and ``sock`` over to the stream's crypto worker; False
        (nothing changed) if it stays here."""
        conn = self.workers.get(shard_of(stream.peer, self.shards))
        blob = None if conn is None else self.msp.export(stream, MAX_STREAM_BYTES)
        if conn is None or blob is None:
            self.counters["handoff.kept"] += 1
            return False
        token = self.next_token
        head = json.dumps({"token": token, "framed": framed}).encode()
        try:
            socket.send_fds(conn, [T_ADOPT + _HEAD.pack(len(head)) + head + blob], [sock.fileno()])
        except OSError:
            self.counters["handoff.kept"] += 1
            return False
        self.next_token += 1
        self.msp.release(stream)
        key = (stream.peer, stream.number)
        self.moved[token] = _Moved(conn, key, on_end)
        self.by_key[key] = token
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()  # the crypto worker holds its own copy now
        self.counters["handoff.moved"] += 1
        return True

    def forward(self, src: bytes, plaintext: bytes, hops: int) -> bool:
        """A plaintext the control worker got: True if it belongs to a moved stream
        (and has been passed on to its crypto worker)."""
        number = stream_number(plaintext)
        token = None if number is None else self.by_key.get((bytes(src), number))
        if token is None:
            return False
        try:
            self.moved[token].worker.send(T_SEGMENT + bytes(src) + bytes((hops,)) + plaintext)
            self.counters["handoff.forwarded"] += 1
        except OSError:  # lost like any segment: the peer sends it again
            self.counters["handoff.drop.send_failed"] += 1
        return True

    def close(self) -> None:
        for conn in list(self.workers.values()):
            self._lost(conn)
        self.sel.unregister(self.sock)
        self.sock.close()


class ShardStreams:
    """The crypto worker's end: adopts streams and bridges them to their sockets."""

    def __init__(
        self,
        sel: selectors.BaseSelector,
        control_socket: str,
        index: int,
        shard: CryptoShard,
        clock: Callable[[], float],
        execute: Callable[[list[Action]], None],
    ) -> None:
        self.sel = sel
        self.address = handoff_address(control_socket)
        self.index = index
        self.shard = shard
        self.now = clock
        self.execute = execute
        self.counters = shard.counters
        self.log = log.get()
        self.hub = StreamHub(sel, clock)
        self.conn: socket.socket | None = None
        self.retry_at = clock()
        self.changed = False  # a stream came or went (the worker then reports soon)

    def next_deadline(self) -> float:
        return self.retry_at if self.conn is None else float("inf")

    def poll(self, now: float) -> None:
        """Once per loop turn: reconnect if due, and hand the streams' events to the
        bridges (which may write to the streams: the caller then runs the timer)."""
        if self.conn is None and now >= self.retry_at:
            self._connect(now)
        events = self.shard.streams.events()
        if events:
            self.hub.dispatch(events)

    def _connect(self, now: float) -> None:
        sock = _seqpacket()
        try:
            sock.connect(self.address)
            if not _same_user(sock):
                raise OSError("the hand-over socket belongs to another user")
            sock.send(T_HELLO + json.dumps({"index": self.index}).encode())
        except OSError:
            sock.close()
            self.retry_at = now + RETRY
            return
        sock.setblocking(False)
        self.conn = sock
        self.sel.register(sock, selectors.EVENT_READ, self._read)
        self.log.info("handoff.connected", worker=self.index)

    def _read(self) -> None:
        conn = self.conn
        assert conn is not None
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn, RECV_SIZE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                for fd in fds:
                    os.close(fd)
                self._lost(conn)
                return
            try:
                self._message(data, fds)
            except (MeshpipeError, ValueError, KeyError, TypeError, IndexError) as exc:
                self.counters["handoff.drop.bad_message"] += 1
                self.log.warning("handoff.bad_message", error=repr(exc))

    def _message(self, data: bytes, fds: list[int]) -> None:
        now = self.now()
        kind = data[:1]
        if kind == T_SEGMENT and len(data) >= 34:
            for fd in fds:
                os.close(fd)
            self.execute(self.shard.plaintext(data[1:33], data[34:], data[33], now))
            return
        if kind != T_ADOPT or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"unexpected message {kind!r} with {len(fds)} fds")
        sock = socket.socket(fileno=fds[0])
        (n,) = _HEAD.unpack_from(data, 1)
        head = _json(data[3 : 3 + n])
        token = int(head["token"])
        try:
            st = self.shard.streams.adopt(data[3 + n :], now)
        except Exception:
            sock.close()
            self._send(T_ENDED + json.dumps({"token": token}).encode())
            raise
        self.counters["handoff.adopted"] += 1
        self.changed = True
        self.hub.attach(
            sock, st, framed=bool(head.get("framed")), on_end=lambda _p: self._ended(token)
        )

    def _ended(self, token: int) -> None:
        self.changed = True
        self._send(T_ENDED + json.dumps({"token": token}).encode())

    def _send(self, data: bytes) -> None:
        if self.conn is None:
            return
        try:
            self.conn.send(data)
        except OSError:
            self.counters["handoff.drop.send_failed"] += 1

    def _lost(self, conn: socket.socket) -> None:
        """The control worker went away: the streams keep running; reconnect later."""
        self.sel.unregister(conn)
        conn.close()
        self.conn = None
        self.retry_at = self.now() + RETRY
        self.log.info("handoff.disconnected", worker=self.index)

    def report(self, now: float) -> list[dict[str, Any]]:
        role = f"crypto:{self.index}"
        return [{**info, "worker": role} for info in self.shard.streams.info(now)]


__all__ = ["HANDOFF_ENV", "MAX_STREAM_BYTES", "ShardStreams", "StreamMover", "handoff_address"]
