"""Property tests: the RFC 6479 window against a set-based model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshpipe.replay import BLOCK_BITS, MAX_COUNTER, ReplayWindow


class Model:
    """Accept a counter iff it is unseen and not older than the window."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.seen: set[int] = set()
        self.last = 0

    def check(self, c: int) -> bool:
        if not 0 <= c <= MAX_COUNTER or c in self.seen:
            return False
        return c > self.last or self.last - c < self.window

    def update(self, c: int) -> bool:
        ok = self.check(c)
        if ok:
            self.seen.add(c)
            self.last = max(self.last, c)
        return ok


def _counter(data: st.DataObject, last: int, window: int) -> int:
    """A counter chosen relative to the model's state, to hit every edge."""
    kind = data.draw(st.sampled_from(["near", "edge", "abs", "jump", "max", "old", "far"]))
    if kind == "near":
        c = last + data.draw(st.integers(-3 * BLOCK_BITS, 3 * BLOCK_BITS))
    elif kind == "edge":  # right at the window's lower edge
        c = last - window + data.draw(st.integers(-2, 2))
    elif kind == "abs":
        c = data.draw(st.integers(0, 3 * window))
    elif kind == "jump":  # slides by about a ring or more
        c = last + data.draw(st.integers(window - 2 * BLOCK_BITS, 3 * window))
    elif kind == "max":
        c = MAX_COUNTER - data.draw(st.integers(0, 2 * BLOCK_BITS))
    elif kind == "old":
        c = last - data.draw(st.integers(window, 10 * window))
    else:
        c = data.draw(st.integers(-5, MAX_COUNTER + 5))
    return c


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 6), st.data())
def test_window_matches_model(blocks: int, data: st.DataObject) -> None:
    w = ReplayWindow(blocks)
    m = Model(w.window_size)
    for _ in range(data.draw(st.integers(1, 120))):
        c = _counter(data, m.last, w.window_size)
        assert w.check(c) == m.check(c), c
        if data.draw(st.booleans()):  # sometimes only check: check changes nothing
            assert w.check(c) == m.check(c), c
        assert w.update(c) == m.update(c), c
        assert w.last == m.last


@settings(max_examples=100, deadline=None)
@given(st.permutations(list(range(300))), st.integers(0, 299))
def test_any_order_within_window_accepted_once(order: list[int], dup: int) -> None:
    w = ReplayWindow()  # default window is far larger than 300
    for c in order:
        assert w.update(c)
    for c in (dup, *order[:10]):
        assert not w.check(c)
        assert not w.update(c)


def test_default_window_is_at_least_2048() -> None:
    assert ReplayWindow().window_size >= 2048
    assert ReplayWindow().window_size == 4032


def test_counter_zero_and_max() -> None:
    w = ReplayWindow()
    assert w.check(0) and w.update(0)
    assert not w.update(0)
    assert w.update(MAX_COUNTER)
    assert not w.update(MAX_COUNTER)
    assert w.update(MAX_COUNTER - 1)
    assert not w.update(0)  # far old now
    assert not w.check(MAX_COUNTER + 1) and not w.update(-1)


def test_far_jump_clears_only_what_it_must() -> None:
    w = ReplayWindow(4)  # window 192
    for c in range(0, 100):
        assert w.update(c)
    assert w.update(150)  # slides one block: 0..63 still tracked? last-c < 192 for c > -42
    for c in range(0, 100):
        assert not w.update(c)
    assert w.update(120)
    assert w.update(10_000)  # more than a ring: everything cleared, old ones now too old
    assert not w.update(150)
    for c in range(10_000 - 191, 10_000):
        assert w.check(c)
    assert not w.check(10_000 - 192)


@pytest.mark.parametrize("blocks", [2, 64])
def test_sequential_stream(blocks: int) -> None:
    w = ReplayWindow(blocks)
    for c in range(5 * blocks * BLOCK_BITS):
        assert w.update(c)
        assert not w.check(c)
