"""The DNS responder's socket: UDP datagrams in, meshpipe.meshdns answers out.

Runs inside the control worker's selector loop (the claimants come from its NodeStack).
A readable socket is drained up to ``BATCH`` datagrams per wake-up so a flood of queries
cannot starve the node's other work. Counters (besides meshdns's): ``dns.send_errors``.
"""

from __future__ import annotations

import selectors
import socket
from collections import Counter
from collections.abc import Callable, Sequence

from meshpipe.meshdns import MAX_QUERY, MeshDns
from meshpipe.names import Claimant

BATCH = 64


class DnsServer:
    def __init__(
        self,
        listen: tuple[str, int],
        sel: selectors.BaseSelector,
        claimants: Callable[[], Sequence[Claimant]],
    ) -> None:
        host, port = listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.sel = sel
        self.claimants = claimants
        self.zone = MeshDns()
        self.errors: Counter[str] = Counter()
        sel.register(self.sock, selectors.EVENT_READ, self._on_readable)

    @property
    def counters(self) -> Counter[str]:
        merged = Counter(self.zone.counters)
        merged.update(self.errors)
        return merged

    def _on_readable(self) -> None:
        known: Sequence[Claimant] | None = None
        for _ in range(BATCH):
            try:
                data, addr = self.sock.recvfrom(MAX_QUERY + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.errors["dns.recv_errors"] += 1
                return
            if known is None:
                known = self.claimants()  # once per batch
            answer = self.zone.respond(data, known)
            if answer is None:
                continue
            try:
                self.sock.sendto(answer, addr)
            except OSError:
                self.errors["dns.send_errors"] += 1

    def close(self) -> None:
        try:
            self.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


__all__ = ["DnsServer"]
