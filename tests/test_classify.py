"""The receive classifier (meshpipe/classify.py): every verdict, and fuzz."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshpipe import wire
from meshpipe.classify import CONTROL, DROP_HOP_LIMIT, Drop, Transit, classify, shard_of

ME = b"m" * 32
FAR = b"f" * 32
OTHER = b"o" * 32
SRC = bytes(range(32))
TABLE = {FAR: (0, ("198.18.0.2", 7000)), OTHER: (1, 0x1234)}


def test_verdicts() -> None:
    mine = wire.encode_data(ME, SRC, b"\x03payload")
    assert classify(mine, ME, TABLE, 0, 3) == shard_of(SRC, 3)
    assert classify(mine, ME, TABLE, 0, 0) == CONTROL  # no shards: the control worker
    transit = wire.encode_data(FAR, SRC, b"x", hop_limit=5)
    assert classify(transit, ME, TABLE, 0, 2) == Transit(
        ("198.18.0.2", 7000), wire.with_hop_limit(transit, 4)
    )
    # Another interface's next hop, or no route: the shard's own table decides.
    assert classify(wire.encode_data(OTHER, SRC, b"x"), ME, TABLE, 0, 2) == shard_of(SRC, 2)
    assert classify(wire.encode_data(b"z" * 32, SRC, b"x"), ME, TABLE, 0, 2) == shard_of(SRC, 2)
    assert classify(wire.encode_data(FAR, SRC, b"x", hop_limit=1), ME, TABLE, 0, 2) == (
        DROP_HOP_LIMIT
    )
    hello = wire.encode_control(wire.KIND_HELLO, {"x": 1})
    assert classify(hello, ME, TABLE, 0, 2) == CONTROL
    assert classify(b"", ME, TABLE, 0, 2) == CONTROL
    assert classify(transit[:65], ME, TABLE, 0, 2) == CONTROL  # truncated header


@given(
    st.binary(max_size=120),
    st.sampled_from([ME, FAR, OTHER, b"q" * 32]),
    st.integers(0, 255),
    st.integers(0, 1),
    st.integers(0, 4),
)
def test_fuzz_any_bytes_get_one_verdict(
    junk: bytes, dst: bytes, hop_limit: int, iface: int, shards: int
) -> None:
    for frame in (junk, wire.encode_data(dst, SRC, junk, hop_limit) if hop_limit else junk):
        v = classify(frame, ME, TABLE, iface, shards)
        if isinstance(v, int):
            assert v == CONTROL or 0 <= v < shards
        elif isinstance(v, Transit):
            assert v.frame[1] == frame[1] - 1 >= 1 and v.frame[2:] == frame[2:]
            assert TABLE[frame[2:34]] == (iface, v.dest)
        else:
            assert isinstance(v, Drop) and v.reason == "drop.hop_limit"
