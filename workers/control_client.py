"""The CLI's side of the control socket: one JSON request, one JSON reply."""

from __future__ import annotations

import json
import socket
from typing import Any

from meshpipe.errors import MeshpipeError


class NodeNotRunning(MeshpipeError):
    """Nothing answers on the control socket."""


def request(path: str, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NodeNotRunning(
                f"meshpipe node is not running (no answer on control socket {path})"
            ) from exc
        except PermissionError as exc:
            raise MeshpipeError(f"no permission to use control socket {path}") from exc
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError as exc:
        raise MeshpipeError(f"node did not answer within {timeout:.0f} s on {path}") from exc
    finally:
        s.close()
    try:
        reply = json.loads(buf)
    except ValueError as exc:
        raise MeshpipeError("node sent a malformed reply") from exc
    if not reply.get("ok"):
        raise MeshpipeError(str(reply.get("error", "request failed")))
    return reply["result"]
