"""Datagram framing in deadline-mode streams: gaps lose only the datagrams they touch."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from meshpipe.services.udp_framing import MAGIC, FrameDecoder, frame

payloads = st.lists(
    st.binary(max_size=300).filter(lambda b: MAGIC not in b and b[-1:] != MAGIC[:1]),
    min_size=1,
    max_size=30,
)


@given(msgs=payloads, cuts=st.lists(st.integers(0, 10_000), max_size=10))
@settings(max_examples=200, deadline=None)
def test_chunked_stream_gives_every_datagram(msgs: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frame(m) for m in msgs)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    dec = FrameDecoder()
    out: list[bytes] = []
    for a, b in itertools.pairwise(points):
        out += dec.feed(data[a:b])
    assert out == msgs


@given(
    msgs=payloads, gaps=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 400)), max_size=4)
)
@settings(max_examples=200, deadline=None)
def test_a_gap_loses_only_the_datagrams_it_touches(
    msgs: list[bytes], gaps: list[tuple[int, int]]
) -> None:
    spans: list[tuple[int, int]] = []
    data = b""
    for m in msgs:
        f = frame(m)
        spans.append((len(data), len(data) + len(f)))
        data += f
    holes = sorted((s % len(data), min(len(data), s % len(data) + n)) for s, n in gaps)
    dec = FrameDecoder()
    out: list[bytes] = []
    pos = 0
    for s, e in holes:
        if s > pos:
            out += dec.feed(data[pos:s])
        if e > pos:
            dec.gap()
            pos = max(pos, e)
    out += dec.feed(data[pos:])
    untouched = [
        m
        for m, (a, b) in zip(msgs, spans, strict=True)
        if not any(s < b and e > a for s, e in holes)
    ]
    # Every untouched datagram arrives, in order; nothing arrives that was not sent.
    it = iter(out)
    assert all(any(m == o for o in it) for m in untouched)
    assert all(o in msgs for o in out)
