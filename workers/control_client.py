"""The CLI's side of the control socket: one JSON request, one JSON reply."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
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
