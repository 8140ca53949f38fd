"""The flow table of a UDP service bridge: one flow per client address (sans-IO).

A UDP forward turns each client address that sends it a datagram into one MSP stream
(a flow), so the service's replies go back to the address that asked; the exposing
node keeps one target socket per stream for the same reason. Flows end after
``idle_timeout`` seconds without a datagram either way, and the table holds at most
``max_flows``: a new client beyond that evicts the least recently used flow (a flood
of source addresses costs old idle flows, never unbounded memory).

Entries are kept in least-recently-used order (a dict, moved to the end on use), so
expiry and eviction are O(1) per flow.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class Flow(Generic[V]):
    value: V
    last_used: float


class FlowTable(Generic[K, V]):
    def __init__(self, idle_timeout: float, max_flows: int) -> None:
        if idle_timeout <= 0 or max_flows < 1:
            raise ValueError("idle_timeout > 0 and max_flows >= 1")
        self.idle_timeout = idle_timeout
        self.max_flows = max_flows
        self._flows: dict[K, Flow[V]] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def get(self, key: K) -> V | None:
        flow = self._flows.get(key)
        return None if flow is None else flow.value

    def touch(self, key: K, now: float) -> None:
        """A datagram for this flow, either way: it is not idle."""
        flow = self._flows.pop(key, None)
        if flow is not None:
            flow.last_used = max(flow.last_used, now)
            self._flows[key] = flow

    def add(self, key: K, value: V, now: float) -> list[tuple[K, V]]:
        """A new flow (replacing one with the same key); returns the flows evicted."""
        old = self._flows.pop(key, None)
        evicted: list[tuple[K, V]] = [] if old is None else [(key, old.value)]
        while len(self._flows) >= self.max_flows:
            k = next(iter(self._flows))
            evicted.append((k, self._flows.pop(k).value))
        self._flows[key] = Flow(value, now)
        return evicted

    def remove(self, key: K) -> V | None:
        flow = self._flows.pop(key, None)
        return None if flow is None else flow.value

    def expire(self, now: float) -> list[tuple[K, V]]:
        """Remove and return the flows idle for ``idle_timeout`` or longer."""
        out: list[tuple[K, V]] = []
        while self._flows:
            k = next(iter(self._flows))
            flow = self._flows[k]
            if now - flow.last_used < self.idle_timeout:
                break
            del self._flows[k]
            out.append((k, flow.value))
        return out

    def next_deadline(self) -> float:
        if not self._flows:
            return math.inf
        return next(iter(self._flows.values())).last_used + self.idle_timeout

    def items(self) -> list[tuple[K, V]]:
        return [(k, f.value) for k, f in self._flows.items()]


__all__ = ["Flow", "FlowTable"]
