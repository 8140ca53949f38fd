"""A service this node offers (``expose`` / ``[[service]]``), TCP or UDP alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshpipe.config import format_hostport
from meshpipe.services.acl import Acl


@dataclass
class Exposed:
    name: str
    to: tuple[str, int]
    port: int
    acl: Acl
    hidden: bool
    kind: str = "tcp"  # the discovery record's kind: "tcp" or "udp"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "to": format_hostport(self.to),
            "port": self.port,
            "allow": self.acl.as_config(),
            "hidden": self.hidden,
            "protocol": self.kind,
        }


__all__ = ["Exposed"]
