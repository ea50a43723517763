"""Sliding anti-replay window over transport counters (RFC 6479's ring of bit blocks).

The window remembers 8128 counters behind the highest one seen (wireguard-go's size): far
more than the 2048 the issue asks for, so heavy reordering from GRO/GSO batches is tolerated.
"""

from __future__ import annotations

from .constants import REJECT_AFTER_MESSAGES

_BLOCK_BITS = 64
_RING_BLOCKS = 128
RING_MASK = _RING_BLOCKS - 1
WINDOW_SIZE = (_RING_BLOCKS - 1) * _BLOCK_BITS


class ReplayWindow:
    """Accepts each counter at most once, and none more than WINDOW_SIZE behind the newest.

    ``last`` is the newest counter accepted and ``blocks`` the ring of 64-bit words; they are
    public because the device inlines the in-order case on its receive path.
    """

    __slots__ = ("blocks", "last")

    def __init__(self) -> None:
        self.blocks = [0] * _RING_BLOCKS
        self.last = 0

    def accept(self, counter: int) -> bool:
        """Record ``counter``; ``False`` when it was seen before, too old, or out of range."""
        last = self.last
        if counter > last:
            if counter >= REJECT_AFTER_MESSAGES:
                return False
            block = counter >> 6
            current = last >> 6
            blocks = self.blocks
            if block != current:
                end = current + min(block - current, _RING_BLOCKS)
                for i in range(current + 1, end + 1):
                    blocks[i & RING_MASK] = 0
            blocks[block & RING_MASK] |= 1 << (counter & 63)
            self.last = counter
            return True
        if last - counter > WINDOW_SIZE:
            return False
        slot = (counter >> 6) & RING_MASK
        bit = 1 << (counter & 63)
        blocks = self.blocks
        word = blocks[slot]
        if word & bit:
            return False
        blocks[slot] = word | bit
        return True
