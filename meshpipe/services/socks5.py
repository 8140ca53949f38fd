"""SOCKS5 (RFC 1928), server side, sans-IO: feed bytes in, get events out.

Only what an exit needs: method negotiation with "no authentication" (the session's
SID is the credential), then one CONNECT request with an IPv4, IPv6 or domain-name
address. BIND and UDP ASSOCIATE are answered with "command not supported".

Every malformed input becomes a :class:`Socks5Error` inside the parser, which is
turned into the reply the RFC asks for (or a plain close when the peer does not
speak SOCKS5 at all): the caller only ever sees :class:`Send` / :class:`Connect` /
:class:`Close` / :class:`Data` events, never an exception.

Greeting   ``VER=5 | NMETHODS | METHODS...``     reply ``VER | METHOD``
Request    ``VER=5 | CMD | RSV=0 | ATYP | DST.ADDR | DST.PORT``
Reply      ``VER=5 | REP | RSV=0 | ATYP | BND.ADDR | BND.PORT``
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from meshpipe.errors import MeshpipeError

VERSION = 5
METHOD_NO_AUTH = 0x00
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT = 1
CMD_BIND = 2
CMD_UDP_ASSOCIATE = 3

ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

# Reply codes (RFC 1928 section 6).
REP_SUCCEEDED = 0
REP_GENERAL_FAILURE = 1
REP_NOT_ALLOWED = 2  # connection not allowed by ruleset
REP_NETWORK_UNREACHABLE = 3
REP_HOST_UNREACHABLE = 4
REP_CONNECTION_REFUSED = 5
REP_TTL_EXPIRED = 6
REP_COMMAND_NOT_SUPPORTED = 7
REP_ADDRESS_TYPE_NOT_SUPPORTED = 8
REPLY_CODES = range(0, 9)

MAX_DOMAIN = 255
_PORT = struct.Struct("!H")
# Printable ASCII without space: what a resolver could look up (IDNA is already ASCII).
_DOMAIN_BYTES = frozenset(range(0x21, 0x7F))


class Socks5Error(MeshpipeError, ValueError):
    """Malformed SOCKS5 input. ``reply`` is the code to answer with, None: just close."""

    def __init__(self, reason: str, reply: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A parsed CONNECT. ``host`` is an IP address in canonical text form or a domain."""

    host: str
    port: int
    atyp: int

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        return None if self.atyp == ATYP_DOMAIN else ipaddress.ip_address(self.host)


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Connect:
    """The client asked to connect; answer with :meth:`Socks5Server.reply`."""

    request: ConnectRequest


@dataclass(frozen=True, slots=True)
class Close:
    """Close the client connection (after writing any Send before it)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Data:
    """Stream payload after a successful reply (or buffered before it)."""

    data: bytes


Socks5Event = Send | Connect | Close | Data


class State(enum.Enum):
    GREETING = "greeting"
    REQUEST = "request"
    WAIT_REPLY = "wait_reply"  # a Connect was emitted; the caller decides
    STREAM = "stream"
    CLOSED = "closed"


# -- encoders (the server's replies, and the client side for tests and tools) ---------------


def encode_address(host: str) -> bytes:
    """ATYP + address for ``host`` (IP text or a domain name)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("ascii")
        if not 1 <= len(raw) <= MAX_DOMAIN:
            raise ValueError(f"domain name must be 1..{MAX_DOMAIN} bytes") from None
        return bytes((ATYP_DOMAIN, len(raw))) + raw
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes((atyp,)) + ip.packed


