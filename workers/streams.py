"""Bridging sockets and MSP streams inside the control worker.

A :class:`StreamPipe` joins one non-blocking socket (a CLI's control connection, an
accepted TCP connection of a port forward) to one MSP stream, in both directions,
with backpressure both ways: socket bytes are read only while the stream has send
buffer space, and stream bytes are read only while the socket keeps up, so a slow
side fills the MSP receive window instead of this process's memory.

Half-close maps both ways: EOF on the socket becomes the stream's FIN, the stream's
EOF becomes ``shutdown(SHUT_WR)`` on the socket. A stream reset closes the socket
(a TCP socket with SO_LINGER 0, so the client sees a reset, not a clean end); a
socket error resets the stream.

With ``framed=True`` (the CLI's control connection) the stream-to-socket direction is
framed so the CLI can tell a clean end from a reset: ``u32 length + bytes`` chunks,
and trailers ``0xFFFFFFFF`` + ``u32 length`` + JSON: ``{"eof": true}`` when the peer
has finished sending, then ``{"closed": true}`` once the stream has closed cleanly
(the CLI's own bytes are all delivered), or ``{"reset": "refused"}`` and the like.
A deadline-mode stream adds ``{"gap": [start, end]}`` trailers in stream order: the
bytes [start, end) were skipped and the next chunk continues at ``end``.

Datagram-mode streams carry messages, not bytes: each socket read (at most the
stream's largest message) is one datagram, each datagram received is one chunk (a
framed pipe keeps the boundaries; an unframed one, a UDP bridge's job, does not use
this class). The end of a datagram stream is a reset with ABORTED (it has no FIN),
so a framed pipe reports it as ``{"closed": true}``; EOF on the opener's socket ends
it, EOF on the acceptor's only ends what that side sends (``msp listen < /dev/null``
still receives).

:class:`StreamHub` owns the pipes and listeners and routes Msp events to them.
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshpipe import log
from meshpipe.errors import MeshpipeError
from meshpipe.msp import (
    MspEvent,
    Stream,
    StreamAccepted,
    StreamClosed,
    StreamEof,
    StreamEstablished,
    StreamGap,
    StreamReadable,
    StreamRefused,
    StreamWritable,
)
from meshpipe.msp.wire import Mode, ResetCode

if TYPE_CHECKING:
    from meshpipe_workers.stream_handoff import StreamMover

CHUNK = 256 * 1024
FRAME = struct.Struct("!I")
TRAILER = 0xFFFFFFFF
_LINGER_RESET = struct.pack("ii", 1, 0)


def frame_chunk(data: bytes) -> bytes:
    return FRAME.pack(len(data)) + data


def frame_trailer(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj).encode()
    return FRAME.pack(TRAILER) + FRAME.pack(len(body)) + body


def stream_mode(req: dict[str, Any], default: Mode = Mode.RELIABLE) -> tuple[Mode, float | None]:
    """The ``mode`` and ``budget_ms`` of a control request: (Mode, budget in s or None)."""
    name = req.get("mode") or default.name.lower()
    try:
        mode = Mode[str(name).upper()]
    except KeyError:
        raise MeshpipeError(f"mode must be reliable, deadline or datagram, not {name!r}") from None
    raw = req.get("budget_ms")
    if raw is None:
        return mode, None
    if mode is not Mode.DEADLINE:
        raise MeshpipeError("--budget-ms is for deadline mode")
    if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= 60000:
        raise MeshpipeError(f"budget_ms must be 1-60000, not {raw!r}")
    return mode, raw / 1000.0


def reset_reason(code: ResetCode | None) -> str:
    return "closed" if code is None else code.name.lower()


class StreamPipe:
    """One socket <-> one stream."""

    def __init__(
        self,
        hub: StreamHub,
        sock: socket.socket,
        stream: Stream,
        *,
        framed: bool = False,
        on_end: Callable[[StreamPipe | None], None] | None = None,
    ) -> None:
        self.hub = hub
        self.sock = sock
        self.stream = stream
        self.framed = framed
        self.on_end = on_end
        self.out = bytearray()  # stream bytes the socket has not taken yet
        self.sock_eof = False  # the socket side said EOF (we sent our FIN)
        self.sent_shut = False  # the stream's EOF is queued for the socket
        self.shut_done = False  # ... and the socket's write side is shut
        self.closed = False
        self.stream_gone = False  # the stream has closed (see close_code)
        self.close_code: ResetCode | None = None
        self.trailer_sent = False
        self.bytes_in = 0  # socket -> stream
        self.bytes_out = 0  # stream -> socket
        self.next_offset = 0  # deadline mode: the stream offset the socket expects next
        sock.setblocking(False)
        self.events = 0
        self._update_interest()

    # -- socket side ------------------------------------------------------------------

    def on_socket(self, mask: int = selectors.EVENT_READ | selectors.EVENT_WRITE) -> None:
        """The socket is ready (the selector loop calls this without a mask: both
        operations are non-blocking, so trying each is safe)."""
        now = self.hub.now()
        if mask & selectors.EVENT_WRITE:
            self._flush_out(now)
        if mask & selectors.EVENT_READ and not self.closed:
            self._read_socket(now)
        self._update_interest()

    def _read_socket(self, now: float) -> None:
        st = self.stream
        dgram = st.mode is Mode.DATAGRAM  # one socket read = one datagram
        while not self.sock_eof and not self.closed:
            room = st.write_space
            if room <= 0:
                return
            try:
                data = self.sock.recv(st.params.max_message if dgram else min(room, CHUNK))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._abort(now)
                return
            if not data:
                self.sock_eof = True
                if dgram and not st.initiator:
                    return  # the acceptor has nothing more to send; the opener decides
                if dgram:
                    st.flush(now)  # the queued datagrams leave before the closing RST
                st.shutdown(now)  # FIN; a datagram stream closes (RST ABORTED to the peer)
                return
            self.bytes_in += len(data)
            if dgram:
                st.send_datagram(data, now)
            else:
                st.write(data, now)

    def _flush_out(self, now: float) -> None:
        while self.out and not self.closed:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._abort(now)
                return
            del self.out[:n]
        if not self.out:
            self.pull(now)  # also shuts the write side once the EOF is through

    # -- stream side ------------------------------------------------------------------

    def pull(self, now: float) -> None:
        """Move stream bytes to the socket while it keeps up; after the stream's
        end, the EOF (a shutdown, or a trailer when framed) and the closing trailer."""
        st = self.stream
        if st.mode is Mode.DATAGRAM:
            while not self.closed and not self.out and (msg := st.recv_datagram()) is not None:
                self.bytes_out += len(msg)
                self.out += frame_chunk(msg) if self.framed else msg
                self._flush_out_once(now)
        while not self.closed and not self.out and st.readable_bytes:
            for offset, data in st.read_chunks(CHUNK):
                if offset > self.next_offset:
                    self._gap(self.next_offset, offset)
                self.next_offset = offset + len(data)
                self.bytes_out += len(data)
                self.out += frame_chunk(data) if self.framed else data
            self._flush_out_once(now)
        if not self.closed and not self.out and not st.readable_bytes:
            if st.eof and not self.sent_shut:
                for gap in st.gaps:  # a gap just before the FIN has no chunk after it
                    if gap.end > self.next_offset:
                        self._gap(max(gap.start, self.next_offset), gap.end)
                        self.next_offset = gap.end
                self.sent_shut = True
                if self.framed:  # the connection stays open for the closing trailer
                    self.out += frame_trailer({"eof": True})
                    self._flush_out_once(now)
            if self.framed and self.stream_gone and not self.trailer_sent and not self.out:
                self.trailer_sent = True
                code = self.close_code
                self.out += frame_trailer(
                    {"closed": True} if code is None else {"reset": reset_reason(code)}
                )
            if self.out:
                self._flush_out_once(now)
        if self.sent_shut and not self.out:
            self._shut_write()
        self._maybe_finished(now)
        self._update_interest()

    def _gap(self, start: int, end: int) -> None:
        """Bytes [start, end) will never come: a trailer tells a framed pipe's CLI."""
        if self.framed:
            self.out += frame_trailer({"gap": [start, end]})

    def _flush_out_once(self, now: float) -> None:
        try:
            n = self.sock.send(self.out)
            del self.out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._abort(now)

    def _shut_write(self) -> None:
        if self.framed or self.shut_done:
            return
        self.shut_done = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def on_closed(self, code: ResetCode | None, now: float) -> None:
        """The stream is gone. Bytes it delivered still reach the socket (its read
        queue outlives it), then the end: a trailer when framed; for TCP a clean
        close, or at once a TCP reset when the stream was reset."""
        self.stream_gone = True
        if code is ResetCode.ABORTED and self.stream.mode is Mode.DATAGRAM:
            code = None  # how a datagram stream ends: the peer is done, not failed
        self.close_code = code
        if code is not None and not self.framed:
            if self.sock.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                except OSError:
                    pass
            self._end()
            return
        self.pull(now)

    def _abort(self, now: float) -> None:
        self.stream.reset(now)
        self._end()

    def _maybe_finished(self, now: float) -> None:
        if self.closed or self.out:
            return
        if self.framed:  # a framed pipe ends once its closing trailer is through
            if self.trailer_sent:
                self._end()
            return
        st = self.stream
        if self.sent_shut and (st.closed or (self.sock_eof and st.fin_acked)):
            self._end()

    def _end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.hub.forget(self)
        try:
            self.sock.close()
        except OSError:
            pass
        if self.on_end is not None:
            self.on_end(self)

    def _update_interest(self) -> None:
        if self.closed:
            return
        want = 0
        if not self.sock_eof and self.stream.write_space > 0:
            want |= selectors.EVENT_READ
        if self.out:
            want |= selectors.EVENT_WRITE
        if want != self.events:
            self.hub.set_interest(self, want, self.events)
            self.events = want


