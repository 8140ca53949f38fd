"""Access lists: which authenticated SIDs may use a service or the proxy.

An entry is a whole SID (64 hex characters). Prefixes are refused on purpose: a
prefix that is unambiguous today can match a key someone grinds tomorrow. The
explicit word ``"any"`` opens a service to every node; no list at all means
closed. Decisions take the SID the session authenticated, never a claimed one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshpipe.actions import Event
from meshpipe.errors import MeshpipeError, SidError
from meshpipe.identity import MIN_PREFIX, SID_LEN, Sid

ANY = "any"
_HEX = frozenset("0123456789abcdef")


class AclError(MeshpipeError, ValueError):
    """An access-list entry is not a whole SID (or the word "any")."""


def parse_entry(text: object) -> Sid:
    """One access-list entry: a full SID in text form, with a clear error otherwise."""
    if not isinstance(text, str):
        raise AclError(f"access-list entry must be a SID string, got {type(text).__name__}")
    t = text.strip().lower()
    if t == ANY:
        raise AclError('"any" cannot be mixed with SIDs: write allow = "any" on its own')
    if set(t) <= _HEX and MIN_PREFIX <= len(t) < 2 * SID_LEN:
        raise AclError(
            f"{text!r} is a SID prefix; access lists take only whole SIDs "
            f"({2 * SID_LEN} hex characters)"
        )
    try:
        return Sid.parse(t)
    except SidError as exc:
        raise AclError(str(exc)) from None


@dataclass(frozen=True)
class Acl:
    """An allow list. ``Acl()`` is closed; ``Acl.any()`` is open to every node."""

    sids: frozenset[bytes] = frozenset()
    open_to_all: bool = False

    @classmethod
    def any(cls) -> Acl:
        return cls(frozenset(), True)

    @classmethod
    def of(cls, sids: Iterable[bytes]) -> Acl:
        out: set[bytes] = set()
        for s in sids:
            out.add(bytes(Sid(bytes(s))))  # Sid() refuses anything but 32 bytes
        return cls(frozenset(out), False)

    @classmethod
    def parse(cls, value: object) -> Acl:
        """From config or command-line form: None (closed), "any", or a list of SIDs."""
        if value is None:
            return cls()
        if isinstance(value, str):
            if value.strip().lower() == ANY:
                return cls.any()
            return cls.of([parse_entry(value)])
        if isinstance(value, list | tuple):
            return cls.of(parse_entry(v) for v in value)
        raise AclError(f'access list must be "any" or a list of SIDs, got {type(value).__name__}')

    def allows(self, sid: bytes) -> bool:
        """True if the session's authenticated ``sid`` may use the service."""
        if not isinstance(sid, bytes) or len(sid) != SID_LEN:
            return False
        return self.open_to_all or bytes(sid) in self.sids

    def check(self, sid: bytes, service: str) -> Event | None:
        """None when allowed; otherwise the ``acl.denied`` event the shell should log."""
        if self.allows(sid):
            return None
        shown = bytes(sid).hex() if isinstance(sid, bytes) else repr(sid)
        return Event("acl.denied", {"sid": shown, "service": service})

    def as_config(self) -> str | list[str]:
        """The inverse of :meth:`parse` (sorted, so it is stable)."""
        if self.open_to_all:
            return ANY
        return sorted(s.hex() for s in self.sids)


__all__ = ["ANY", "Acl", "AclError", "parse_entry"]
