"""Sliding anti-replay window (RFC 6479: a ring of 64-bit bitmap blocks).

The window tracks the greatest counter accepted so far (``last``) and one bit for
each of the ``WINDOW_SIZE`` counters just below it. A counter is accepted when it
lies above ``last`` (the window slides forward, clearing only the blocks it jumps
over) or inside the window with its bit still clear. Anything older than the
window is rejected: we cannot tell whether we saw it.

RFC 6479 keeps one block more than the window it promises, so that sliding
forward never has to shift bits: the block being cleared is never one whose bits
are still needed. With 64 blocks of 64 bits the bitmap is 4096 bits and the
window 4032 counters.

Call :meth:`ReplayWindow.check` before decrypting (cheap pre-filter, changes
nothing) and :meth:`ReplayWindow.update` only after the packet authenticated, so a
forged packet can never move the window.
"""

from __future__ import annotations

BLOCK_BITS = 64
_BLOCK_SHIFT = 6  # log2(BLOCK_BITS)
_BIT_MASK = BLOCK_BITS - 1
DEFAULT_BLOCKS = 64  # 4096-bit bitmap
MAX_COUNTER = 2**64 - 1


class ReplayWindow:
    """Anti-replay state for one receive key. Counters are u64 (0 .. 2^64-1)."""

    __slots__ = ("_bitmap", "_blocks", "_last", "window_size")

    def __init__(self, blocks: int = DEFAULT_BLOCKS) -> None:
        if blocks < 2:
            raise ValueError("an RFC 6479 window needs at least two blocks")
        self._blocks = blocks
        self._bitmap = [0] * blocks
        self._last = 0  # greatest counter accepted (0 before any: counter 0 is still new)
        # Counters c with last - c < window_size are tracked exactly.
        self.window_size = (blocks - 1) * BLOCK_BITS

    @property
    def last(self) -> int:
        """The greatest counter accepted so far (0 before the first)."""
        return self._last

    def check(self, counter: int) -> bool:
        """True when ``counter`` would be accepted. Changes nothing."""
        if not 0 <= counter <= MAX_COUNTER:
            return False
        if counter > self._last:
            return True
        if self._last - counter >= self.window_size:
            return False  # too old: outside the window
        block = (counter >> _BLOCK_SHIFT) % self._blocks
        return not (self._bitmap[block] >> (counter & _BIT_MASK)) & 1

    def update(self, counter: int) -> bool:
        """Accept and record ``counter``; False (and nothing changes) for a replay or
        a counter older than the window."""
        if not 0 <= counter <= MAX_COUNTER:
            return False
        blocks = self._blocks
        if counter > self._last:
            cur = self._last >> _BLOCK_SHIFT
            new = counter >> _BLOCK_SHIFT
            # Clear the blocks we slide over; a jump of a whole ring or more clears all.
            for i in range(1, min(new - cur, blocks) + 1):
                self._bitmap[(cur + i) % blocks] = 0
            self._last = counter
        elif self._last - counter >= self.window_size:
            return False
        block = (counter >> _BLOCK_SHIFT) % blocks
        bit = 1 << (counter & _BIT_MASK)
        if self._bitmap[block] & bit:
            return False
        self._bitmap[block] |= bit
        return True

    def __repr__(self) -> str:
        return f"ReplayWindow(last={self._last}, window={self.window_size})"


__all__ = ["BLOCK_BITS", "DEFAULT_BLOCKS", "MAX_COUNTER", "ReplayWindow"]