def serve(
    listener: socket.socket, sel: selectors.BaseSelector, on_accept: Callable[[], None]
) -> None:
    """Listen on a bound socket, non-blocking, ``on_accept`` called when one is due."""
    listener.listen(16)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, on_accept)


def accept_conn(listener: socket.socket) -> socket.socket | None:
    """One connection from a non-blocking listening socket, made non-blocking; None
    if there is none after all."""
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    conn.setblocking(False)
    return conn


class StreamHub:
    """The pipes and stream listeners of a worker (the control worker; a crypto
    worker for the streams handed to it). With a ``mover``, a stream being attached
    may leave instead, socket and all (``on_end`` is then called with None)."""

    def __init__(self, sel: selectors.BaseSelector, clock: Callable[[], float]) -> None:
        self.sel = sel
        self.now = clock
        self.pipes: dict[Stream, StreamPipe] = {}
        # Streams waiting for their handshake, with what to do once open or refused.
        self.pending: dict[Stream, tuple[Callable[[Stream], None], Callable[[Stream], None]]] = {}
        self.acceptors: dict[int, Callable[[Stream], None]] = {}
        self.mover: StreamMover | None = None
        self.log = log.get()

    def attach(
        self,
        sock: socket.socket,
        stream: Stream,
        *,
        framed: bool = False,
        on_end: Callable[[StreamPipe | None], None] | None = None,
    ) -> StreamPipe | None:
        """Bridge ``sock`` and ``stream`` here, or (None) hand both to the mover."""
        if self.mover is not None and self.mover.move(sock, stream, framed, on_end):
            return None
        pipe = StreamPipe(self, sock, stream, framed=framed, on_end=on_end)
        self.pipes[stream] = pipe
        pipe.pull(self.now())
        if stream.closed:
            pipe.on_closed(stream.reset_code, self.now())
        return pipe

    def forget(self, pipe: StreamPipe) -> None:
        self.pipes.pop(pipe.stream, None)
        if pipe.events:
            try:
                self.sel.unregister(pipe.sock)
            except (KeyError, ValueError, OSError):
                pass

    def set_interest(self, pipe: StreamPipe, want: int, had: int) -> None:
        if had and want:
            self.sel.modify(pipe.sock, want, pipe.on_socket)
        elif want:
            self.sel.register(pipe.sock, want, pipe.on_socket)
        else:
            self.sel.unregister(pipe.sock)

    def when_open(
        self, stream: Stream, opened: Callable[[Stream], None], failed: Callable[[Stream], None]
    ) -> None:
        self.pending[stream] = (opened, failed)

    def dispatch(self, events: list[MspEvent]) -> None:
        now = self.now()
        for ev in events:
            if isinstance(ev, StreamAccepted):
                acceptor = self.acceptors.get(ev.stream.port)
                if acceptor is not None:
                    acceptor(ev.stream)
                self.log.info(
                    "stream.open",
                    stream=str(ev.stream.id),
                    port=ev.stream.port,
                    mode=ev.stream.mode.name.lower(),
                    direction="in",
                )
            elif isinstance(ev, StreamEstablished):
                pend = self.pending.pop(ev.stream, None)
                if pend is not None:
                    pend[0](ev.stream)
            elif isinstance(ev, (StreamReadable, StreamEof)):
                pipe = self.pipes.get(ev.stream)
                if pipe is not None:
                    pipe.pull(now)
            elif isinstance(ev, StreamWritable):
                pipe = self.pipes.get(ev.stream)
                if pipe is not None:
                    pipe.on_socket(selectors.EVENT_READ)
            elif isinstance(ev, StreamClosed):
                self._closed(ev, now)
            elif isinstance(ev, StreamRefused):
                event = "acl.denied" if ev.code is ResetCode.DENIED else "stream.refused"
                self.log.info(event, sid=ev.peer.hex(), port=ev.port, reason=reset_reason(ev.code))
            elif isinstance(ev, StreamGap):
                self.log.info(
                    "stream.gap", stream=str(ev.stream.id), start=ev.gap.start, end=ev.gap.end
                )

    def _closed(self, ev: StreamClosed, now: float) -> None:
        st = ev.stream
        pend = self.pending.pop(st, None)
        if pend is not None:
            pend[1](st)
        pipe = self.pipes.get(st)
        if pipe is not None:
            pipe.on_closed(ev.code, now)
        self.log.info(
            "stream.close",
            stream=str(st.id),
            port=st.port,
            reason=reset_reason(ev.code),
            bytes_in=st.bytes_received,
            bytes_out=st.info(now)["bytes_sent"],
        )


__all__ = [
    "CHUNK",
    "TRAILER",
    "StreamHub",
    "StreamPipe",
    "accept_conn",
    "frame_chunk",
    "frame_trailer",
    "serve",
    "stream_mode",
]
