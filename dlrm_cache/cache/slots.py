"""Which row sits in which cache slot: the bookkeeping both planners read and update, in host memory,
and the plan they return for a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlrm_cache.cache import policy as pol

PINNED_NEVER = -(1 << 62)


@dataclass
class SlotState:
    """One table group's slots (every table's slot range, end to end) and the rows they hold."""

    row_to_slot: torch.Tensor  # (rows,) int32: the slot of each cached row, -1 elsewhere
    slot_to_row: torch.Tensor  # (slots,) int64: the row in each slot, -1 for a free slot
    filled: torch.Tensor  # (tables,) slots in use per table (each table fills its range from the front)
    dirty_and_scratch: torch.Tensor  # (slots + 1,) bool: a dirty bit per slot, then the scratch row's
    pin_until: torch.Tensor  # (slots,) the last step that uses each slot: not evicted before it
    last_used: torch.Tensor | None  # (slots,) lru: the step each slot was last used
    next_use: torch.Tensor | None  # (slots,) lookahead: each slot's next use (a batch sequence number)

    @classmethod
    def empty(cls, rows: int, slots: int, tables: int, policy: str) -> SlotState:
        return cls(
            row_to_slot=torch.full((rows,), -1, dtype=torch.int32),
            slot_to_row=torch.full((slots,), -1, dtype=torch.int64),
            filled=torch.zeros(tables, dtype=torch.int64),
            dirty_and_scratch=torch.zeros(slots + 1, dtype=torch.bool),
            pin_until=torch.full((slots,), PINNED_NEVER, dtype=torch.int64),
            last_used=torch.zeros(slots, dtype=torch.int64) if policy == "lru" else None,
            next_use=(
                torch.full((slots,), pol.NO_NEXT_USE, dtype=torch.int64) if policy == "lookahead" else None
            ),
        )

    @property
    def dirty(self) -> torch.Tensor:
        return self.dirty_and_scratch[:-1]

    def admit(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """``rows`` now sit, clean, in ``slots``."""
        self.row_to_slot[rows] = slots.to(torch.int32)
        self.slot_to_row[slots] = rows
        self.dirty[slots] = False

    def release(self, slots: torch.Tensor) -> None:
        """The rows in ``slots`` leave the cache."""
        self.row_to_slot[self.slot_to_row[slots]] = -1
        self.slot_to_row[slots] = -1


@dataclass
class SlotPlan:
    """A planner's decisions for one batch (its bookkeeping already updated): each unique row's slot
    (-1: served from the host this step), those rows' positions, the dirty victims to write back and
    the misses to load (both empty where the planner copied the rows itself), and per table the
    victims it wanted but found none for (a batch that needs more rows than the table's cache)."""

    slots: torch.Tensor  # (U,) int64
    overflow: torch.Tensor | None  # positions in the batch's unique rows, sorted
    write_back_rows: torch.Tensor
    write_back_slots: torch.Tensor
    load_rows: torch.Tensor
    load_slots: torch.Tensor
    short_of: torch.Tensor  # (tables,) int64
