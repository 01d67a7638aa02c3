"""Multi-hot data (preprocess.multi_hot_*): the bags against an independent expansion written from the
definition, the same bytes out of core, vocab_from, the loader's bags of any length, and bad input."""

import json
import logging
import math
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_out_of_core import outputs
from test_preprocess import run, synth

from dlrm_cache.config import (
    MULTI_HOT_MLPERF,
    ConfigError,
    DataConfig,
    PreprocessOptions,
    PreprocessRunConfig,
)
from dlrm_cache.criteo import CAT_COLUMNS
from dlrm_cache.data import held_lookups, memory_budget
from dlrm_cache.data.loader import ParquetBatches
from dlrm_cache.data.multi_hot import MultiHot
from dlrm_cache.data.preprocess import preprocess

SIZES = list(MULTI_HOT_MLPERF)
MASK = (1 << 64) - 1


def bag_array(column: pa.ChunkedArray | pa.Array, size: int) -> np.ndarray:
    """A column of fixed-size binary bags as (rows, size) ids, decoded value by value as
    docs/preprocess.md defines them (little-endian integers of the value's bytes / size)."""
    raw = b"".join(column.to_pylist())
    return np.frombuffer(raw, dtype=f"<i{column.type.byte_width // size}").reshape(len(column), size)


def read_bags(out, split) -> list[dict]:
    """A split's rows, each bag as a list of ids."""
    table = pq.read_table(sorted((out / split).glob("part-*.parquet")))
    sizes = json.loads((out / "metadata.json").read_text())["multi_hot_sizes"]
    rows = table.drop_columns(CAT_COLUMNS).to_pylist()
    for c in CAT_COLUMNS:
        for row, bag in zip(rows, bag_array(table.column(c), sizes[c]).tolist(), strict=True):
            row[c] = bag
    return rows


def splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def draw(seed: int, feature: int, position: int, slot: int, rows: int, distribution: str) -> int:
    """Draw ``slot`` of the id at dictionary ``position``, as docs/preprocess.md defines it."""
    h = splitmix64(((position << 16) | slot) ^ splitmix64(seed * 1_000_003 + feature))
    if distribution == "uniform":
        return h % rows
    u = (h >> 11) * 2.0**-53
    return int(math.fmod(math.floor(math.expm1(-math.log1p(-u) / 0.25)), rows))


def expected_rows(lines, train_end, sizes, distribution, seed, min_count=1, max_ind_range=0):
    """Every row's bags and every feature's train counts, from the TSV lines, in plain Python."""
    rows = [line.rstrip("\n").split("\t") for line in lines]

    def value(text: str) -> int:
        if not text:
            return -1
        return int(text, 16) % max_ind_range if max_ind_range else int(text, 16)

    bags_of, counts_of = [], []
    for f in range(26):
        seen = Counter(value(r[14 + f]) for r in rows[:train_end])
        kept = sorted(v for v, n in seen.items() if n >= min_count)
        position = {v: q for q, v in enumerate(kept)}  # dictionary order; the rare bucket last
        rare = len(kept)
        own = [seen[v] for v in kept] + [sum(n for v, n in seen.items() if n < min_count)]
        extra = {
            q: [draw(seed, f, q, j, rare + 1, distribution) for j in range(1, sizes[f])]
            for q in range(rare + 1)
        }
        total = list(own)
        for q, drawn in extra.items():
            for d in drawn:
                total[d] += own[q]
        rank = sorted(range(rare + 1), key=lambda q: (-total[q], kept[q] if q < rare else math.inf))
        new_id = {q: i for i, q in enumerate(rank)}
        bags = {}
        for r in rows:
            q = position.get(value(r[14 + f]), rare)
            bags[r[14 + f]] = [new_id[q]] + [new_id[d] for d in extra[q]]
        bags_of.append(bags)
        counts_of.append([total[q] for q in rank])
    mapped = [{c: bags_of[f][r[14 + f]] for f, c in enumerate(CAT_COLUMNS)} for r in rows]
    return mapped, counts_of


