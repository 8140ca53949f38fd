"""TUN offloads: tunnel message framing, GSO segmentation and partial checksums."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpipe.offload import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    OFFLOAD_MARK,
    VNET_HDR_LEN,
    Offload,
    OffloadError,
    join_message,
    segment,
    split_message,
)
from meshpipe.tunnel import checksum, parse_header

TCP, UDP = 6, 17
FIN, SYN, PSH, ACK, ECE, CWR = 0x01, 0x02, 0x08, 0x10, 0x40, 0x80
# Addresses from the ranges the project may use (underlay / overlay), never routed here.
SRC4, DST4 = bytes((198, 18, 0, 1)), bytes((198, 19, 255, 254))
SRC6, DST6 = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd12" + "34" * 13 + "02")
# 12 bytes of options: NOP, NOP, timestamps (kind 8, length 10).
TS_OPTIONS = bytes((1, 1, 8, 10)) + bytes(range(8))

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


def ipv4(proto: int, body: bytes, ident: int = 0, src: bytes = SRC4, dst: bytes = DST4) -> bytes:
    """An IPv4 packet with DF set and a correct header checksum."""
    head = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident, 0x4000, 64, proto, 0, src, dst)
    )
    head[10:12] = checksum(bytes(head)).to_bytes(2, "big")
    return bytes(head) + body


def ipv6(proto: int, body: bytes, src: bytes = SRC6, dst: bytes = DST6) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), proto, 64, src, dst) + body


def tcp_header(seq: int, flags: int, options: bytes = b"") -> bytes:
    """A TCP header with a zero checksum field (the sender fills it in)."""
    data_off = (20 + len(options)) // 4
    return (
        struct.pack("!HHIIBBHHH", 40000, 443, seq, 12345, data_off << 4, flags, 65535, 0, 0)
        + options
    )


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!xBH", proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


def ones_sum(data: bytes) -> int:
    """The folded (not complemented) 16-bit ones' complement sum."""
    return ~checksum(data) & 0xFFFF


def partial(ip_packet: bytes, l4_start: int, csum_offset: int, proto: int) -> bytes:
    """What Linux hands over for CHECKSUM_PARTIAL: the field holds the pseudo-header sum."""
    hdr = parse_header(ip_packet)
    length = len(ip_packet) - l4_start
    seed = ones_sum(pseudo_header(hdr.src, hdr.dst, proto, length))
    at = l4_start + csum_offset
    return ip_packet[:at] + seed.to_bytes(2, "big") + ip_packet[at + 2 :]


# -- 1. framing ------------------------------------------------------------------------


nontrivial = st.builds(
    Offload,
    flags=st.sampled_from([0, F_NEEDS_CSUM, F_DATA_VALID, F_NEEDS_CSUM | F_DATA_VALID]),
    gso_type=st.sampled_from([GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_TCPV4 | GSO_ECN, 3]),
    hdr_len=u16,
    gso_size=u16,
    csum_start=u16,
    csum_offset=u16,
).filter(lambda off: not off.trivial)


@given(nontrivial, st.binary(max_size=200))
def test_join_split_round_trip(off: Offload, packet: bytes) -> None:
    message = join_message(off, packet)
    assert message[0] == OFFLOAD_MARK
    assert len(message) == 1 + VNET_HDR_LEN + len(packet)
    assert split_message(message) == (off, packet)


@pytest.mark.parametrize(
    "off", [None, Offload(0, GSO_NONE, 0, 0, 0, 0), Offload(F_DATA_VALID, GSO_ECN, 54, 0, 0, 0)]
)
def test_join_trivial_header_is_the_packet(off: Offload | None) -> None:
    packet = ipv4(TCP, tcp_header(1, ACK))
    assert join_message(off, packet) is packet


@pytest.mark.parametrize("packet", [ipv4(TCP, tcp_header(1, ACK)), ipv6(TCP, tcp_header(1, ACK))])
def test_split_plain_packet(packet: bytes) -> None:
    assert split_message(packet) == (None, packet)


@pytest.mark.parametrize("cut", range(1, 1 + VNET_HDR_LEN))
def test_split_truncated_header(cut: int) -> None:
    message = join_message(Offload(F_NEEDS_CSUM, GSO_TCPV4, 54, 1400, 34, 16), b"")
    with pytest.raises(OffloadError):
        split_message(message[:cut])


def test_parse_truncated_header() -> None:
    with pytest.raises(OffloadError):
        Offload.parse(bytes(VNET_HDR_LEN - 1))


# -- 2. segmentation -------------------------------------------------------------------


