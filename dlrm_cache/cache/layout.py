"""Where a table group's tables sit: one row space (global row = table's row offset + id) and one slot
space (each table's cached rows in a slot range of fixed capacity), laid end to end in table order."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the cache core runs without torchrec (and so without fbgemm): plain PyTorch
    from torchrec.modules.embedding_configs import EmbeddingBagConfig


class GroupLayout:
    """The tables' rows and cache capacities, their offsets, and each feature's table."""

    def __init__(self, configs: list[EmbeddingBagConfig], capacities: list[int]):
        self.configs = configs
        self.features = [f for c in configs for f in c.feature_names]
        self.rows = [c.num_embeddings for c in configs]
        self.capacities = [min(c, r) for c, r in zip(capacities, self.rows, strict=True)]
        self.row_offsets = _ends_from_zero(self.rows)
        self.slot_offsets = _ends_from_zero(self.capacities)
        self.row_bounds = torch.tensor(self.row_offsets, dtype=torch.int64)
        self.row_ends = self.row_bounds[1:]
        slot_bounds = torch.tensor(self.slot_offsets, dtype=torch.int64)
        self.slot_starts, self.slot_ends = slot_bounds[:-1], slot_bounds[1:]
        self.capacity = torch.tensor(self.capacities, dtype=torch.int64)
        feature_table = [t for t, c in enumerate(configs) for _ in c.feature_names]
        self.feature_table = torch.tensor(feature_table, dtype=torch.int64)
        self.feature_row_offset = self.row_bounds[self.feature_table]
        self.feature_rows = torch.tensor([self.rows[t] for t in feature_table], dtype=torch.int64)

    @property
    def tables(self) -> int:
        return len(self.configs)

    @property
    def total_rows(self) -> int:
        return self.row_offsets[-1]

    @property
    def total_slots(self) -> int:
        return self.slot_offsets[-1]

    def table_of(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.row_ends, rows, right=True)

    def count_unsorted_per_table(self, rows: torch.Tensor) -> torch.Tensor:
        """How many of ``rows`` (any order) fall in each table."""
        return torch.bincount(self.table_of(rows), minlength=self.tables)

    def count_per_table(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """How many of ``sorted_rows`` (ascending global rows) fall in each table: O(T log n)."""
        return torch.searchsorted(sorted_rows, self.row_bounds).diff()


def _ends_from_zero(sizes: list[int]) -> list[int]:
    """0, then the running sums of ``sizes``: where each block starts, and where the last one ends."""
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out