@pytest.mark.parametrize(
    "distribution,min_count,max_ind_range", [("uniform", 1, 0), ("pareto", 2, 300)], ids=["uniform", "pareto"]
)
def test_bags_match_an_independent_expansion(tmp_path, distribution, min_count, max_ind_range):
    src = synth(tmp_path / "train.txt", rows=1400)
    multi = {"multi_hot_sizes": SIZES, "multi_hot_distribution": distribution, "multi_hot_seed": 7}
    out = run([src], tmp_path / "out", min_count=min_count, max_ind_range=max_ind_range, **multi)
    lines = src.read_text().splitlines()
    expected, counts = expected_rows(lines, 1200, SIZES, distribution, 7, min_count, max_ind_range)
    got = [row for split in ("train", "val", "test") for row in read_bags(out, split)]
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert {c: g[c] for c in CAT_COLUMNS} == e, i
    for f, c in enumerate(CAT_COLUMNS):
        assert pq.read_table(out / "vocab" / f"{c}.parquet").column("train_count").to_pylist() == counts[f], c
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["multi_hot_sizes"] == dict(zip(CAT_COLUMNS, SIZES, strict=True))
    assert sum(len(got[0][c]) for c in CAT_COLUMNS) == 214


def test_a_multi_hot_dataset_of_list_columns_is_not_taken_for_this_runs_output(tmp_path):
    src = synth(tmp_path / "train.txt", rows=600)
    out = run([src], tmp_path / "out", multi_hot_sizes=SIZES)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["bag_format"] == "fixed_size_binary"
    stamp = (out / "metadata.json").stat().st_mtime_ns
    run([src], tmp_path / "out", multi_hot_sizes=SIZES)
    assert (out / "metadata.json").stat().st_mtime_ns == stamp, "the same run again does nothing"
    del meta["bag_format"]  # as written when bags were list columns
    (out / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(FileExistsError, match="already holds a different dataset; pass overwrite=true"):
        run([src], tmp_path / "out", multi_hot_sizes=SIZES)


def test_draws_follow_their_distribution():
    positions = np.arange(200_000)
    uniform = MultiHot((11,) * 26, "uniform", 0).draws(3, positions, 10).reshape(-1)
    shares = np.bincount(uniform, minlength=10) / len(uniform)
    assert np.abs(shares - 0.1).max() < 0.003
    pareto = MultiHot((11,) * 26, "pareto", 0).draws(3, positions, 1000).reshape(-1)
    shares = np.bincount(pareto, minlength=1000) / len(pareto)
    assert shares[0] == pytest.approx(1 - 2**-0.25, abs=0.003)  # P(Pareto(0.25) < 1)
    assert shares[:10].sum() == pytest.approx(1 - 11**-0.25, abs=0.005)  # P(Pareto(0.25) < 10): 0.45
    again = MultiHot((11,) * 26, "pareto", 0).draws(3, positions[:50], 1000)
    other_seed = MultiHot((11,) * 26, "pareto", 1).draws(3, positions[:50], 1000)
    assert np.array_equal(again, pareto.reshape(len(positions), 10)[:50])
    assert not np.array_equal(again, other_seed)


def test_out_of_core_and_grouped_lookups_write_the_same_bytes(tmp_path, monkeypatch, caplog):
    src = synth(tmp_path / "train.txt", rows=3000)
    opts = {"multi_hot_sizes": SIZES, "multi_hot_distribution": "pareto", "min_count": 2, "workers": 1}
    in_memory = run([src], tmp_path / "mem", **opts)
    monkeypatch.setattr(memory_budget, "BYTES_PER_VALUE", 10**8)  # a few values per counter
    made = held_lookups.HeldLookups.__init__
    monkeypatch.setattr(held_lookups.HeldLookups, "__init__", lambda self, folder, _: made(self, folder, 0))
    with caplog.at_level(logging.INFO):
        bounded = run([src], tmp_path / "ooc", memory_gb=2, **opts)
    assert "out of core: the counts of 26 feature(s)" in caplog.text
    assert "applied in 26 groups of features" in caplog.text
    a, b = outputs(in_memory), outputs(bounded)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def test_vocab_from_expands_new_data_to_the_same_bags(tmp_path):
    src = synth(tmp_path / "train.txt", rows=1400)
    first = run([src], tmp_path / "first", multi_hot_sizes=SIZES, multi_hot_distribution="pareto")
    encoded = preprocess(
        PreprocessRunConfig(input=[str(src)], output_dir=str(tmp_path / "again"), vocab_from=str(first),
                            all_into="test", preprocess=PreprocessOptions(progress=False))
    )  # fmt: skip
    before = [row for split in ("train", "val", "test") for row in read_bags(first, split)]
    assert read_bags(encoded, "test") == before
    meta = json.loads((encoded / "metadata.json").read_text())
    assert meta["preprocess"]["multi_hot_distribution"] == "pareto" and meta["multi_hot_sizes"]
    with pytest.raises(
        ValueError,
        match=r"preprocess.multi_hot_sizes=\[2, 2, .*\], but vocab_from=.* made with multi_hot_sizes=\[3, 2",
    ):
        preprocess(
            PreprocessRunConfig(
                input=[str(src)], output_dir=str(tmp_path / "other"), vocab_from=str(first), all_into="test",
                preprocess=PreprocessOptions(progress=False, multi_hot_sizes=[2] * 26),
            )
        )  # fmt: skip


def test_bad_multi_hot_settings_are_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"^preprocess.multi_hot_sizes=\[1, 2\]: expected 26 bag sizes"):
        PreprocessOptions(multi_hot_sizes=[1, 2])
    with pytest.raises(ConfigError, match=r"^preprocess.multi_hot_sizes\[3\]=0: expected a bag size from 1"):
        PreprocessOptions(multi_hot_sizes=[1, 1, 1, 0] + [1] * 22)
    with pytest.raises(ConfigError, match=r"^preprocess.multi_hot_distribution='zipf': expected one of"):
        PreprocessOptions(multi_hot_distribution="zipf")
    with pytest.raises(ConfigError, match=r"^data.synthetic_multi_hot_sizes\[0\]=-1"):
        DataConfig(synthetic_multi_hot_sizes=[-1] + [1] * 25)


