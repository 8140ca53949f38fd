"""The stop flag every worker loop polls: set by SIGTERM (the supervisor) or SIGINT."""

from __future__ import annotations

import select
import signal
import socket


class StopFlag:
    """Installs SIGTERM/SIGINT handlers that only set a flag, so the worker finishes
    its current batch and leaves its loop cleanly (rings and sockets in order)."""

    def __init__(self) -> None:
        self.stop = False
        self._wake: socket.socket | None = None
        self._wake_in: socket.socket | None = None
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, _sig: int, _frame: object) -> None:
        self.stop = True

    def __bool__(self) -> bool:
        return self.stop

    def sleep(self, timeout: float) -> None:
        """Sleep until any signal is handled (this flag set, SIGHUP, ...) or ``timeout``
        passes: a loop with nothing else to wait for wakes for signals only."""
        if self._wake is None:
            self._wake, wake_in = socket.socketpair()
            for s in (self._wake, wake_in):
                s.setblocking(False)
            self._wake_in = wake_in  # kept open: the handler writes to it
            signal.set_wakeup_fd(wake_in.fileno(), warn_on_full_buffer=False)
        if self.stop:
            return
        if select.select([self._wake], [], [], timeout)[0]:
            try:
                self._wake.recv(4096)
            except BlockingIOError:
                pass


__all__ = ["StopFlag"]
