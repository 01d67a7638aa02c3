"""What a planner plans over (``Bookkeeping``): a group's layout, the slot state it updates, the counters
it adds to, and the inputs of the eviction policy. Both planners (``python_planner``, ``native``) take
this view, not the group."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlrm_cache.cache.future import FutureIndex
from dlrm_cache.cache.layout import GroupLayout
from dlrm_cache.cache.slots import SlotState


@dataclass
class GroupStats:
    """Counters in host memory (no device sync to read them); one entry per table. The planner (on the
    bookkeeping thread with a CUDA device) and the update (on the training thread) add to counters of
    their own: rows written back are ``written`` (dirty victims, flushes) + ``written_by_update``
    (rows served from the host, updated there)."""

    lookups: torch.Tensor
    touched: torch.Tensor
    loaded: torch.Tensor
    written: torch.Tensor
    written_by_update: torch.Tensor
    overflow: torch.Tensor
    warmup: torch.Tensor
    eval_lookups: torch.Tensor
    eval_host_rows: torch.Tensor
    bookkeeping_s: float = 0.0

    @classmethod
    def zeros(cls, tables: int) -> GroupStats:
        z = [torch.zeros(tables, dtype=torch.int64) for _ in range(9)]
        return cls(*z)


@dataclass
class Bookkeeping:
    layout: GroupLayout
    policy: str
    stats: GroupStats
    state: SlotState  # replaced whole when the cache is emptied (``TableGroup.rebuild``)
    coldness_table: torch.Tensor | None  # (rows,) static coldness from train counts; None: the row id
    access_count: torch.Tensor | None  # (rows,) lfu: lookups of each row, kept across evictions
    future: FutureIndex | None  # lookahead: the uses of rows in enqueued batches

    def coldness(self, rows: torch.Tensor) -> torch.Tensor:
        """Static coldness of global rows: from train counts, or the row itself for ranked ids."""
        return rows if self.coldness_table is None else self.coldness_table[rows]
