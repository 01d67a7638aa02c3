"""What a checkpoint saves beside the tables, and what a resume restores: ``TrainState``.

A run's state is its step, its dense model and optimizer, the random number generator's state, the
config it must share with a run that continues it, and the dataset it trained on. The tables are the
embedding runtime's (``checkpoint.save`` / ``load_embeddings``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from dlrm_cache.config import TrainRunConfig
from dlrm_cache.distributed import checkpoint as ckpt
from dlrm_cache.files import atomic_file
from dlrm_cache.train.dense_state import dense_state, load_dense_state
from dlrm_cache.train.errors import TrainingError

# What a resumed run may set otherwise than the run it continues: how long it goes on, whether it
# logs to TensorBoard, and how the tables are placed (checkpoints load on any number of ranks).
RESUMABLE = {
    "train": ("resume", "max_steps", "epochs", "tensorboard"),
    "trainer": ("sharding", "sharded", "hot_rows", "network"),
}


class TrainState:
    """The run's step and dense training state; ``state_dict`` is a checkpoint's ``meta.pt`` (beside
    ``format`` and ``world_size``, which ``checkpoint.save`` adds)."""

    def __init__(self, cfg: TrainRunConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 data_path: Path, data: dict):  # fmt: skip
        """``data``: the dataset's metadata (its ``vocab_id`` and ``dataset_id`` are recorded)."""
        self.cfg, self.model, self.optimizer, self.data_path = cfg, model, optimizer, data_path
        self.ids = {k: data.get(k) for k in ("vocab_id", "dataset_id")}
        self.step = 0

    def state_dict(self) -> dict:
        return {"model": dense_state(self.model), "dense_optimizer": self.optimizer.state_dict(),
                "rng": torch.get_rng_state(), "step": self.step, "config": comparable(self.cfg),
                "data_path": str(self.data_path.resolve()), **self.ids}  # fmt: skip

    def load_state_dict(self, meta: dict) -> None:
        load_dense_state(self.model, meta["model"])
        self.optimizer.load_state_dict(meta["dense_optimizer"])
        torch.set_rng_state(meta["rng"])
        self.step = meta["step"]


def dense_optimizer(cfg: TrainRunConfig, params) -> torch.optim.Optimizer:
    """The dense parameters' optimizer, as ``optim.dense`` says."""
    o = cfg.optim
    if o.dense == "sgd":
        return torch.optim.SGD(params, lr=o.dense_lr)
    if o.dense == "adagrad":
        return torch.optim.Adagrad(params, lr=o.dense_lr, eps=o.eps)
    return torch.optim.Adam(params, lr=o.dense_lr, betas=(o.beta1, o.beta2), eps=o.eps)


def resumable_checkpoint(
    cfg: TrainRunConfig, run_dir: Path, root: Path, data: dict
) -> tuple[Path, dict] | None:
    """The checkpoint in ``run_dir`` that this run continues (with ``train.resume=true``) and its meta;
    None to start afresh. A checkpoint without ``train.resume``, written with other settings, or on
    another dataset than ``root`` (metadata ``data``: by its ``dataset_id``, wherever it lies; by its
    path for checkpoints or datasets without one) is refused."""
    found = ckpt.find_checkpoint(run_dir)
    if found is None:
        return None
    meta = ckpt.load_meta(found)
    if not cfg.train.resume:
        raise TrainingError(
            f"{run_dir} holds a checkpoint (step {meta['step']}): pass train.resume=true to continue it, "
            "or choose another hydra.run.dir"
        )
    saved = {**meta["config"], "data": {**meta["config"].get("data", {}), "path": None}}  # as comparable()
    differ = _differences(saved, comparable(cfg))
    if meta.get("dataset_id") and data.get("dataset_id"):
        same = meta["dataset_id"] == data["dataset_id"]
    else:
        same = meta.get("data_path") in (None, str(root.resolve()))
    if not same:
        differ.append(f"the dataset ({meta.get('data_path')} then, {root.resolve()} now: other data)")
    if differ:
        raise TrainingError(f"train.resume=true: {found} was written with other values: {', '.join(differ)}")
    return found, meta


def comparable(cfg: TrainRunConfig) -> dict:
    """The config a resumed run must share with the run it continues (any number of ranks)."""
    d = asdict(cfg)
    d["data"]["path"] = None  # the dataset is compared by its content (resumable_checkpoint)
    for section, free in RESUMABLE.items():
        d[section] = {k: v for k, v in d[section].items() if k not in free}
    return d


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """The keys (dotted) whose values differ between two nested configs, with both values."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} then, {b!r} now)")
    return out


def keep_metrics_until(path: Path, step: int) -> list[dict]:
    """Drop the records a killed run wrote after its last checkpoint (they are trained again); returns
    the records kept."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) != len(lines):
        with atomic_file(path) as f:
            f.write("".join(kept).encode())
    return [json.loads(line) for line in kept]


def _record_step(line: str) -> float:
    """A metrics record's step; a line cut short by a kill counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf
