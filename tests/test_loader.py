"""The Parquet loader: every row once per epoch, global batches split across ranks, seeded shuffle."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dlrm_cache.config import MULTI_HOT_MLPERF
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.loader import ParquetBatches


def _dataset(tmp_path):
    return synthetic_dataset(tmp_path, 7000, 0.001, row_group_rows=1000, progress=False)


def _rows(batches):
    return torch.cat(
        [
            torch.cat([b.dense_features, b.sparse_features.values().view(26, -1).t().float()], 1)
            for b in batches
        ]
    )


def test_ranks_split_each_global_batch_and_shuffle_is_seeded(tmp_path):
    root = _dataset(tmp_path)
    whole = list(ParquetBatches(root, "train", 256).batches(0))
    assert len(whole) == 6000 // 256 and all(len(b.labels) == 256 for b in whole)
    ranks = [list(ParquetBatches(root, "train", 256, rank=r, world_size=2).batches(0)) for r in range(2)]
    for b, b0, b1 in zip(whole, *ranks, strict=True):
        assert torch.equal(torch.cat([b0.labels, b1.labels]), b.labels)
        assert torch.equal(_rows([b0, b1]), _rows([b]))
    one = list(ParquetBatches(root, "train", 256, shuffle=True, seed=3).batches(0))
    again = list(ParquetBatches(root, "train", 256, shuffle=True, seed=3).batches(0))
    other_epoch = list(ParquetBatches(root, "train", 256, shuffle=True, seed=3).batches(1))
    assert torch.equal(_rows(one), _rows(again))
    assert not torch.equal(_rows(one), _rows(whole)) and not torch.equal(_rows(one), _rows(other_epoch))
    # a shuffled epoch holds the same rows (those not left in the last partial batch)
    assert len(_rows(one)) == len(_rows(whole))


def test_eval_split_keeps_the_last_partial_batch_and_skip_resumes(tmp_path):
    root = _dataset(tmp_path)
    val = ParquetBatches(root, "val", 256, drop_last=False)
    sizes = [len(b.labels) for b in val.batches(0)]
    assert sum(sizes) == 500 and sizes[-1] == 500 % 256 and len(val) == len(sizes)
    train = ParquetBatches(root, "train", 256)
    tail = list(train.batches(0, skip=5))
    assert torch.equal(_rows(tail), _rows(list(train.batches(0))[5:]))


def test_padded_shares_give_every_rank_the_same_rows_and_mark_the_padding(tmp_path):
    root = _dataset(tmp_path)
    whole = list(ParquetBatches(root, "val", 256, drop_last=False).batches(0))
    ranks = [
        list(
            ParquetBatches(root, "val", 256, rank=r, world_size=8, drop_last=False, pad_shares=True).batches(
                0
            )
        )
        for r in range(8)
    ]
    assert len(whole[-1].labels) % 8  # a partial last batch that needs padding
    for b, *shares in zip(whole, *ranks, strict=True):
        assert len({len(s.labels) for s in shares}) == 1  # equal shares
        real = [s.labels >= 0 for s in shares]
        kept = [_rows([s])[m] for s, m in zip(shares, real, strict=True)]
        assert torch.equal(torch.cat(kept), _rows([b]))  # every row once, in order; padding marked -1
        assert torch.equal(torch.cat([s.labels[m] for s, m in zip(shares, real, strict=True)]), b.labels)


def test_an_id_beyond_its_table_is_refused_from_the_footer_before_any_batch(tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(_dataset(tmp_path), root)
    part = sorted((root / "train").glob("part-*.parquet"))[0]
    t = pq.read_table(part)
    ids = t.column("cat_3").to_numpy().copy()
    rows = json.loads((root / "metadata.json").read_text())["vocab_sizes"]["cat_3"]
    ids[1500] = rows
    pq.write_table(
        t.set_column(t.schema.get_field_index("cat_3"), "cat_3", pa.array(ids)), part, row_group_size=1000
    )
    with pytest.raises(
        ValueError, match=rf"part-00000.parquet: row group 1: cat_3 holds id {rows}, beyond its table"
    ):
        ParquetBatches(root, "train", 256)


READ_AND_EXIT = """
import sys
from pathlib import Path
from dlrm_cache.data.loader import ParquetBatches
epoch = ParquetBatches(Path(sys.argv[1]), "train", int(sys.argv[2])).batches(0)
next(epoch)  # the producer goes on reading ahead, inside pyarrow, as the interpreter exits
"""


@pytest.mark.slow  # six processes
def test_a_process_exits_cleanly_while_an_epoch_is_still_being_read(tmp_path):
    """An epoch left unfinished (its generator still referenced) is stopped before the interpreter
    exits: its producer thread, still inside pyarrow, aborted the process about one exit in two."""
    root = synthetic_dataset(tmp_path, 60_000, 0.001, row_group_rows=6_000, progress=False)
    for _ in range(6):
        done = subprocess.run(
            [sys.executable, "-c", READ_AND_EXIT, str(root), "6000"], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-500:]


_READ_AGAIN = """
import resource, sys, time
if sys.argv[2] == "kept":
    from dlrm_cache.data.arrow_memory import keep_decoded_memory
    keep_decoded_memory()
import pyarrow.parquet as pq
file = pq.ParquetFile(sys.argv[1])
file.read_row_group(0)  # the first read faults its pages in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    time.sleep(0.3)  # a batch's work between row groups: mimalloc returns what was freed meanwhile
    file.read_row_group(0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_kept_decoded_memory_is_not_faulted_in_again_for_each_row_group(tmp_path):
    if pa.default_memory_pool().backend_name != "mimalloc":
        pytest.skip(f"pyarrow allocates with {pa.default_memory_pool().backend_name}, not mimalloc")
    path = tmp_path / "bags.parquet"
    rng = np.random.default_rng(0)
    columns = {}
    for j, size in enumerate(MULTI_HOT_MLPERF):  # a multi-hot row group's buffers, of every size
        ids = rng.integers(0, 400_000, (32_768, size), dtype=np.int32)
        columns[f"cat_{j}"] = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * size), len(ids),
                                                                   [None, pa.py_buffer(ids)])  # fmt: skip
    pq.write_table(pa.table(columns), path)

    def faults(how: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "MIMALLOC_PURGE_DELAY"}
        cmd = [sys.executable, "-c", _READ_AGAIN, str(path), how]
        return int(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)

    returned, kept = faults("returned"), faults("kept")
    assert kept * 4 < returned, (kept, returned)


def test_the_train_command_loads_no_pyarrow_before_its_setting():
    code = "import sys, dlrm_cache.cli.train; print('pyarrow' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "False"
