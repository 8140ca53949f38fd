"""The first bytes of a proxied MSP stream: the client node tells the exit where to go.

Both messages are framed as a 2-byte big-endian length and a msgpack body, so the
exit can tell where the request ends and the relayed stream begins::

    request  = [version 1, host: str, port: u16]       client node -> exit
    response = [version 1, status: u8]                 exit -> client node

``host`` is an IP address in text form or a domain name (resolved at the exit);
``status`` is a SOCKS5 reply code (0 = connected), which the client node passes
on to its local SOCKS client unchanged.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from meshpipe import wire
from meshpipe.errors import FrameError
from meshpipe.services.socks5 import MAX_DOMAIN, REPLY_CODES

VERSION = 1
MAX_MESSAGE = 300  # a 255-byte domain plus msgpack overhead
_LEN = struct.Struct("!H")


class ProxyWireError(FrameError):
    """A proxy request or response is malformed: the stream is reset."""


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class ProxyResponse:
    status: int  # a SOCKS5 reply code


def _frame(body: Any) -> bytes:
    packed = wire.pack_body(body)
    if len(packed) > MAX_MESSAGE:
        raise ProxyWireError(f"message too long ({len(packed)} > {MAX_MESSAGE} bytes)")
    return _LEN.pack(len(packed)) + packed


def _unframe(buf: bytes) -> tuple[Any, int] | None:
    if len(buf) < _LEN.size:
        return None
    (n,) = _LEN.unpack_from(buf)
    if n == 0 or n > MAX_MESSAGE:
        raise ProxyWireError(f"bad message length {n}")
    if len(buf) < _LEN.size + n:
        return None
    try:
        body = wire.unpack_body(bytes(buf[_LEN.size : _LEN.size + n]))
    except FrameError as exc:
        raise ProxyWireError(str(exc)) from None
    return body, _LEN.size + n


def check_host(host: object) -> str:
    """An IP address (any text form; returned canonical) or a plausible domain name."""
    if not isinstance(host, str) or not host:
        raise ProxyWireError("host: want a non-empty string")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > MAX_DOMAIN or not host.isascii() or not host.isprintable() or " " in host:
        raise ProxyWireError("host: not an IP address or an ASCII domain name")
    return host


def encode_request(host: str, port: int) -> bytes:
    return _frame([VERSION, check_host(host), wire_port(port)])


def wire_port(port: object) -> int:
    try:
        return wire.expect_int(port, 1, 65535, "port")
    except FrameError as exc:
        raise ProxyWireError(str(exc)) from None


def decode_request(buf: bytes) -> tuple[ProxyRequest, int] | None:
    """(request, bytes used) from the start of ``buf``; None until it is complete."""
    got = _unframe(buf)
    if got is None:
        return None
    body, used = got
    try:
        f = wire.expect_record(body, 3, "proxy request")
        wire.expect_int(f[0], VERSION, VERSION, "proxy request version")
    except FrameError as exc:
        raise ProxyWireError(str(exc)) from None
    return ProxyRequest(check_host(f[1]), wire_port(f[2])), used


def encode_response(status: int) -> bytes:
    if status not in REPLY_CODES:
        raise ProxyWireError(f"status {status} is not a SOCKS5 reply code")
    return _frame([VERSION, status])


def decode_response(buf: bytes) -> tuple[ProxyResponse, int] | None:
    got = _unframe(buf)
    if got is None:
        return None
    body, used = got
    try:
        f = wire.expect_record(body, 2, "proxy response")
        wire.expect_int(f[0], VERSION, VERSION, "proxy response version")
        status = wire.expect_int(f[1], REPLY_CODES.start, REPLY_CODES.stop - 1, "proxy status")
    except FrameError as exc:
        raise ProxyWireError(str(exc)) from None
    return ProxyResponse(status), used


__all__ = [
    "MAX_MESSAGE",
    "ProxyRequest",
    "ProxyResponse",
    "ProxyWireError",
    "check_host",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
]