def _variable_bags(tmp_path):
    """A dataset in the documented format with bags of any length (empty ones too): a preprocessed
    dataset's metadata and vocabularies, its parts rewritten with bags of 0 to 4 ids."""
    src = synth(tmp_path / "train.txt", rows=2000)
    made = run([src], tmp_path / "made")
    root = tmp_path / "variable"
    shutil.copytree(made, root)
    meta = json.loads((root / "metadata.json").read_text())
    meta["multi_hot_sizes"] = dict.fromkeys(CAT_COLUMNS, 0)
    (root / "metadata.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for part in root.glob("*/part-*.parquet"):
        t = pq.read_table(part)
        for c in CAT_COLUMNS:
            n = t.num_rows
            lengths = rng.integers(0, 5, n)
            values = rng.integers(0, meta["vocab_sizes"][c], int(lengths.sum()))
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            bags = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))
            t = t.set_column(t.schema.get_field_index(c), c, bags)
        pq.write_table(t, part, row_group_size=500)
    return root


def test_bags_of_any_length_load_in_order_and_split_over_ranks(tmp_path):
    root = _variable_bags(tmp_path)
    whole = list(ParquetBatches(root, "train", 256).batches(0))
    rows = pq.read_table(sorted((root / "train").glob("part-*.parquet"))).to_pylist()
    for i, b in enumerate(whole):
        kjt = b.sparse_features.to_dict()
        for c in CAT_COLUMNS:
            got = [bag.tolist() for bag in torch.split(kjt[c].values(), kjt[c].lengths().tolist())]
            assert got == [r[c] for r in rows[i * 256 : (i + 1) * 256]], (i, c)
    assert any(0 in b.sparse_features.lengths().tolist() for b in whole)  # empty bags were read
    ranks = [
        list(ParquetBatches(root, "train", 256, rank=r, world_size=2, shuffle=True).batches(0))
        for r in (0, 1)
    ]
    shuffled = list(ParquetBatches(root, "train", 256, shuffle=True).batches(0))
    for b, b0, b1 in zip(shuffled, *ranks, strict=True):
        one, two = b.sparse_features.to_dict(), [x.sparse_features.to_dict() for x in (b0, b1)]
        for c in CAT_COLUMNS:
            assert torch.equal(one[c].values(), torch.cat([two[0][c].values(), two[1][c].values()]))
            assert torch.equal(one[c].lengths(), torch.cat([two[0][c].lengths(), two[1][c].lengths()]))


