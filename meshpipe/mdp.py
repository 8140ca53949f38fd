"""MDP: end-to-end datagrams addressed (SID, port), carried inside a session.

Session plaintext layout (the first byte selects the protocol; MSP will be 2)::

    proto u8 = 1 | src_port u16 | dst_port u16 | payload

A datagram travels in one DATA frame. Its largest payload on a path is the path MTU
minus the exact overhead: DATA header 66 + session transport header 13 + AEAD tag
16 + MDP header 5 = 100 bytes.

Datagrams to a port nobody bound are dropped and counted (``mdp.drop.unbound_port``);
nothing is sent back. Port 7 is the built-in echo service (``meshpipe ping``): a
datagram to it comes back to the sender's source port with the same payload. The
echo never answers a datagram from port 7 or port 0, so two echo services cannot
bounce a datagram between them forever.

Counters: ``mdp.tx``, ``mdp.rx``, ``mdp.drop.unbound_port``, ``mdp.drop.malformed``,
``mdp.drop.echo_loop``, ``mdp.echo.answered``.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass

from meshpipe.errors import MeshpipeError
from meshpipe.noise import TAGLEN
from meshpipe.session import MAX_PLAINTEXT, TRANSPORT_HEADER_LEN, max_plaintext
from meshpipe.wire import DATA_HEADER_LEN

PROTO_MDP = 1

MDP_HEADER = struct.Struct("!BHH")
MDP_HEADER_LEN = MDP_HEADER.size  # 5
# Everything a datagram's payload pays on the wire: 66 + 13 + 16 + 5 = 100.
MDP_OVERHEAD = DATA_HEADER_LEN + TRANSPORT_HEADER_LEN + TAGLEN + MDP_HEADER_LEN
MAX_PAYLOAD = MAX_PLAINTEXT - MDP_HEADER_LEN
ECHO_PORT = 7
MAX_PORT = 65535


class MdpError(MeshpipeError, ValueError):
    """A port out of range or already bound, or a datagram that cannot be sent."""


class DatagramTooLarge(MdpError):
    """The datagram does not fit in one DATA frame over the path MTU."""

    def __init__(self, size: int, limit: int, path_mtu: int) -> None:
        self.size = size
        self.limit = limit
        self.path_mtu = path_mtu
        super().__init__(
            f"datagram payload of {size} bytes exceeds {limit} bytes "
            f"(path MTU {path_mtu} minus {MDP_OVERHEAD} bytes of headers)"
        )


@dataclass(frozen=True, slots=True)
class MdpDatagram:
    """A datagram for a bound port on this node."""

    src: bytes
    src_port: int
    dst_port: int
    payload: bytes
    hops: int


@dataclass(frozen=True, slots=True)
class MdpSend:
    """Session plaintext to send to ``dst`` (SessionManager.send)."""

    dst: bytes
    plaintext: bytes


MdpOut = MdpDatagram | MdpSend


def max_payload(path_mtu: int) -> int:
    """Largest datagram payload that fits one DATA frame over ``path_mtu`` bytes."""
    return max(0, max_plaintext(path_mtu) - MDP_HEADER_LEN)


def encode(src_port: int, dst_port: int, payload: bytes) -> bytes:
    return MDP_HEADER.pack(PROTO_MDP, src_port, dst_port) + payload


def _check_port(port: int, what: str, lo: int = 1) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not lo <= port <= MAX_PORT:
        raise MdpError(f"{what} {port!r} is not a port ({lo}..{MAX_PORT})")
    return port


class Mdp:
    """Port table and codec of one node. Sans-IO: returns what to send and deliver."""

    def __init__(self, *, echo: bool = True) -> None:
        self.counters: collections.Counter[str] = collections.Counter()
        self._bound: set[int] = set()
        self.echo = echo

    # -- ports -------------------------------------------------------------------------

    def bind(self, port: int) -> None:
        _check_port(port, "port")
        if port in self._bound or (self.echo and port == ECHO_PORT):
            raise MdpError(f"port {port} is already bound")
        self._bound.add(port)

    def unbind(self, port: int) -> None:
        self._bound.discard(port)

    def is_bound(self, port: int) -> bool:
        return port in self._bound

    @property
    def ports(self) -> list[int]:
        return sorted(self._bound)

    # -- datagrams ---------------------------------------------------------------------

    def send(
        self,
        dst: bytes,
        src_port: int,
        dst_port: int,
        payload: bytes,
        now: float,
        path_mtu: int,
    ) -> list[MdpOut]:
        """Build a datagram for the session layer; DatagramTooLarge if it cannot fit."""
        _check_port(src_port, "source port", lo=0)
        _check_port(dst_port, "destination port")
        payload = bytes(payload)
        limit = max_payload(path_mtu)
        if len(payload) > limit:
            raise DatagramTooLarge(len(payload), limit, path_mtu)
        self.counters["mdp.tx"] += 1
        return [MdpSend(bytes(dst), encode(src_port, dst_port, payload))]

    def on_plaintext(self, src: bytes, plaintext: bytes, hops: int, now: float) -> list[MdpOut]:
        """An authenticated session plaintext whose proto byte is PROTO_MDP."""
        if len(plaintext) < MDP_HEADER_LEN or plaintext[0] != PROTO_MDP:
            self.counters["mdp.drop.malformed"] += 1
            return []
        _, src_port, dst_port = MDP_HEADER.unpack_from(plaintext)
        payload = plaintext[MDP_HEADER_LEN:]
        if self.echo and dst_port == ECHO_PORT:
            if src_port in (0, ECHO_PORT):
                self.counters["mdp.drop.echo_loop"] += 1
                return []
            self.counters["mdp.echo.answered"] += 1
            self.counters["mdp.tx"] += 1
            return [MdpSend(bytes(src), encode(ECHO_PORT, src_port, payload))]
        if dst_port not in self._bound:
            self.counters["mdp.drop.unbound_port"] += 1
            return []
        self.counters["mdp.rx"] += 1
        return [MdpDatagram(bytes(src), src_port, dst_port, payload, hops)]


__all__ = [
    "ECHO_PORT",
    "MAX_PAYLOAD",
    "MDP_HEADER_LEN",
    "MDP_OVERHEAD",
    "PROTO_MDP",
    "DatagramTooLarge",
    "Mdp",
    "MdpDatagram",
    "MdpError",
    "MdpOut",
    "MdpSend",
    "encode",
    "max_payload",
]
