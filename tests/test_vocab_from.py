"""dlrm-preprocess vocab_from=...: new data encoded with a trained dataset's ids, against an independent
line-by-line reference (the vocabulary rebuilt from the training TSV itself, not read from Parquet)."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from test_preprocess import assert_rows_equal, read_split, reference, synth

from dlrm_cache.config import ConfigError, DatasetConfig, PreprocessOptions, PreprocessRunConfig
from dlrm_cache.data.preprocess import preprocess


def encode(inputs, out, vocab_from, all_into=None, dataset=None, **opts):
    cfg = PreprocessRunConfig(
        input=[str(i) for i in inputs],
        output_dir=str(out),
        vocab_from=str(vocab_from),
        all_into=all_into,
        dataset=dataset or DatasetConfig(),
        preprocess=PreprocessOptions(progress=False, **opts),
    )
    return preprocess(cfg)


def trained(tmp_path, min_count=3, max_ind_range=0):
    """A training TSV, its dataset (every line train) and the reference vocabularies of it."""
    src = synth(tmp_path / "train.txt", rows=3000, seed=1)
    cfg = PreprocessRunConfig(
        input=[str(src)],
        output_dir=str(tmp_path / "trained"),
        all_into="train",
        preprocess=PreprocessOptions(progress=False, min_count=min_count, max_ind_range=max_ind_range),
    )
    lines = src.read_text().splitlines()
    if max_ind_range:
        lines = [hashed(line, max_ind_range) for line in lines]
    _, vocabs = reference(lines, len(lines), min_count)
    return preprocess(cfg), vocabs


def hashed(line, modulus):
    """The reference's max_ind_range: a present value int(hex, 16) % modulus, as 8 hex digits."""
    f = line.split("\t")
    n = len(f) - 26
    return "\t".join(f[:n] + [f"{int(v, 16) % modulus:08x}" if v else "" for v in f[n:]])


def expected(lines, vocabs, labeled=True):
    """Each new line's row: the trained ids, unseen and dropped values -> the rare id."""
    rows = []
    for line in lines:
        f = line.split("\t") if labeled else ["-1", *line.split("\t")]
        row, _ = reference(["\t".join(f)], 0)
        row = row[0]
        for j in range(26):
            row[f"cat_{j}"] = vocabs[j].get(f[14 + j], vocabs[j][None])
        rows.append(row)
    return rows


def test_new_rows_get_the_trained_ids_unseen_and_dropped_values_the_rare_id(tmp_path):
    source, vocabs = trained(tmp_path)
    new = synth(tmp_path / "new.txt", rows=2000, seed=2)
    out = encode([new], tmp_path / "encoded", source, all_into="test")
    lines = new.read_text().splitlines()
    want = expected(lines, vocabs)
    got = read_split(out, "test")
    assert_rows_equal(got, want)
    assert read_split(out, "train") == [] and read_split(out, "val") == []
    meta, source_meta = (json.loads((d / "metadata.json").read_text()) for d in (out, source))
    assert meta["vocab_sizes"] == source_meta["vocab_sizes"] and meta["rare_ids"] == source_meta["rare_ids"]
    assert meta["vocab_from"]["path"] == str(source.resolve())
    # both kinds of rare occur: values never seen in train, and values seen fewer than min_count times
    train_values = [
        {line.split("\t")[14 + j] for line in (tmp_path / "train.txt").read_text().splitlines()}
        for j in range(26)
    ]
    fields = [line.split("\t") for line in lines]
    unseen = sum(f[14 + j] not in train_values[j] for f in fields for j in range(26))
    dropped = sum(
        f[14 + j] in train_values[j] and f[14 + j] not in vocabs[j] for f in fields for j in range(26)
    )
    assert unseen > 100 and dropped > 100
    for c in ("cat_0", "cat_25"):  # the same vocabulary, written again
        assert pq.read_table(out / "vocab" / f"{c}.parquet").equals(
            pq.read_table(source / "vocab" / f"{c}.parquet")
        )
    # the same command again is a no-op
    mtime = (out / "metadata.json").stat().st_mtime_ns
    encode([new], tmp_path / "encoded", source, all_into="test")
    assert (out / "metadata.json").stat().st_mtime_ns == mtime


def test_unlabeled_input_split_like_any_dataset(tmp_path):
    source, vocabs = trained(tmp_path, min_count=1)
    new = synth(tmp_path / "test.txt", rows=1400, seed=3, labeled=False)
    out = encode([new], tmp_path / "encoded", source)
    rows = read_split(out, "train") + read_split(out, "val") + read_split(out, "test")
    assert [len(read_split(out, s)) for s in ("train", "val", "test")] == [1200, 100, 100]
    assert_rows_equal(rows, expected(new.read_text().splitlines(), vocabs, labeled=False))
    assert json.loads((out / "metadata.json").read_text())["labeled"] == [False]


def test_the_vocabularies_hashing_is_used_and_another_one_refused(tmp_path):
    source, vocabs = trained(tmp_path, min_count=1, max_ind_range=997)
    new = synth(tmp_path / "new.txt", rows=1000, seed=4)
    out = encode([new], tmp_path / "encoded", source, all_into="val")
    lines = [hashed(line, 997) for line in new.read_text().splitlines()]
    assert_rows_equal(read_split(out, "val"), expected(lines, vocabs))
    assert json.loads((out / "metadata.json").read_text())["max_ind_range"] == 997
    with pytest.raises(ValueError, match="max_ind_range=1000, but vocab_from=.* max_ind_range=997"):
        encode([new], tmp_path / "other", source, max_ind_range=1000)
    assert not (tmp_path / "other").exists()


def test_a_folder_that_is_not_a_dataset_is_refused_and_nothing_written(tmp_path):
    source, _ = trained(tmp_path, min_count=1)
    new = synth(tmp_path / "new.txt", rows=500, seed=5)
    with pytest.raises(FileNotFoundError, match="vocab_from=.*nowhere: no such folder"):
        encode([new], tmp_path / "a", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a dlrm-preprocess output"):
        encode([new], tmp_path / "a", tmp_path / "empty")
    (source / "vocab" / "cat_7.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="cat_7.parquet: not a readable vocabulary"):
        encode([new], tmp_path / "a", source)
    with pytest.raises(ValueError, match="overlap"):
        encode([new], source / "inside", source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new.txt", "train.txt", "trained"]
    with pytest.raises(ConfigError, match="preprocess.min_count=2: expected to be left out with vocab_from"):
        PreprocessRunConfig(
            input="x", output_dir="y", vocab_from=str(source), preprocess=PreprocessOptions(min_count=2)
        )


def test_cli_encodes_and_reports_a_bad_vocab_from_in_one_line(tmp_path):
    source, _ = trained(tmp_path, min_count=1)
    new = synth(tmp_path / "new.txt", rows=300, seed=6)
    cmd = [sys.executable, "-m", "dlrm_cache.cli.preprocess", f"input={new}", "preprocess.progress=false"]
    ok = subprocess.run(
        [*cmd, f"output_dir={tmp_path / 'enc'}", f"vocab_from={source}", "all_into=test"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(read_split(tmp_path / "enc", "test")) == 300
    bad = subprocess.run(
        [*cmd, f"output_dir={tmp_path / 'b'}", f"vocab_from={new}"], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"dlrm-preprocess: error: vocab_from={new}: no such folder"]
