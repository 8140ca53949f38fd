"""`meshpipe trace` in the control worker: running traces and their connections.

The request is answered with one line once the trace is over (at most a few seconds:
rounds x interval + the reply timeout): ``{"ok": true, "result": {"sid", "hops"}}``,
``hops`` in path order as :meth:`meshpipe.trace.TraceHop.as_json` gives them, the
destination last.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meshpipe.errors import MeshpipeError
from meshpipe.identity import resolve_sid
from meshpipe.stack import NodeStack

MAX_ROUNDS = 20


class TraceError(MeshpipeError):
    """A trace request cannot be carried out (bad target, no route, too many traces)."""


@dataclass
class _Job:
    tid: int
    conn: socket.socket
    dst: bytes


class TraceJobs:
    def __init__(
        self,
        core: NodeStack,
        write_line: Callable[[socket.socket, Any], bool],
        known_sids: Callable[[], set[bytes]],
    ) -> None:
        self.core = core
        self.write_line = write_line
        self.known_sids = known_sids
        self.jobs: list[_Job] = []

    def target(self, text: str) -> bytes:
        """A SID, a unique SID prefix, a name some node claims in its node record (the
        nearest claimant by routing metric, as the DNS responder answers), or a name a
        verified trace reply has told us."""
        if not _looks_like_sid(text):
            own = bytes(self.core.sid)
            claimed = [
                c
                for c in self.core.node_claimants()
                if c.name == text and c.metric is not None and c.sid != own
            ]
            if claimed:
                return min(claimed, key=lambda c: (c.metric, c.sid)).sid
        names = self.core.trace.names
        matches = {sid for sid, name in names.items() if name == text}
        if len(matches) == 1 and not _looks_like_sid(text):
            return matches.pop()
        try:
            return bytes(resolve_sid(text, self.known_sids()))
        except MeshpipeError:
            if len(matches) > 1:
                raise TraceError(f"trace: the name {text!r} is claimed by several nodes") from None
            raise

    def request(self, req: dict[str, Any]) -> Callable[[socket.socket], None]:
        dst = self.target(str(req.get("sid", "")))
        rounds = req.get("rounds", 3)
        if not isinstance(rounds, int) or not 1 <= rounds <= MAX_ROUNDS:
            raise TraceError(f"trace: rounds must be 1-{MAX_ROUNDS}")
        if dst == bytes(self.core.sid):
            raise TraceError("trace: that is this node's own SID")
        if self.core.next_hop(dst) is None:
            raise TraceError(f"trace: no route to {dst.hex()[:16]}")
        try:
            tid = self.core.trace_start(dst, time.monotonic(), rounds=rounds)
        except ValueError as exc:
            raise TraceError(f"trace: {exc}") from None

        def start(conn: socket.socket) -> None:
            self.jobs.append(_Job(tid, conn, dst))

        return start

    def poll(self) -> None:
        """Answer the finished traces."""
        for job in list(self.jobs):
            hops = self.core.trace_result(job.tid)
            if hops is None:
                continue
            self.jobs.remove(job)
            result = {"sid": job.dst.hex(), "hops": [h.as_json() for h in hops]}
            self.write_line(job.conn, {"ok": True, "result": result})
            job.conn.close()


def _looks_like_sid(text: str) -> bool:
    return len(text) >= 8 and all(c in "0123456789abcdefABCDEF" for c in text)


__all__ = ["TraceError", "TraceJobs"]
