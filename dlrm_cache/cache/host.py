"""The host tier: every row of a group of tables, weight and optimizer state side by side."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

_INIT_CHUNK_ROWS = 1 << 20  # initialise huge tables a chunk at a time (bounded extra memory)


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
        self, configs: list[EmbeddingBagConfig], row_offsets: list[int], dim: int, seed: int
    ) -> None:
        """Each table's ``init_fn`` (TorchRec's default: uniform in ``[-sqrt(1/n), sqrt(1/n)]``, also used
        for configs without one), a chunk at a time, from a seed of its own; optimizer state starts at 0."""
        for t, cfg in enumerate(configs):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed * 1_000_003 + t)
                for start in range(row_offsets[t], row_offsets[t + 1], _INIT_CHUNK_ROWS):
                    stop = min(start + _INIT_CHUNK_ROWS, row_offsets[t + 1])
                    w = torch.empty(stop - start, dim)
                    if getattr(cfg, "init_fn", None) is not None:
                        cfg.init_fn(w)
                    else:  # TorchRec's default bounds
                        bound = (1 / cfg.num_embeddings) ** 0.5
                        w.uniform_(-bound, bound)
                    self.data[start:stop, :dim] = w
                    self.data[start:stop, dim:] = 0

    def close(self) -> None:
        if self._cleanup is not None:
            del self.data  # unmaps the file
            self._cleanup()


def _remove(path: Path, folder: Path | None) -> None:
    path.unlink(missing_ok=True)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