def check_segments(
    out: list[bytes], original: bytes, v4: bool, payload: bytes, gso_size: int, seq: int
) -> None:
    """Everything the kernel's own segmentation guarantees about ``out``."""
    orig_ip_len = 20 if v4 else 40
    flags = original[orig_ip_len + 13]
    ident = int.from_bytes(original[4:6], "big")
    expected_count = max(1, -(-len(payload) // gso_size))
    assert len(out) == expected_count
    got = b""
    offset = 0
    for i, pkt in enumerate(out):
        hdr = parse_header(pkt)
        assert hdr.version == (4 if v4 else 6)
        assert hdr.proto == TCP
        assert hdr.total_len == len(pkt)  # IPv4 total length / IPv6 payload length
        assert (hdr.src, hdr.dst) == ((SRC4, DST4) if v4 else (SRC6, DST6))
        if v4:
            assert checksum(pkt[: hdr.header_len]) == 0
            assert int.from_bytes(pkt[4:6], "big") == (ident + i) & 0xFFFF
            # Everything else in the IPv4 header is copied (DF, TTL, addresses).
            assert pkt[6:10] == original[6:10]
        seg = pkt[hdr.header_len :]
        pseudo = pseudo_header(hdr.src, hdr.dst, TCP, len(seg))
        assert checksum(pseudo + seg) == 0
        tcp_len = (seg[12] >> 4) * 4
        assert seg[:tcp_len][:4] == original[orig_ip_len : orig_ip_len + 4]  # ports
        assert seg[20:tcp_len] == original[orig_ip_len + 20 : orig_ip_len + tcp_len]  # options
        chunk = seg[tcp_len:]
        assert len(chunk) <= gso_size
        if i < len(out) - 1:
            assert len(chunk) == gso_size
        assert int.from_bytes(seg[4:8], "big") == (seq + offset) & 0xFFFFFFFF
        last, first = i == len(out) - 1, i == 0
        f = seg[13]
        assert bool(f & FIN) == (last and bool(flags & FIN))
        assert bool(f & PSH) == (last and bool(flags & PSH))
        assert bool(f & CWR) == (first and bool(flags & CWR))
        assert f & ~(FIN | PSH | CWR) == flags & ~(FIN | PSH | CWR)
        offset += len(chunk)
        got += chunk
    assert got == payload


@settings(max_examples=60, deadline=None)
@given(
    v4=st.booleans(),
    payload=st.binary(max_size=20000),
    gso_size=st.integers(8, 1460),
    seq=st.integers(2**32 - 30000, 2**32 - 1) | u32,
    fin=st.booleans(),
    psh=st.booleans(),
    cwr=st.booleans(),
    ece=st.booleans(),
    ident=u16,
    options=st.booleans(),
    ecn=st.booleans(),
)
def test_segment_large_tcp(
    v4: bool,
    payload: bytes,
    gso_size: int,
    seq: int,
    fin: bool,
    psh: bool,
    cwr: bool,
    ece: bool,
    ident: int,
    options: bool,
    ecn: bool,
) -> None:
    flags = ACK | (FIN if fin else 0) | (PSH if psh else 0) | (CWR if cwr else 0)
    flags |= ECE if ece else 0
    tcp = tcp_header(seq, flags, TS_OPTIONS if options else b"")
    packet = ipv4(TCP, tcp + payload, ident) if v4 else ipv6(TCP, tcp + payload)
    ip_len = 20 if v4 else 40
    kind = (GSO_TCPV4 if v4 else GSO_TCPV6) | (GSO_ECN if ecn else 0)
    # The kernel hands the segment over with a partial checksum; segment() recomputes it.
    off = Offload(F_NEEDS_CSUM, kind, ip_len + len(tcp), gso_size, ip_len, 16)
    out = segment(off, packet)
    check_segments(out, packet, v4, payload, gso_size, seq)


@pytest.mark.parametrize("v4", [True, False])
def test_segment_pure_ack_gives_one_packet(v4: bool) -> None:
    tcp = tcp_header(2**32 - 1, ACK | PSH | CWR)
    packet = ipv4(TCP, tcp, 0xFFFF) if v4 else ipv6(TCP, tcp)
    out = segment(Offload(0, GSO_TCPV4 if v4 else GSO_TCPV6, 0, 1400, 0, 0), packet)
    assert len(out) == 1
    check_segments(out, packet, v4, b"", 1400, 2**32 - 1)


def test_segment_exact_multiple_and_wrap() -> None:
    payload = bytes(range(256)) * 12  # 3072 = 3 x 1024
    seq = 2**32 - 1500
    packet = ipv4(TCP, tcp_header(seq, ACK | FIN | PSH | CWR) + payload, 0xFFFE)
    out = segment(Offload(0, GSO_TCPV4, 40, 1024, 0, 0), packet)
    assert [len(p) for p in out] == [1064] * 3
    assert [int.from_bytes(p[4:6], "big") for p in out] == [0xFFFE, 0xFFFF, 0]
    assert [int.from_bytes(p[24:28], "big") for p in out] == [seq, seq + 1024, 548]
    check_segments(out, packet, True, payload, 1024, seq)


# -- 3. partial checksum completion ----------------------------------------------------


def udp_datagram(payload: bytes) -> bytes:
    return struct.pack("!HHHH", 5353, 5353, 8 + len(payload), 0) + payload


@settings(max_examples=100)
@given(v4=st.booleans(), udp=st.booleans(), payload=st.binary(max_size=1400))
def test_complete_partial_checksum(v4: bool, udp: bool, payload: bytes) -> None:
    proto = UDP if udp else TCP
    body = udp_datagram(payload) if udp else tcp_header(7, ACK | PSH) + payload
    packet = ipv4(proto, body) if v4 else ipv6(proto, body)
    start = 20 if v4 else 40
    csum_offset = 6 if udp else 16
    packet = partial(packet, start, csum_offset, proto)
    (out,) = segment(Offload(F_NEEDS_CSUM, GSO_NONE, 0, 0, start, csum_offset), packet)
    at = start + csum_offset
    assert len(out) == len(packet)
    assert out[:at] == packet[:at] and out[at + 2 :] == packet[at + 2 :]
    src, dst = (SRC4, DST4) if v4 else (SRC6, DST6)
    pseudo = pseudo_header(src, dst, proto, len(body))
    assert checksum(pseudo + out[start:]) == 0
    if udp:
        assert out[at : at + 2] != b"\0\0"  # zero would mean "no checksum" for UDP


def test_udp_checksum_zero_becomes_ffff() -> None:
    # Payload chosen so that the complete sum is 0xFFFF, i.e. the checksum computes to 0.
    rest = ones_sum(pseudo_header(SRC6, DST6, UDP, 10) + udp_datagram(bytes(2)))
    filler = (0xFFFF - rest) & 0xFFFF  # ones' complement: makes the whole sum 0xFFFF
    body = udp_datagram(filler.to_bytes(2, "big"))
    packet = partial(ipv6(UDP, body), 40, 6, UDP)
    assert checksum(pseudo_header(SRC6, DST6, UDP, 10) + body) == 0
    (out,) = segment(Offload(F_NEEDS_CSUM, GSO_NONE, 0, 0, 40, 6), packet)
    assert out[46:48] == b"\xff\xff"
    assert checksum(pseudo_header(SRC6, DST6, UDP, 10) + out[40:]) == 0


def test_gso_none_without_needs_csum_is_untouched() -> None:
    packet = ipv4(UDP, udp_datagram(b"abc"))
    assert segment(Offload(F_DATA_VALID, GSO_NONE, 0, 0, 0, 0), packet) == [packet]


# -- 4. errors -------------------------------------------------------------------------


BIG_V4 = ipv4(TCP, tcp_header(1, ACK) + bytes(3000))
BIG_V6 = ipv6(TCP, tcp_header(1, ACK) + bytes(3000))


@pytest.mark.parametrize(
    ("off", "packet"),
    [
        pytest.param(Offload(0, 3, 0, 1400, 0, 0), BIG_V4, id="gso-udp"),
        pytest.param(Offload(0, 3 | GSO_ECN, 0, 1400, 0, 0), BIG_V4, id="gso-udp-ecn"),
        pytest.param(Offload(0, 5, 0, 1400, 0, 0), BIG_V6, id="gso-udp-l4"),
        pytest.param(Offload(0, GSO_TCPV4, 0, 0, 0, 0), BIG_V4, id="gso-size-0"),
        pytest.param(Offload(0, GSO_TCPV6, 0, 0, 0, 0), BIG_V6, id="gso-size-0-v6"),
        pytest.param(Offload(0, GSO_TCPV4, 0, 1400, 0, 0), BIG_V6, id="v4-type-v6-packet"),
        pytest.param(Offload(0, GSO_TCPV6, 0, 1400, 0, 0), BIG_V4, id="v6-type-v4-packet"),
        pytest.param(Offload(0, GSO_TCPV4, 0, 1400, 0, 0), b"", id="empty"),
        pytest.param(
            Offload(0, GSO_TCPV4, 0, 1400, 0, 0), ipv4(UDP, udp_datagram(bytes(3000))), id="udp-v4"
        ),
        pytest.param(
            Offload(0, GSO_TCPV6, 0, 1400, 0, 0), ipv6(UDP, udp_datagram(bytes(3000))), id="udp-v6"
        ),
        pytest.param(
            Offload(0, GSO_TCPV4, 0, 1400, 0, 0), ipv4(TCP, tcp_header(1, ACK)[:19]), id="tcp-19"
        ),
        pytest.param(
            Offload(0, GSO_TCPV6, 0, 1400, 0, 0), ipv6(TCP, tcp_header(1, ACK)[:12]), id="tcp-12-v6"
        ),
        pytest.param(
            # Data offset says 32 bytes, only 20 there.
            Offload(0, GSO_TCPV4, 0, 1400, 0, 0),
            ipv4(TCP, tcp_header(1, ACK, TS_OPTIONS)[:20]),
            id="tcp-options-cut",
        ),
        pytest.param(
            Offload(0, GSO_TCPV4, 0, 1400, 0, 0),
            ipv4(TCP, b"\0" * 12 + bytes((4 << 4,)) + b"\0" * 7),
            id="tcp-data-offset-4",
        ),
        pytest.param(
            Offload(F_NEEDS_CSUM, GSO_NONE, 0, 0, len(BIG_V4), 16), BIG_V4, id="csum-start-end"
        ),
        pytest.param(
            Offload(F_NEEDS_CSUM, GSO_NONE, 0, 0, 0xFFFF, 16), BIG_V4, id="csum-start-far"
        ),
        pytest.param(
            Offload(F_NEEDS_CSUM, GSO_NONE, 0, 0, len(BIG_V4) - 1, 0), BIG_V4, id="csum-field-cut"
        ),
        pytest.param(
            Offload(F_NEEDS_CSUM, GSO_NONE, 0, 0, 20, 0xFFFF), BIG_V4, id="csum-offset-far"
        ),
        pytest.param(Offload(F_NEEDS_CSUM, GSO_NONE, 0, 0, 0, 0), b"", id="csum-empty"),
    ],
)
def test_segment_errors(off: Offload, packet: bytes) -> None:
    with pytest.raises(OffloadError):
        segment(off, packet)


# segment() must check that the packet holds an IP header before it reads one:
# a short packet raises OffloadError (a caller counting OffloadError as "malformed"
# would crash on anything else).
@pytest.mark.parametrize(
    ("kind", "packet"),
    [(GSO_TCPV4, bytes((0x45,)) + bytes(8)), (GSO_TCPV6, bytes((0x60,)) + bytes(5))],
    ids=["v4-9-bytes", "v6-6-bytes"],
)
def test_segment_short_ip_header_is_offload_error(kind: int, packet: bytes) -> None:
    with pytest.raises(OffloadError):
        segment(Offload(0, kind, 0, 1400, 0, 0), packet)


# An IPv4 header length below 20 bytes (IHL < 5) must be rejected, not read as TCP.
def test_segment_ipv4_ihl_below_5_is_offload_error() -> None:
    packet = bytearray(BIG_V4)
    packet[0] = 0x40  # IHL 0
    packet[12] = 5 << 4  # where a TCP data offset would be read if IHL were trusted
    with pytest.raises(OffloadError):
        segment(Offload(0, GSO_TCPV4, 0, 1400, 0, 0), bytes(packet))


headers = st.binary(min_size=VNET_HDR_LEN, max_size=VNET_HDR_LEN) | st.builds(
    Offload.pack,
    st.builds(
        Offload,
        flags=st.sampled_from([0, F_NEEDS_CSUM, F_DATA_VALID]) | st.integers(0, 255),
        gso_type=st.sampled_from([GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_TCPV4 | GSO_ECN, 3])
        | st.integers(0, 255),
        hdr_len=u16,
        gso_size=st.integers(0, 64) | u16,
        csum_start=st.integers(0, 80) | u16,
        csum_offset=st.integers(0, 20) | u16,
    ),
)
packets = (
    st.binary(max_size=120)
    | st.builds(lambda b: bytes((0x45,)) + b, st.binary(max_size=120))
    | st.builds(lambda b: bytes((0x60,)) + b, st.binary(max_size=120))
    | st.builds(lambda b, pad: BIG_V4[: 40 + b] + pad, st.integers(-40, 100), st.binary(max_size=8))
    | st.builds(lambda b, pad: BIG_V6[: 60 + b] + pad, st.integers(-60, 100), st.binary(max_size=8))
)


@settings(max_examples=400, deadline=None)
@given(headers, packets)
def test_segment_fuzz_only_offload_error(hdr: bytes, packet: bytes) -> None:
    off = Offload.parse(hdr)
    try:
        out = segment(off, packet)
    except OffloadError:
        return
    assert isinstance(out, list) and all(isinstance(p, bytes) for p in out)
