"""Next-use bookkeeping for the lookahead policy, in O(unique ids) per batch whatever the window.

Every enqueued batch gets a sequence number and, in a ring buffer (the "arena"), one entry per unique
row: the sequence number of the next enqueued batch that needs that row again (``NO_NEXT_USE`` until
such a batch arrives). ``last_pos[row]`` points at the row's entry in the last enqueued batch holding
it, so enqueuing a batch links each of its rows to its previous occurrence with one scatter. When a
batch is consumed, its entries give, for each of its rows, the next use after it: exactly what
Belady's rule needs, for a window of any length, with no pass over the window per step.
"""

from __future__ import annotations

import torch

from dlrm_cache.cache.policy import NO_NEXT_USE


class FutureIndex:
    def __init__(self, total_rows: int, initial: int = 1 << 16):
        self.last_pos = torch.full((total_rows,), -1, dtype=torch.int64)  # virtual arena position
        self.arena = torch.full((initial,), NO_NEXT_USE, dtype=torch.int64)
        self.head = 0  # virtual end of the arena
        self.tail = 0  # virtual start of the oldest batch not yet consumed
        self.seq = 0  # sequence number of the next enqueued batch

    def _phys(self, virtual: torch.Tensor) -> torch.Tensor:
        return virtual & (len(self.arena) - 1)

    def _reserve(self, n: int) -> None:
        size = len(self.arena)
        if self.head + n - self.tail <= size:
            return
        while self.head + n - self.tail > size:
            size *= 2
        live = torch.arange(self.tail, self.head, dtype=torch.int64)
        grown = torch.full((size,), NO_NEXT_USE, dtype=torch.int64)
        grown[live & (size - 1)] = self.arena[self._phys(live)]
        self.arena = grown

    def add(self, uniq: torch.Tensor) -> tuple[int, int]:
        """Register a future batch's unique rows; returns its (sequence number, arena base)."""
        seq, base = self.open(len(uniq))
        prev = self.last_pos[uniq]
        live = prev >= self.tail
        self.arena[self._phys(prev[live])] = seq
        positions = torch.arange(base, base + len(uniq), dtype=torch.int64)
        self.arena[self._phys(positions)] = NO_NEXT_USE
        self.last_pos[uniq] = positions
        return seq, base

    def open(self, n: int) -> tuple[int, int]:
        """The (sequence number, arena base) of a new batch of ``n`` unique rows, its ``n`` arena
        positions reserved; the caller links them (``add``, or planner.cpp's ``future_add``)."""
        seq, base = self.seq, self.head
        self._reserve(n)
        self.head += n
        self.seq += 1
        return seq, base

    def consume(self, base: int, n: int) -> torch.Tensor:
        """The next use (a sequence number, or NO_NEXT_USE) of each row of the batch at ``base``; the
        batch leaves the arena. Batches must be consumed in the order they were added."""
        if base != self.tail:
            raise RuntimeError("batches must be consumed in the order they were enqueued")
        size = len(self.arena)
        start = base & (size - 1)  # the batch's entries: one run, or two where it wraps around
        if start + n <= size:
            nxt = self.arena[start : start + n].clone()
        else:
            nxt = torch.cat([self.arena[start:], self.arena[: start + n - size]])
        self.tail = base + n
        return nxt
