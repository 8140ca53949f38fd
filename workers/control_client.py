"""The CLI's side of the control socket: JSON requests and replies, and stream pipes."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

from meshpipe.errors import MeshpipeError


class NodeNotRunning(MeshpipeError):
    """Nothing answers on the control socket."""


def _connect(path: str, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        s.close()
        raise NodeNotRunning(
            f"meshpipe node is not running (no answer on control socket {path})"
        ) from exc
    except PermissionError as exc:
        s.close()
        raise MeshpipeError(f"no permission to use control socket {path}") from exc
    return s


def _lines(s: socket.socket, path: str, timeout: float) -> Iterator[dict[str, Any]]:
    buf = bytearray()
    while True:
        while b"\n" not in buf:
            try:
                chunk = s.recv(65536)
            except TimeoutError as exc:
                raise MeshpipeError(
                    f"node did not answer within {timeout:.0f} s on {path}"
                ) from exc
            if not chunk:
                if buf:
                    raise MeshpipeError("node closed the connection mid-reply")
                return
            buf += chunk
        line, _, rest = bytes(buf).partition(b"\n")
        buf = bytearray(rest)
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise MeshpipeError("node sent a malformed reply") from exc
        if not isinstance(obj, dict):
            raise MeshpipeError("node sent a malformed reply")
        yield obj


def request(path: str, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
    """One request, one reply; raises MeshpipeError with the node's message on failure."""
    s = _connect(path, timeout)
    try:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        reply = next(_lines(s, path, timeout), None)
    finally:
        s.close()
    if reply is None:
        raise MeshpipeError("node closed the connection without a reply")
    if not reply.get("ok"):
        raise MeshpipeError(str(reply.get("error", "request failed")))
    return reply["result"]


def request_stream(
    path: str, cmd: str, timeout: float = 10.0, **args: Any
) -> Iterator[dict[str, Any]]:
    """A request answered by several lines (e.g. ping); the last one has "done"."""
    s = _connect(path, timeout)
    try:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        for obj in _lines(s, path, timeout):
            if "ok" in obj and not obj["ok"]:
                raise MeshpipeError(str(obj.get("error", "request failed")))
            yield obj
            if obj.get("done"):
                return
    finally:
        s.close()


class StreamReset(MeshpipeError):
    """The stream behind a pipe was reset (refused, denied, timed out, aborted)."""


_FRAME = struct.Struct("!I")
_TRAILER = 0xFFFFFFFF


def open_pipe(path: str, cmd: str, **args: Any) -> tuple[socket.socket, dict[str, Any], bytes]:
    """Send a request whose success turns the connection into a stream pipe
    (``msp.connect`` / ``msp.listen``); returns the socket, the reply's result and any
    pipe bytes that arrived with the reply. Waits as long as the node takes."""
    s = _connect(path, 10.0)
    s.settimeout(None)
    try:
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise MeshpipeError("node closed the connection without a reply")
            buf += chunk
        line, _, rest = bytes(buf).partition(b"\n")
        try:
            reply = json.loads(line)
        except ValueError as exc:
            raise MeshpipeError("node sent a malformed reply") from exc
        if not isinstance(reply, dict) or not reply.get("ok"):
            err = reply.get("error", "request failed") if isinstance(reply, dict) else "?"
            raise MeshpipeError(str(err))
        return s, reply["result"], rest
    except BaseException:
        s.close()
        raise


def run_pipe(
    s: socket.socket,
    pending: bytes,
    stdin_fd: int,
    stdout_fd: int,
    on_gap: Callable[[int, int], None] | None = None,
) -> None:
    """Copy stdin to the stream (EOF half-closes it) and the stream to stdout until the
    node reports the stream closed; raises StreamReset if it was reset. A deadline-mode
    stream's skipped ranges go to ``on_gap(start, end)`` at their place in the stream."""

    def pump_stdin() -> None:
        try:
            while True:
                data = os.read(stdin_fd, 256 * 1024)
                if not data:
                    break
                s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the node went away: the reader below reports it

    threading.Thread(target=pump_stdin, daemon=True).start()
    buf = bytearray(pending)
    while True:
        while len(buf) >= _FRAME.size:
            (n,) = _FRAME.unpack_from(buf)
            if n == _TRAILER:
                if len(buf) < 2 * _FRAME.size:
                    break
                (m,) = _FRAME.unpack_from(buf, _FRAME.size)
                if len(buf) < 2 * _FRAME.size + m:
                    break
                trailer = json.loads(bytes(buf[2 * _FRAME.size : 2 * _FRAME.size + m]))
                del buf[: 2 * _FRAME.size + m]
                if trailer.get("closed"):
                    return
                if "reset" in trailer:
                    raise StreamReset(f"stream reset ({trailer['reset']})")
                gap = trailer.get("gap")
                if on_gap is not None and isinstance(gap, list) and len(gap) == 2:
                    on_gap(int(gap[0]), int(gap[1]))
                continue  # {"eof": true}: the peer is done sending; ours may continue
            if len(buf) < _FRAME.size + n:
                break
            data = bytes(buf[_FRAME.size : _FRAME.size + n])
            del buf[: _FRAME.size + n]
            _write_all(stdout_fd, data)
        chunk = s.recv(512 * 1024)
        if not chunk:
            raise StreamReset("the node ended the stream without closing it")
        buf += chunk


def gap_reporter(stdout_fd: int, stderr: Any, fill_zero: bool) -> Callable[[int, int], None]:
    """What ``msp connect/listen`` does with a gap: one JSON line on stderr, and with
    ``--gap-fill zero`` as many zero bytes on stdout (byte offsets are kept)."""

    def on_gap(start: int, end: int) -> None:
        print(json.dumps({"event": "stream.gap", "start": start, "end": end}), file=stderr)
        stderr.flush()
        if fill_zero:
            for off in range(start, end, 65536):
                _write_all(stdout_fd, bytes(min(65536, end - off)))

    return on_gap


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


__all__ = [
    "NodeNotRunning",
    "StreamReset",
    "gap_reporter",
    "open_pipe",
    "request",
    "request_stream",
    "run_pipe",
]