def test_fixed_size_bags_load_as_the_same_bags_written_as_lists(tmp_path):
    src = synth(tmp_path / "train.txt", rows=3000)
    fixed = run([src], tmp_path / "fixed", multi_hot_sizes=SIZES, row_group_rows=700)
    listed = tmp_path / "listed"
    shutil.copytree(fixed, listed)
    for part in listed.glob("*/part-*.parquet"):
        t = pq.read_table(part)
        for c, size in zip(CAT_COLUMNS, SIZES, strict=True):
            ids = bag_array(t.column(c), size).reshape(-1)
            offsets = pa.array(np.arange(0, len(ids) + 1, size, dtype=np.int32))
            t = t.set_column(t.schema.get_field_index(c), c, pa.ListArray.from_arrays(offsets, pa.array(ids)))
        pq.write_table(t, part, row_group_size=700)
    for kw in ({}, {"shuffle": True, "drop_last": False}, {"rank": 1, "world_size": 2, "shuffle": True}):
        a = list(ParquetBatches(fixed, "train", 300, **kw).batches(0))
        b = list(ParquetBatches(listed, "train", 300, **kw).batches(0))
        assert len(a) == len(b) > 3, kw
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.sparse_features.values(), y.sparse_features.values()), kw
            assert torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths()), kw
            assert torch.equal(x.dense_features, y.dense_features) and torch.equal(x.labels, y.labels)


