"""What a run shows and records as it trains (rank 0): the progress bar, ``metrics.jsonl`` (one JSON
record per logged step and per evaluation) and TensorBoard's event files (``train.tensorboard``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from dlrm_cache.train.tensorboard_log import TensorBoardLog
from dlrm_cache.train.train_state import keep_metrics_until

# the cache figures a record and the summary keep, and each table's
CACHE_FIGURES = ("policy", "ratio", "hit_rate_unique", "rows_loaded", "rows_touched", "rows_from_host",
                 "bytes_h2d", "bytes_d2h", "warmup_rows", "bookkeeping_s", "disk_read_bytes",
                 "disk_write_bytes", "disk_read_bytes_per_row_loaded",
                 "disk_write_bytes_per_row_written")  # fmt: skip
TABLE_FIGURES = ("capacity", "rows", "rows_loaded", "rows_touched")


class RunLog:
    def __init__(self, run_dir: Path, lead: bool, first_step: int, total: int, tensorboard: bool,
                 resumed: bool):  # fmt: skip
        """``lead``: this rank writes (the others keep only the counters); ``resumed``: the records a
        killed run wrote after ``first_step`` are dropped, else an old ``metrics.jsonl`` is replaced."""
        self.path, self.lead = run_dir / "metrics.jsonl", lead
        self.evaluated: set[int] = set()  # steps whose evaluation is on record (a resumed run's)
        if lead and resumed:
            kept = keep_metrics_until(self.path, first_step)
            self.evaluated = {r["step"] for r in kept if "val" in r}
        elif lead:
            self.path.unlink(missing_ok=True)
        self.bar = tqdm(total=total, initial=first_step, desc="dlrm-train", unit="step", disable=not lead)
        self.metrics = self.board = None
        if lead:
            self.metrics = self.path.open("a")
            self.board = TensorBoardLog(run_dir, first_step) if tensorboard else None
        self.t_start, self.samples = time.perf_counter(), 0
        self.logged_step, self.loaded_before = first_step, 0  # rows loaded per step between logged steps

    def stepped(self, samples: int) -> None:
        self.samples += samples
        self.bar.update(1)

    def log_step(self, step: int, epoch: int, loss: float, lrs: tuple[float, float], stats: dict) -> None:
        """A logged training step: its loss, learning rates (dense, sparse), samples/s and cache figures."""
        rate = self.samples_per_s()
        per_step = (stats["rows_loaded"] - self.loaded_before) / (step - self.logged_step)
        self.logged_step, self.loaded_before = step, stats["rows_loaded"]
        self.write({"step": step, "epoch": epoch, "loss": loss, "lr": lrs[0], "sparse_lr": lrs[1],
                    "samples_per_s": rate,
                    "cache": {**cache_summary(stats), "rows_loaded_per_step": per_step}})  # fmt: skip
        self.bar.set_postfix(loss=f"{loss:.4f}", sps=f"{rate:,.0f}", hit=f"{stats['hit_rate_unique']:.3f}")

    def log_eval(self, step: int, evaluated: dict) -> None:
        """An evaluation's record, unless the run this one resumes has it already (the same model)."""
        if step not in self.evaluated:
            self.evaluated.add(step)
            self.write({"step": step, "val": evaluated})

    def write(self, record: dict) -> None:
        if self.metrics:
            self.metrics.write(json_text(record) + "\n")
            self.metrics.flush()
        if self.board:
            self.board.write(record)

    def samples_per_s(self) -> float:
        seconds = time.perf_counter() - self.t_start
        return self.samples / seconds if seconds else 0.0

    def close(self) -> None:
        self.bar.close()
        if self.metrics:
            self.metrics.close()
        if self.board:
            self.board.close()


def json_text(value, indent: int | None = None) -> str:
    """``value`` as strict JSON: a figure that is not a number (an undefined AUC) is null."""
    return json.dumps(_finite(value), indent=indent, allow_nan=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def cache_summary(stats: dict) -> dict:
    """The figures of the caches' ``stats()`` a record and the summary keep."""
    tables = {n: {k: t[k] for k in TABLE_FIGURES} for n, t in stats["tables"].items()}
    return {**{k: stats[k] for k in CACHE_FIGURES}, "tables": tables}
