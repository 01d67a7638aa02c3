"""Buffers reused once nothing holds them: never while a tensor (a view too) still refers to them."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from test_multi_hot import bag_array

from dlrm_cache.criteo import CAT_COLUMNS
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.loader import ParquetBatches
from dlrm_cache.reused_buffers import ReusedBuffers


def test_a_buffer_is_reused_only_once_nothing_refers_to_it():
    buffers = ReusedBuffers(torch.int64)
    a = buffers.take(100)
    a.fill_(7)
    b = buffers.take(100)  # a is held: fresh memory
    assert b.data_ptr() != a.data_ptr() and len(buffers) == 2
    part = a[10:20]  # a view of a's memory keeps it
    first = a.data_ptr()
    del a
    c = buffers.take(50)
    assert c.data_ptr() not in (first, b.data_ptr()) and torch.equal(part, torch.full((10,), 7))
    del part, c
    d = buffers.take(80)
    assert d.data_ptr() == first and len(buffers) == 3  # reused, nothing more allocated
    del d
    e = buffers.take(1000)  # larger than any: a buffer nothing holds is replaced, with room to spare
    assert len(e) == 1000 and len(buffers) == 3
    grown = e.data_ptr()
    del e
    f = buffers.take(1200)
    assert f.data_ptr() == grown and len(buffers) == 3


def _ids_from_parquet(root, rows: int) -> dict:
    """Per feature, the first ``rows`` rows' bag lengths and ids, read straight from the Parquet parts
    (the oracle)."""
    table = pa.concat_tables(
        pq.read_table(p, columns=CAT_COLUMNS) for p in sorted((root / "train").glob("*.parquet"))
    )
    sizes = json.loads((root / "metadata.json").read_text())["multi_hot_sizes"]
    out = {}
    for c in CAT_COLUMNS:
        col = table.column(c).combine_chunks().slice(0, rows)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            out[c] = (pc.list_value_length(col).to_numpy(), col.flatten().to_numpy().astype(np.int64))
        elif pa.types.is_fixed_size_binary(col.type):
            bags = bag_array(col, sizes[c])
            out[c] = (np.full(rows, sizes[c]), bags.reshape(-1).astype(np.int64))
        else:
            out[c] = (np.ones(rows, dtype=np.int64), col.to_numpy().astype(np.int64))
    return out


def _ids_of(batches) -> dict:
    per_key = [b.sparse_features.to_dict() for b in batches]
    return {
        c: (
            torch.cat([d[c].lengths() for d in per_key]).numpy(),
            torch.cat([d[c].values() for d in per_key]).numpy(),
        )
        for c in CAT_COLUMNS
    }


def test_batches_kept_or_dropped_hold_the_ids_of_the_parquet_parts(tmp_path, bags):
    one_hot = synthetic_dataset(tmp_path, 3000, 0.001, row_group_rows=700, progress=False)
    for root in (one_hot, bags):
        loader = ParquetBatches(root, "train", 512)
        want = _ids_from_parquet(root, loader.rows // 512 * 512)
        dropped: dict = {c: ([], []) for c in CAT_COLUMNS}
        for b in loader.batches(0):  # each batch let go before the next: its buffer is reused
            for c, (lengths, ids) in _ids_of([b]).items():
                dropped[c][0].append(lengths)
                dropped[c][1].append(ids)
        kept = _ids_of(list(loader.batches(0)))  # all held at once: none reused
        for c in CAT_COLUMNS:
            for got in (kept[c], tuple(np.concatenate(x) for x in dropped[c])):
                assert np.array_equal(got[0], want[c][0]) and np.array_equal(got[1], want[c][1]), c
