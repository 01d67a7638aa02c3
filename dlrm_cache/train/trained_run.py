"""A ``dlrm-train`` run's checkpoint as a model to score with or export, and what it was trained on.

- ``plain_model()``: TorchRec's ``DLRM`` / ``DLRM_DCN`` over a plain ``EmbeddingBagCollection`` holding
  every table's trained weights whole in memory (no optimizer state): what ``dlrm-export`` writes.
- ``cached_model(cache)``: the same model over the run's own cache kernel, its tables (weights and
  optimizer state, as trained) in the host tier ``cache.host`` says: ``mmap`` keeps tables larger
  than RAM in a file. It scores exactly as ``plain_model()`` (tested) and as the run's evaluation.

The checkpoint may have been written by any number of ranks, with any sharding: its pieces are
assembled a chunk of rows at a time (``checkpoint.full_weights`` / ``checkpoint.load_embeddings``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from dlrm_cache.cache import CachedEmbeddingBagCollection, SparseOptimizer
from dlrm_cache.config import CacheConfig, ConfigError, ModelConfig, OptimConfig
from dlrm_cache.criteo import CAT_COLUMNS, table_name
from dlrm_cache.distributed import checkpoint as ckpt
from dlrm_cache.distributed.runtime import EBC_FQN
from dlrm_cache.train.dense_state import load_dense_state
from dlrm_cache.train.model import dlrm_model, table_configs

EBC_PREFIX = f"{EBC_FQN}.embedding_bags."  # a table's weight key in DLRM


@dataclass
class TrainedRun:
    run_dir: Path
    checkpoint: Path
    world_size: int  # of the run that wrote the checkpoint
    step: int
    model: ModelConfig
    optim: OptimConfig
    cache: CacheConfig  # the run's cache settings
    tables: list[EmbeddingBagConfig]
    batch_size: int  # the run's train.batch_size: predictions batch alike
    data_path: Path | None  # the dataset it trained on (its vocabulary encodes raw input)
    vocab_id: str | None  # that dataset's encoding (``metadata.json``; None: recorded before ids existed)
    dense: dict[str, torch.Tensor]  # everything but the tables, under the model's names

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The plain model's state dict; reads every table whole."""
        weights = ckpt.full_weights(self.checkpoint, self.world_size)
        return {**self.dense, **{EBC_PREFIX + t.name + ".weight": weights[t.name] for t in self.tables}}

    def plain_model(self, device: torch.device | None = None) -> torch.nn.Module:
        """The trained model, TorchRec modules only (loaded with ``strict=True``), on ``device`` (CPU)."""
        device = device or torch.device("cpu")
        ebc = EmbeddingBagCollection(self.tables, device=torch.device("meta"))
        model = dlrm_model(self.model, ebc, device)
        model.load_state_dict(self.state_dict(), strict=True, assign=True)
        return model.to(device).eval()

    def cached_model(
        self, cache: CacheConfig, device: torch.device | None = None
    ) -> tuple[torch.nn.Module, CachedEmbeddingBagCollection]:
        """The trained model over the cache kernel with ``cache``'s host tier and sizes; close the
        collection when done (a mapped host tier's files go then)."""
        device = device or torch.device("cpu")
        optimizer = SparseOptimizer.from_config(self.optim)
        ebc = CachedEmbeddingBagCollection(self.tables, cache, optimizer, device)
        try:
            model = dlrm_model(self.model, ebc, device)
            load_dense_state(model, self.dense)
            ckpt.load_embeddings(self.checkpoint, self.world_size, [(ebc, {})])
        except BaseException:
            ebc.close()
            raise
        return model.eval(), ebc

    def vocab_sizes(self) -> dict[str, int]:
        return {t.feature_names[0]: t.num_embeddings for t in self.tables}


def load_run(run_dir: Path) -> TrainedRun:
    """The newest whole checkpoint of ``run_dir`` (its tables not read yet), with one-line errors."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir}: no such folder")
    found = ckpt.find_checkpoint(run_dir)
    if found is None:
        raise ValueError(
            f"run_dir={run_dir}: no checkpoint ({ckpt.CURRENT}/{ckpt.META}); dlrm-train writes one at the "
            "end of a run and every train.checkpoint_every steps"
        )
    meta = ckpt.load_meta(found)
    try:
        model = ModelConfig(**meta["config"]["model"])
        optim = OptimConfig(**meta["config"]["optim"])
        cache = CacheConfig(**meta["config"]["cache"])
        batch_size = int(meta["config"]["train"]["batch_size"])
    except (KeyError, TypeError, ConfigError) as e:
        raise ValueError(f"{found / ckpt.META}: no model settings this version reads ({e})") from None
    shapes = {p.table: p.full_rows for p in ckpt.pieces(found, meta["world_size"])}
    missing = [table_name(f) for f in CAT_COLUMNS if table_name(f) not in shapes]
    if missing:
        raise ValueError(f"{found}: no rows for table(s) {', '.join(missing)}")
    tables = table_configs(model.embedding_dim, {f: shapes[table_name(f)] for f in CAT_COLUMNS})
    return TrainedRun(run_dir, found, meta["world_size"], int(meta["step"]), model, optim, cache, tables,
                      batch_size, _data_path(run_dir, meta), meta.get("vocab_id"), meta["model"])  # fmt: skip


def _data_path(run_dir: Path, meta: dict) -> Path | None:
    """Where the run's dataset was: recorded in the checkpoint, else in the run's summary."""
    if meta.get("data_path"):
        return Path(meta["data_path"])
    try:
        return Path(json.loads((run_dir / "summary.json").read_text())["data_path"])
    except (OSError, ValueError, KeyError):
        return None
