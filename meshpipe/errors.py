"""Typed errors. Every codec and loader raises one of these, never a bare crash."""

from __future__ import annotations


class MeshpipeError(Exception):
    """Base of every error meshpipe raises on purpose."""


class SidError(MeshpipeError, ValueError):
    """A node address (SID) in text form is malformed, unknown or ambiguous."""


class KeyFileError(MeshpipeError):
    """A key file is missing, unsafe (readable by others), truncated or corrupt."""


class ConfigError(MeshpipeError):
    """A configuration file is unreadable or has an unknown key or a bad value."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {reason}")


class FrameError(MeshpipeError, ValueError):
    """A frame from the wire is malformed. Callers drop it and count the drop."""


class RecordError(MeshpipeError, ValueError):
    """A record on a ring between worker processes is malformed. The receiving
    worker drops it and counts the drop (``drop.bad_record``)."""
