"""A table is never held twice in host memory: at start-up, at a checkpoint, on resuming, on export.

Each command runs in a child process that reports its own peak resident memory; a run over a table of
2M rows (dim 128 and row-wise Adagrad's state: 0.98 GB) must peak less than 1.5 tables above the same
run over small tables (a second copy would be 2): the table, plus the chunk of rows it is initialised
a piece at a time in (2^18 rows, weights and the rows written: 0.26 GB at dim 128).
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlrm_cache.data.default_dataset import synthetic_dataset

ROWS = 2_000_000
DIM = 128
TABLE_MB = ROWS * (DIM + 1) * 4 / 2**20  # weights and row-wise Adagrad's state
PEAK = (
    "import resource, runpy, sys\n"
    "sys.argv = sys.argv[1:]\n"
    "try:\n"
    "    runpy.run_module(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as e:\n"
    "    assert not e.code, e.code\n"
    "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


def peak_mb(module: str, *args: str) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", PEAK, module, *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("peak_kb")[-1]) / 1024


def with_a_large_table(small, folder):
    """``small`` with ``cat_0``'s table grown to ``ROWS`` rows (its ids stay what they were; its train
    counts still sum to the train rows)."""
    shutil.copytree(small, folder)
    meta = json.loads((folder / "metadata.json").read_text())
    meta["vocab_sizes"]["cat_0"] = ROWS
    (folder / "metadata.json").write_text(json.dumps(meta))
    counts = np.zeros(ROWS, dtype=np.int64)
    counts[: meta["rows"]["train"]] = 1
    vocab = pa.table({"id": np.arange(ROWS), "raw": pa.nulls(ROWS, pa.string()),
                      "is_rare": np.zeros(ROWS, dtype=bool), "train_count": counts})  # fmt: skip
    pq.write_table(vocab, folder / "vocab" / "cat_0.parquet")
    return folder


@pytest.mark.slow  # several commands over a 0.98 GB table
def test_a_large_table_is_held_once_at_start_up_checkpoint_resume_and_export(tmp_path):
    small = synthetic_dataset(tmp_path / "data", 20_000, 0.002, progress=False)
    large = with_a_large_table(small, tmp_path / "large")
    model = [f"model.embedding_dim={DIM}", f"model.dense_arch_layer_sizes=[64,{DIM}]"]
    common = [*model, "train.batch_size=512", "train.tensorboard=false", "train.checkpoint_every=2"]
    train = "dlrm_cache.cli.train"
    base = peak_mb(
        train, f"data.path={small}", *common, "train.max_steps=4", f"hydra.run.dir={tmp_path / 's'}"
    )
    run = tmp_path / "run"
    first = peak_mb(train, f"data.path={large}", *common, "train.max_steps=4", f"hydra.run.dir={run}")
    resumed = peak_mb(train, f"data.path={large}", *common, "train.max_steps=6", "train.resume=true",
                      f"hydra.run.dir={run}")  # fmt: skip
    exported = peak_mb("dlrm_cache.cli.export", f"run_dir={run}", f"output={tmp_path / 'export'}")
    for what, peak in [("start-up and checkpoints", first), ("resume", resumed), ("export", exported)]:
        assert peak - base < 1.5 * TABLE_MB, (
            f"{what}: {peak - base:.0f} MB above small tables, the table is {TABLE_MB:.0f}"
        )
    assert first - base > 0.8 * TABLE_MB  # the table itself is measured
