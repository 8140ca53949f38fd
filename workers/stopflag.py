"""The stop flag every worker loop polls: set by SIGTERM (the supervisor) or SIGINT."""

from __future__ import annotations

import signal


class StopFlag:
    """Installs SIGTERM/SIGINT handlers that only set a flag, so the worker finishes
    its current batch and leaves its loop cleanly (rings and sockets in order)."""

    def __init__(self) -> None:
        self.stop = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, _sig: int, _frame: object) -> None:
        self.stop = True

    def __bool__(self) -> bool:
        return self.stop


__all__ = ["StopFlag"]
