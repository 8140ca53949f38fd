"""meshpipe.services.socks5 (RFC 1928 server side) and proxy_wire: codecs, replies, fuzz."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshpipe.services import proxy_wire
from meshpipe.services.socks5 import (
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    CMD_BIND,
    CMD_UDP_ASSOCIATE,
    METHOD_NO_AUTH,
    REP_ADDRESS_TYPE_NOT_SUPPORTED,
    REP_COMMAND_NOT_SUPPORTED,
    REP_CONNECTION_REFUSED,
    REP_GENERAL_FAILURE,
    REP_NOT_ALLOWED,
    REP_SUCCEEDED,
    REPLY_CODES,
    Close,
    Connect,
    ConnectRequest,
    Data,
    Send,
    Socks5Error,
    Socks5Event,
    Socks5Server,
    State,
    decode_reply,
    encode_greeting,
    encode_reply,
    encode_request,
)

hosts = st.one_of(
    st.ip_addresses().map(str),
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,60}", fullmatch=True),
)
ports = st.integers(1, 65535)


def feed_all(srv: Socks5Server, data: bytes, cuts: list[int] | None = None) -> list[Socks5Event]:
    """Feed ``data`` in pieces cut at ``cuts`` (every byte by default)."""
    points = sorted({c for c in (cuts if cuts is not None else range(len(data))) if c <= len(data)})
    out: list[Socks5Event] = []
    prev = 0
    for c in [*points, len(data)]:
        out += srv.feed(data[prev:c])
        prev = c
    return out


def test_connect_ipv4_happy_path() -> None:
    srv = Socks5Server()
    assert srv.feed(encode_greeting()) == [Send(bytes((5, METHOD_NO_AUTH)))]
    ev = srv.feed(encode_request("198.18.0.9", 80) + b"early")
    assert ev == [Connect(ConnectRequest("198.18.0.9", 80, ATYP_IPV4))]
    out = srv.reply(REP_SUCCEEDED, "198.18.0.4", 40000)
    assert out[0] == Send(bytes((5, 0, 0, 1, 198, 18, 0, 4)) + (40000).to_bytes(2, "big"))
    assert out[1] == Data(b"early")  # bytes sent before the reply are kept
    assert srv.state is State.STREAM
    assert srv.feed(b"more") == [Data(b"more")]


def test_connect_ipv6_and_domain() -> None:
    srv = Socks5Server()
    ev = srv.feed(encode_greeting(b"\x02\x00") + encode_request("fd00::1", 443))
    assert ev[1] == Connect(ConnectRequest("fd00::1", 443, ATYP_IPV6))
    assert ev[1].request.ip is not None
    srv = Socks5Server()
    ev = srv.feed(encode_greeting() + encode_request("web.example", 8080))
    req = ev[1]
    assert isinstance(req, Connect) and req.request == ConnectRequest(
        "web.example", 8080, ATYP_DOMAIN
    )
    assert req.request.ip is None


def test_refusal_reply_closes() -> None:
    srv = Socks5Server()
    srv.feed(encode_greeting() + encode_request("198.18.0.9", 25))
    out = srv.reply(REP_NOT_ALLOWED)
    assert out == [Send(encode_reply(REP_NOT_ALLOWED)), Close("reply 2")]
    assert srv.state is State.CLOSED and srv.feed(b"x") == []
    with pytest.raises(Socks5Error):
        srv.reply(REP_SUCCEEDED)


@pytest.mark.parametrize("cmd", [CMD_BIND, CMD_UDP_ASSOCIATE, 9])
def test_other_commands_not_supported(cmd: int) -> None:
    srv = Socks5Server()
    ev = srv.feed(encode_greeting() + encode_request("198.18.0.9", 80, cmd))
    assert ev[1] == Send(encode_reply(REP_COMMAND_NOT_SUPPORTED))
    assert isinstance(ev[2], Close) and srv.state is State.CLOSED


@pytest.mark.parametrize(
    ("data", "first_reply", "expect"),
    [
        (b"\x04\x01\x00\x50", None, None),  # SOCKS4: not ours, close silently
        (b"\x05\x00", bytes((5, 0xFF)), None),  # no methods
        (b"\x05\x01\x02", bytes((5, 0xFF)), None),  # only username/password
        (encode_greeting() + b"\x05\x01\x00\x07" + bytes(6), None, REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (encode_greeting() + b"\x05\x01\x01\x01" + bytes(6), None, REP_GENERAL_FAILURE),  # RSV
        (encode_greeting() + b"\x04\x01\x00\x01" + bytes(6), None, REP_GENERAL_FAILURE),  # VER
        (encode_greeting() + b"\x05\x01\x00\x03\x00\x00\x50", None, REP_GENERAL_FAILURE),
        (encode_greeting() + b"\x05\x01\x00\x03\x02a\x00\x00\x50", None, REP_GENERAL_FAILURE),
        (
            encode_greeting() + b"\x05\x01\x00\x01\x01\x02\x03\x04\x00\x00",
            None,
            REP_GENERAL_FAILURE,
        ),
    ],
)
def test_malformed_input_maps_to_reply_or_close(
    data: bytes, first_reply: bytes | None, expect: int | None
) -> None:
    srv = Socks5Server()
    ev = srv.feed(data)
    assert isinstance(ev[-1], Close) and srv.state is State.CLOSED and srv.error is not None
    sends = [e.data for e in ev if isinstance(e, Send)]
    if first_reply is not None:
        assert sends == [first_reply]
    if expect is not None:
        assert sends[-1] == encode_reply(expect)
    if first_reply is None and expect is None:
        assert sends == []


def test_incomplete_input_waits() -> None:
    srv = Socks5Server()
    assert srv.feed(b"\x05") == []
    assert srv.feed(b"\x01") == []
    assert srv.feed(b"\x00") == [Send(b"\x05\x00")]
    assert srv.feed(b"\x05\x01\x00\x03\x05ab") == []
    assert srv.feed(b"cde\x00") == []
    assert srv.feed(b"\x16") == [Connect(ConnectRequest("abcde", 22, ATYP_DOMAIN))]


@given(hosts, ports, st.data())
def test_request_round_trip_in_any_pieces(host: str, port: int, data: st.DataObject) -> None:
    wire = encode_greeting(bytes((2, 0))) + encode_request(host, port)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    ev = feed_all(Socks5Server(), wire, cuts)
    assert ev[0] == Send(b"\x05\x00")
    assert isinstance(ev[1], Connect)
    got = ev[1].request
    assert (got.host, got.port) == (str(got.ip) if got.ip else host, port)
    if got.ip is None:
        assert got.host == host


@given(st.sampled_from(list(REPLY_CODES)), st.ip_addresses().map(str), st.integers(0, 65535))
def test_reply_round_trip(code: int, host: str, port: int) -> None:
    raw = encode_reply(code, host, port)
    got = decode_reply(raw + b"tail")
    assert got is not None
    reply, used = got
    assert used == len(raw) and (reply.code, reply.port) == (code, port)
    assert decode_reply(raw[:-1]) is None


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_fuzz_never_raises(data: bytes, cuts: list[int]) -> None:
    srv = Socks5Server()
    ev = feed_all(srv, data, cuts)
    closes = [e for e in ev if isinstance(e, Close)]
    assert len(closes) <= 1
    if closes:
        assert ev[-1] == closes[0] and srv.state is State.CLOSED
    for e in ev:
        if isinstance(e, Send):
            assert e.data[0] == 5


@given(st.binary(max_size=120))
def test_fuzz_after_greeting(data: bytes) -> None:
    srv = Socks5Server()
    srv.feed(encode_greeting())
    ev = srv.feed(data)
    for e in ev:
        if isinstance(e, Send):
            assert decode_reply(e.data) is not None  # every reply is well formed
        if isinstance(e, Connect):
            assert 1 <= e.request.port <= 65535


def test_encoders_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        encode_reply(9)
    with pytest.raises(ValueError):
        encode_request("x" * 256, 80)


# -- proxy_wire ----------------------------------------------------------------------------


@given(hosts, ports, st.binary(max_size=20))
def test_proxy_request_round_trip(host: str, port: int, tail: bytes) -> None:
    raw = proxy_wire.encode_request(host, port)
    got = proxy_wire.decode_request(raw + tail)
    assert got is not None
    req, used = got
    assert used == len(raw) and req.port == port
    assert req.host == proxy_wire.check_host(host)
    for cut in range(len(raw)):
        assert proxy_wire.decode_request(raw[:cut]) is None


@given(st.sampled_from(list(REPLY_CODES)))
def test_proxy_response_round_trip(code: int) -> None:
    raw = proxy_wire.encode_response(code)
    assert proxy_wire.decode_response(raw) == (proxy_wire.ProxyResponse(code), len(raw))


@pytest.mark.parametrize(
    "body",
    [
        [1, "h", 0],
        [1, "h", 70000],
        [2, "h", 80],
        [1, "", 80],
        [1, "a b", 80],
        [1, b"h", 80],
        [1, "h"],
        "x",
        [1, "x" * 256, 80],
    ],
    ids=repr,
)
def test_proxy_request_strict(body: object) -> None:
    from meshpipe import wire

    packed = wire.pack_body(body)
    with pytest.raises(proxy_wire.ProxyWireError):
        proxy_wire.decode_request(len(packed).to_bytes(2, "big") + packed)


def test_proxy_response_strict() -> None:
    from meshpipe import wire

    for body in ([1, 9], [1, -1], [0, 0], [1, 0, 0]):
        packed = wire.pack_body(body)
        with pytest.raises(proxy_wire.ProxyWireError):
            proxy_wire.decode_response(len(packed).to_bytes(2, "big") + packed)
    with pytest.raises(proxy_wire.ProxyWireError):
        proxy_wire.decode_response(b"\x00\x00")
    with pytest.raises(proxy_wire.ProxyWireError):
        proxy_wire.decode_response(b"\xff\xff" + bytes(10))
    with pytest.raises(proxy_wire.ProxyWireError):
        proxy_wire.encode_response(REP_CONNECTION_REFUSED + 10)


@given(st.binary(max_size=400))
def test_proxy_fuzz_only_typed_errors(data: bytes) -> None:
    for fn in (proxy_wire.decode_request, proxy_wire.decode_response):
        try:
            fn(data)
        except proxy_wire.ProxyWireError:
            pass
