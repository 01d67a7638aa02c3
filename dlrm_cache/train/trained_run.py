"""A ``dlrm-train`` run's checkpoint as a plain TorchRec model: ``DLRM`` / ``DLRM_DCN`` over a plain
``EmbeddingBagCollection`` holding every table's trained weights (no cache, no optimizer state), and
what it was trained on. What ``dlrm-predict`` scores with and ``dlrm-export`` writes out.

The checkpoint may have been written by any number of ranks, with any sharding: the tables are
assembled from its pieces (``checkpoint.full_weights``). They are held whole, in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from dlrm_cache.config import ConfigError, ModelConfig
from dlrm_cache.criteo import CAT_COLUMNS, table_name
from dlrm_cache.distributed import checkpoint as ckpt
from dlrm_cache.train.model import dlrm_model, table_configs

EBC_PREFIX = "sparse_arch.embedding_bag_collection.embedding_bags."  # a table's weight key in DLRM


@dataclass
class TrainedRun:
    run_dir: Path
    checkpoint: Path
    step: int
    model: ModelConfig
    tables: list[EmbeddingBagConfig]
    batch_size: int  # the run's train.batch_size: predictions batch alike
    data_path: Path | None  # the dataset it trained on (its vocabulary encodes raw input)
    state: dict[str, torch.Tensor]  # the plain model's state dict

    def plain_model(self, device: torch.device | None = None) -> torch.nn.Module:
        """The trained model, TorchRec modules only (loaded with ``strict=True``), on ``device`` (CPU)."""
        device = device or torch.device("cpu")
        ebc = EmbeddingBagCollection(self.tables, device=torch.device("meta"))
        model = dlrm_model(self.model, ebc, device)
        model.load_state_dict(self.state, strict=True, assign=True)
        return model.to(device).eval()

    def vocab_sizes(self) -> dict[str, int]:
        return {t.feature_names[0]: t.num_embeddings for t in self.tables}


def load_run(run_dir: Path) -> TrainedRun:
    """The newest whole checkpoint of ``run_dir``, with one-line errors for anything else."""
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
        batch_size = int(meta["config"]["train"]["batch_size"])
    except (KeyError, TypeError, ConfigError) as e:
        raise ValueError(f"{found / ckpt.META}: no model settings this version reads ({e})") from None
    weights = ckpt.full_weights(found, meta["world_size"])
    missing = [table_name(f) for f in CAT_COLUMNS if table_name(f) not in weights]
    if missing:
        raise ValueError(f"{found}: no rows for table(s) {', '.join(missing)}")
    sizes = {f: weights[table_name(f)].shape[0] for f in CAT_COLUMNS}
    tables = table_configs(model.embedding_dim, sizes)
    state = {**meta["model"], **{EBC_PREFIX + t.name + ".weight": weights[t.name] for t in tables}}
    return TrainedRun(
        run_dir, found, int(meta["step"]), model, tables, batch_size, _data_path(run_dir, meta), state
    )


def _data_path(run_dir: Path, meta: dict) -> Path | None:
    """Where the run's dataset was: recorded in the checkpoint, else in the run's summary."""
    if meta.get("data_path"):
        return Path(meta["data_path"])
    try:
        return Path(json.loads((run_dir / "summary.json").read_text())["data_path"])
    except (OSError, ValueError, KeyError):
        return None
