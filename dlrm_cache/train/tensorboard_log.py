"""The run's scalars as TensorBoard event files (``<run_dir>/tensorboard/``; ``train.tensorboard``):
the same records as ``metrics.jsonl``, one scalar per figure.

    tensorboard --logdir <run_dir>/tensorboard
"""

from __future__ import annotations

from pathlib import Path

# a training record's figures -> their TensorBoard tags
TRAIN_SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr_dense",
    "sparse_lr": "train/lr_sparse",
    "samples_per_s": "train/samples_per_s",
}
CACHE_SCALARS = {
    "hit_rate_unique": "cache/hit_rate_unique",
    "rows_loaded_per_step": "cache/rows_loaded_per_step",
}
EVAL_SCALARS = {"auc": "val/auc", "logloss": "val/logloss", "ne": "val/ne"}


class TensorBoardLog:
    def __init__(self, run_dir: Path, first_step: int):
        """Event files under ``run_dir/tensorboard``; a resumed run (``first_step`` > 0) hides what the
        killed run wrote after its checkpoint (TensorBoard's ``purge_step``)."""
        from torch.utils.tensorboard import SummaryWriter  # ~1 s of imports, only when asked for

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step or None)

    def write(self, record: dict) -> None:
        """A ``metrics.jsonl`` record: a training step's, or an evaluation's (``val``)."""
        step = record["step"]
        for key, tag in TRAIN_SCALARS.items():
            if key in record:
                self.writer.add_scalar(tag, record[key], step)
        for key, tag in CACHE_SCALARS.items():
            if key in record.get("cache", {}):
                self.writer.add_scalar(tag, record["cache"][key], step)
        for key, tag in EVAL_SCALARS.items():
            if key in record.get("val", {}):
                self.writer.add_scalar(tag, record["val"][key], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