def encode_reply(code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    if code not in REPLY_CODES:
        raise ValueError(f"not a SOCKS5 reply code: {code}")
    return bytes((VERSION, code, 0)) + encode_address(bind_host) + _PORT.pack(bind_port)


def encode_greeting(methods: bytes = bytes((METHOD_NO_AUTH,))) -> bytes:
    return bytes((VERSION, len(methods))) + methods


def encode_request(host: str, port: int, cmd: int = CMD_CONNECT) -> bytes:
    return bytes((VERSION, cmd, 0)) + encode_address(host) + _PORT.pack(port)


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    host: str
    port: int


def _parse_address(buf: bytes, off: int) -> tuple[str, int, int] | None:
    """(host, atyp, end offset) of ATYP + address at ``off``; None if incomplete."""
    if len(buf) <= off:
        return None
    atyp = buf[off]
    if atyp == ATYP_IPV4:
        end = off + 1 + 4
        if len(buf) < end:
            return None
        return str(ipaddress.IPv4Address(buf[off + 1 : end])), atyp, end
    if atyp == ATYP_IPV6:
        end = off + 1 + 16
        if len(buf) < end:
            return None
        return str(ipaddress.IPv6Address(buf[off + 1 : end])), atyp, end
    if atyp == ATYP_DOMAIN:
        if len(buf) < off + 2:
            return None
        n = buf[off + 1]
        end = off + 2 + n
        if len(buf) < end:
            return None
        raw = buf[off + 2 : end]
        if n == 0 or not set(raw) <= _DOMAIN_BYTES:
            raise Socks5Error("bad domain name", REP_GENERAL_FAILURE)
        return raw.decode("ascii"), atyp, end
    raise Socks5Error(f"address type {atyp} not supported", REP_ADDRESS_TYPE_NOT_SUPPORTED)


def decode_reply(buf: bytes) -> tuple[Reply, int] | None:
    """Client side: (reply, bytes used) or None if incomplete. Raises Socks5Error."""
    if len(buf) < 3:
        return None
    if buf[0] != VERSION or buf[2] != 0:
        raise Socks5Error("not a SOCKS5 reply", None)
    got = _parse_address(buf, 3)
    if got is None:
        return None
    host, _atyp, end = got
    if len(buf) < end + 2:
        return None
    (port,) = _PORT.unpack_from(buf, end)
    return Reply(buf[1], host, port), end + 2


# -- the server ------------------------------------------------------------------------------


class Socks5Server:
    """One client connection. ``feed`` returns events; answer a Connect with ``reply``."""

    def __init__(self) -> None:
        self.state = State.GREETING
        self._buf = b""
        self.request: ConnectRequest | None = None
        self.error: Socks5Error | None = None  # why the connection was closed, if it was

    def feed(self, data: bytes) -> list[Socks5Event]:
        if self.state is State.CLOSED or not data:
            return []
        if self.state is State.STREAM:
            return [Data(bytes(data))]
        self._buf += bytes(data)
        out: list[Socks5Event] = []
        try:
            self._advance(out)
        except Socks5Error as exc:
            self._fail(exc, out)
        return out

    def reply(self, code: int, bind_host: str = "0.0.0.0", bind_port: int = 0) -> list[Socks5Event]:
        """Answer the pending Connect. Success opens the stream (and releases any bytes
        the client sent early); any other code closes the connection."""
        if self.state is not State.WAIT_REPLY:
            raise Socks5Error(f"no request waiting for a reply (state {self.state.value})", None)
        out: list[Socks5Event] = [Send(encode_reply(code, bind_host, bind_port))]
        if code == REP_SUCCEEDED:
            self.state = State.STREAM
            if self._buf:
                out.append(Data(self._buf))
        else:
            self.state = State.CLOSED
            out.append(Close(f"reply {code}"))
        self._buf = b""
        return out

    def _fail(self, exc: Socks5Error, out: list[Socks5Event]) -> None:
        self.error = exc
        if exc.reply is not None:
            if self.state is State.GREETING:
                out.append(Send(bytes((VERSION, exc.reply))))
            else:
                out.append(Send(encode_reply(exc.reply)))
        out.append(Close(exc.reason))
        self.state = State.CLOSED
        self._buf = b""

    def _advance(self, out: list[Socks5Event]) -> None:
        if self.state is State.GREETING:
            buf = self._buf
            if len(buf) < 2:
                return
            if buf[0] != VERSION:
                raise Socks5Error(f"not SOCKS5 (version byte {buf[0]})", None)
            n = buf[1]
            if n == 0:
                raise Socks5Error("no authentication methods offered", METHOD_NONE_ACCEPTABLE)
            if len(buf) < 2 + n:
                return
            if METHOD_NO_AUTH not in buf[2 : 2 + n]:
                raise Socks5Error(
                    "client does not offer 'no authentication'", METHOD_NONE_ACCEPTABLE
                )
            self._buf = buf[2 + n :]
            out.append(Send(bytes((VERSION, METHOD_NO_AUTH))))
            self.state = State.REQUEST
        if self.state is State.REQUEST:
            buf = self._buf
            if len(buf) < 4:
                return
            if buf[0] != VERSION:
                raise Socks5Error(f"request version byte {buf[0]}", REP_GENERAL_FAILURE)
            cmd = buf[1]
            if cmd != CMD_CONNECT:
                raise Socks5Error(f"command {cmd} not supported", REP_COMMAND_NOT_SUPPORTED)
            if buf[2] != 0:
                raise Socks5Error("reserved byte is not zero", REP_GENERAL_FAILURE)
            got = _parse_address(buf, 3)
            if got is None:
                return
            host, atyp, end = got
            if len(buf) < end + 2:
                return
            (port,) = _PORT.unpack_from(buf, end)
            if port == 0:
                raise Socks5Error("destination port 0", REP_GENERAL_FAILURE)
            self._buf = buf[end + 2 :]
            self.request = ConnectRequest(host, port, atyp)
            self.state = State.WAIT_REPLY
            out.append(Connect(self.request))


__all__ = [
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CMD_BIND",
    "CMD_CONNECT",
    "CMD_UDP_ASSOCIATE",
    "METHOD_NONE_ACCEPTABLE",
    "METHOD_NO_AUTH",
    "REPLY_CODES",
    "REP_ADDRESS_TYPE_NOT_SUPPORTED",
    "REP_COMMAND_NOT_SUPPORTED",
    "REP_CONNECTION_REFUSED",
    "REP_GENERAL_FAILURE",
    "REP_HOST_UNREACHABLE",
    "REP_NETWORK_UNREACHABLE",
    "REP_NOT_ALLOWED",
    "REP_SUCCEEDED",
    "REP_TTL_EXPIRED",
    "Close",
    "Connect",
    "ConnectRequest",
    "Data",
    "Reply",
    "Send",
    "Socks5Error",
    "Socks5Event",
    "Socks5Server",
    "State",
    "decode_reply",
    "encode_address",
    "encode_greeting",
    "encode_reply",
    "encode_request",
]