def test_bags_that_disagree_with_the_metadata_are_refused_before_the_first_batch(tmp_path):
    src = synth(tmp_path / "train.txt", rows=2000)
    root = run([src], tmp_path / "bags", multi_hot_sizes=SIZES)
    part = root / "train" / "part-00000.parquet"
    t = pq.read_table(part)
    meta = json.loads((root / "metadata.json").read_text())

    def rewrite(column: str, bags: pa.Array):
        pq.write_table(t.set_column(t.schema.get_field_index(column), column, bags), part)

    short = pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * t.num_rows + 1, 2, dtype=np.int32)),
                                     pa.array(np.zeros(2 * t.num_rows, dtype=np.int32)))  # fmt: skip
    rewrite("cat_4", short)  # bags of 2, metadata says 6
    disagree = (
        r"part-00000.parquet: row group 0: cat_4 holds \d+ ids for \d+ rows, metadata.json says 6 a row"
    )
    with pytest.raises(ValueError, match=disagree):
        ParquetBatches(root, "train", 256)
    beyond = bag_array(t.column("cat_20"), 100).copy()
    beyond[0, 5] = meta["vocab_sizes"]["cat_20"]
    listed = pa.ListArray.from_arrays(pa.array(np.arange(0, beyond.size + 1, 100, dtype=np.int32)),
                                      pa.array(beyond.reshape(-1), pa.int32()))  # fmt: skip
    rewrite("cat_20", listed)  # a list column: its statistics say
    beyond_table = (
        rf"row group 0: cat_20 holds id {beyond[0, 5]}, beyond its table of {beyond[0, 5]} rows \(metadata"
    )
    with pytest.raises(ValueError, match=beyond_table):
        ParquetBatches(root, "train", 256)
    rewrite("cat_4", pa.array([bytes(8)] * t.num_rows, pa.binary(8)))
    narrow = (
        r"cat_4 is fixed_size_binary\[8\], but metadata.json says bags of 6 ids \(multi_hot_sizes\): "
        r"expected a list of integers \(24 or 48-byte binary\)"
    )
    with pytest.raises(ValueError, match=narrow):
        ParquetBatches(root, "train", 256)
    meta["multi_hot_sizes"] = None
    (root / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(
        ValueError, match=r"cat_0 is fixed_size_binary\[12\], but metadata.json says one id a row"
    ):
        ParquetBatches(root, "train", 256)


@pytest.mark.parametrize("bad", ["beyond", "negative", "null"])
def test_fixed_size_bags_with_bad_ids_are_refused_as_they_are_read(tmp_path, bad):
    src = synth(tmp_path / "train.txt", rows=2000)
    root = run([src], tmp_path / "bags", multi_hot_sizes=SIZES)
    part = root / "train" / "part-00000.parquet"
    t = pq.read_table(part)
    rows = bag_array(t.column("cat_20"), 100).copy()
    vocab = json.loads((root / "metadata.json").read_text())["vocab_sizes"]["cat_20"]
    rows[3, 7] = {"beyond": vocab, "negative": -2, "null": 0}[bad]
    values = [r.tobytes() for r in rows]
    if bad == "null":
        values[3] = None
    pq.write_table(
        t.set_column(t.schema.get_field_index("cat_20"), "cat_20", pa.array(values, pa.binary(400))), part
    )
    batches = ParquetBatches(root, "train", 256)  # statistics of bytes tell nothing: read, then refused
    said = {
        "beyond": rf"holds id {vocab}, beyond its table of {vocab} rows \(metadata.json vocab_sizes\)",
        "negative": rf"holds id -2, beyond its table of {vocab} rows",
        "null": "holds a null bag",
    }[bad]
    with pytest.raises(ValueError, match=rf"part-00000.parquet: row group 0: cat_20 {said}"):
        list(batches.batches(0))


def test_dlrm_synth_writes_a_multi_hot_dataset_and_refuses_settings_that_make_none(tmp_path):
    out = tmp_path / "mlperf"
    sizes = f"preprocess.multi_hot_sizes=[{','.join(map(str, SIZES))}]"
    synth_cli = [sys.executable, "-m", "dlrm_cache.cli.synth", "progress=false"]
    args = [*synth_cli, "format=parquet", "rows=3000", "cardinalities=terabyte", "cardinality_scale=0.0005",
            "preprocess.max_ind_range=20000", sizes, f"out={out}"]  # fmt: skip
    made = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    assert f"dlrm-synth: wrote the dataset {out}" in made.stdout
    meta = json.loads((out / "metadata.json").read_text())
    assert list(meta["multi_hot_sizes"].values()) == SIZES and meta["max_ind_range"] == 20000
    batch = next(iter(ParquetBatches(out, "train", 128).batches(0)))
    assert len(batch.sparse_features.values()) == 128 * 214
    assert [p.name for p in tmp_path.iterdir()] == ["mlperf"]  # the TSV it was made from is gone
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and again.stderr.strip().endswith(
        f"out={out} already exists (pass overwrite=true to replace it)"
    )
    text = subprocess.run([*synth_cli, sizes, f"out={tmp_path / 'x.txt'}"], capture_output=True, text=True)
    assert text.returncode == 2 and "preprocess.multi_hot_sizes=[3, 2, 1" in text.stderr
    assert "expected nothing: preprocess.* makes a dataset, with format=parquet" in text.stderr
    assert len(text.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.txt").exists()
