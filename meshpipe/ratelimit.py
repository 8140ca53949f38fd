"""Rate limits for the sans-IO core: a token bucket, and a limiter for log events.

Both take ``now`` from the caller (no clock here). A flood must show in the logs
without becoming a flood of log lines: :class:`LogLimiter` lets one event per key
through per interval and reports how many it held back in between (``suppressed``).
"""

from __future__ import annotations

import collections
from typing import Any

from meshpipe.actions import Event


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class LogLimiter:
    """At most one :class:`Event` per key every ``interval`` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._held: collections.Counter[str] = collections.Counter()

    def event(self, key: str, name: str, now: float, fields: dict[str, Any]) -> Event | None:
        """The event to log now, or None (then it is counted in the next one's
        ``suppressed``)."""
        due = self._next.get(key)
        if due is not None and now < due:
            self._held[key] += 1
            return None
        if len(self._next) >= 256:  # keys are a fixed set of reasons; stay bounded anyway
            self._next.clear()
        self._next[key] = now + self.interval
        return Event(name, {**fields, "suppressed": self._held.pop(key, 0)})


__all__ = ["LogLimiter", "TokenBucket"]
