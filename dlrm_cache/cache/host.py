"""The host tier: every row of a group of tables, weight and optimizer state side by side."""

from __future__ import annotations

import shutil
import tempfile
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

_INIT_CHUNK_ROWS = 1 << 18  # initialise huge tables a chunk at a time (bounded extra memory)


@dataclass(frozen=True)
class TableShard:
    """Where a table held by a cache sits in the full table: its first row and column, and the full
    table's size (a whole table: offsets 0, its own size)."""

    row_offset: int
    col_offset: int
    full_rows: int
    full_dim: int

    @classmethod
    def whole(cls, cfg: EmbeddingBagConfig) -> TableShard:
        return cls(0, 0, cfg.num_embeddings, cfg.embedding_dim)


class HostTable:
    """A (rows, width) float32 array in RAM (pinned when ``pin``) or in a file-backed memory map.

    A memory-mapped table is scratch space (checkpoints hold the real copy): its file, and the
    temporary folder made for it when no ``mmap_dir`` is given, go when the table is closed or
    garbage-collected, or at interpreter exit."""

    def __init__(self, rows: int, width: int, kind: str, mmap_dir: str | None, name: str, pin: bool):
        self.path: Path | None = None
        if kind == "mmap":
            folder = Path(mmap_dir) if mmap_dir else Path(tempfile.mkdtemp(prefix="dlrm_cache_host_"))
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f"{name}.f32"
            self.data = torch.from_numpy(
                np.memmap(self.path, dtype=np.float32, mode="w+", shape=(rows, width))
            )
            self._cleanup = weakref.finalize(self, _remove, self.path, None if mmap_dir else folder)
        else:
            self.data = torch.zeros(rows, width, dtype=torch.float32, pin_memory=pin)
            self._cleanup = None

    def initialize(
        self,
        configs: list[EmbeddingBagConfig],
        row_offsets: list[int],
        dim: int,
        seed: int,
        shards: list[TableShard] | None = None,
    ) -> None:
        """Each table's ``init_fn`` (TorchRec's default: uniform in ``[-sqrt(1/n), sqrt(1/n)]``, also used
        for configs without one); optimizer state starts at 0.

        Values depend only on ``seed``, the table's name and the row: the full table is drawn a chunk of
        rows at a time, each chunk from a seed of its own, so a shard of a table (``shards[t]``: which
        rows and columns of the full table this one is) gets exactly the values those rows and columns
        have in the whole table, whatever the sharding."""
        for t, cfg in enumerate(configs):
            shard = shards[t] if shards else TableShard.whole(cfg)
            rows = row_offsets[t + 1] - row_offsets[t]
            table_seed = seed * 1_000_003 + zlib.crc32(cfg.name.encode())
            first, last = shard.row_offset, shard.row_offset + rows
            for chunk in range(first // _INIT_CHUNK_ROWS, -(-last // _INIT_CHUNK_ROWS)):
                lo, hi = chunk * _INIT_CHUNK_ROWS, min((chunk + 1) * _INIT_CHUNK_ROWS, shard.full_rows)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(table_seed * 65_537 + chunk)
                    w = torch.empty(hi - lo, shard.full_dim)
                    if getattr(cfg, "init_fn", None) is not None:
                        cfg.init_fn(w)
                    else:  # TorchRec's default bounds
                        bound = (1 / shard.full_rows) ** 0.5
                        w.uniform_(-bound, bound)
                a, b = max(lo, first), min(hi, last)
                dst = slice(row_offsets[t] + a - first, row_offsets[t] + b - first)
                self.data[dst, :dim] = w[a - lo : b - lo, shard.col_offset : shard.col_offset + dim]
                self.data[dst, dim:] = 0

    def close(self) -> None:
        if self._cleanup is not None:
            del self.data  # unmaps the file
            self._cleanup()


def _remove(path: Path, folder: Path | None) -> None:
    path.unlink(missing_ok=True)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
