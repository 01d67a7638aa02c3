"""dlrm-preprocess against an independent, slow, line-by-line reference parse."""

import gzip
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dlrm_cache.config import DatasetConfig, PreprocessOptions, PreprocessRunConfig, SynthConfig
from dlrm_cache.criteo import LABELED_COLUMNS
from dlrm_cache.data import criteo_tsv, write_pass
from dlrm_cache.data import preprocess as preprocess_module
from dlrm_cache.data.criteo_tsv import BadLines, CriteoFormatError, read_chunks
from dlrm_cache.data.preprocess import preprocess
from dlrm_cache.data.synthetic import generate
from dlrm_cache.data.vocab import ValueCounter, Vocabulary
from dlrm_cache.native_build import NativeUnavailable

# real Criteo lines, where a copy is at hand (their licence keeps them out of the repository)
EXCERPT = Path(
    os.environ.get(
        "DLRM_CRITEO_EXCERPT",
        Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo_excerpt_100.tsv",
    )
)
PARSERS = ["native", "arrow"]  # criteo_parse.cpp and its pyarrow fallback


def synth(path, rows=3000, **kw):
    generate(SynthConfig(rows=rows, out=str(path), cardinality_scale=0.0005, progress=False, **kw))
    return path


def run(inputs, out, dataset=None, **opts):
    cfg = PreprocessRunConfig(
        input=[str(i) for i in inputs],
        output_dir=str(out),
        dataset=dataset or DatasetConfig(),
        preprocess=PreprocessOptions(progress=False, **opts),
    )
    return preprocess(cfg)


def read_split(out, split):
    return pq.read_table(sorted((out / split).glob("part-*.parquet"))).to_pylist()


def reference(lines, train_end, min_count=1):
    """The slow oracle: split by line, rank raw strings by train count (ties by hex value, the
    empty value as -1), rare bucket as +inf, and map every row."""
    rows = [line.split("\t") for line in lines]
    counters = [Counter(r[14 + j] for r in rows[:train_end]) for j in range(26)]
    vocabs = []
    for c in counters:
        kept = {v: n for v, n in c.items() if n >= min_count}
        rare = sum(n for n in c.values() if n < min_count)
        entries = [(-n, int(v, 16) if v else -1, v) for v, n in kept.items()] + [(-rare, math.inf, None)]
        entries.sort(key=lambda e: (e[0], e[1]))
        vocabs.append({e[2]: i for i, e in enumerate(entries)})
    mapped = []
    for r in rows:
        mapped.append(
            {
                "label": int(r[0]),
                **{
                    f"int_{j}": float(np.float32(math.log1p(max(int(r[1 + j]) if r[1 + j] else 0, 0))))
                    for j in range(13)
                },
                **{f"cat_{j}": vocabs[j].get(r[14 + j], vocabs[j][None]) for j in range(26)},
            }
        )
    return mapped, vocabs


def assert_rows_equal(got, expected):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        for k, v in e.items():
            if k.startswith("int_"):
                assert g[k] == pytest.approx(v, rel=1e-6), (i, k)
            else:
                assert g[k] == v, (i, k, g[k], v)


@pytest.mark.parametrize("parser", PARSERS)
@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("min_count", [1, 3])
def test_matches_an_independent_parse(tmp_path, gz, min_count, parser):
    src = synth(tmp_path / ("train.txt.gz" if gz else "train.txt"), gzip=gz)
    out = run([src], tmp_path / "out", min_count=min_count, chunk_mb=1, parser=parser)
    with gzip.open(src, "rt") if gz else open(src) as f:
        lines = f.read().splitlines()
    train_end = int(len(lines) * 6 / 7)
    val_end = train_end + (len(lines) - train_end) // 2
    expected, vocabs = reference(lines, train_end, min_count)
    assert_rows_equal(read_split(out, "train"), expected[:train_end])
    assert_rows_equal(read_split(out, "val"), expected[train_end:val_end])
    assert_rows_equal(read_split(out, "test"), expected[val_end:])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["rows"] == {"train": train_end, "val": val_end - train_end, "test": len(lines) - val_end}
    assert meta["vocab_sizes"] == {f"cat_{j}": len(v) for j, v in enumerate(vocabs)}
    assert meta["rare_ids"] == {f"cat_{j}": v[None] for j, v in enumerate(vocabs)}
    # the vocabulary files: id -> raw value and train count, hottest first
    vocab = pq.read_table(out / "vocab" / "cat_2.parquet").to_pydict()
    assert vocab["id"] == list(range(len(vocabs[2])))
    counts = vocab["train_count"]
    assert all(a >= b for a, b in zip(counts, counts[1:], strict=False)), (
        "ranked by count, rare bucket included"
    )
    for raw, new_id in vocabs[2].items():
        if raw:
            assert vocab["raw"][new_id] == raw
    assert pq.read_schema(out / "train" / "part-00000.parquet").field("cat_0").type == "int32"


def test_val_test_values_unseen_in_train_map_to_the_rare_id(tmp_path):
    src = synth(tmp_path / "train.txt", rows=2000)
    out = run([src], tmp_path / "out")
    meta = json.loads((out / "metadata.json").read_text())
    vocab = pq.read_table(out / "vocab" / "cat_2.parquet").to_pydict()
    seen = {r for r, rare in zip(vocab["raw"], vocab["is_rare"], strict=True) if not rare}
    lines = src.read_text().splitlines()
    tail = [line.split("\t")[16] for line in lines[int(len(lines) * 6 / 7) :]]
    unseen = [i for i, v in enumerate(tail) if v and v not in seen]
    assert unseen, "the generated data has val/test values unseen in train"
    ids = [r["cat_2"] for r in read_split(out, "val") + read_split(out, "test")]
    assert {ids[i] for i in unseen} == {meta["rare_ids"]["cat_2"]}


def test_terabyte_days_split_by_file_and_skew_report(tmp_path):
    days = generate(
        SynthConfig(
            rows=900,
            out=str(tmp_path / "tb"),
            layout="terabyte",
            days=3,
            gzip=True,
            cardinality_scale=0.0005,
            progress=False,
        )
    )
    out = run(
        [str(tmp_path / "tb" / "day_*.gz")],
        tmp_path / "out",
        dataset=DatasetConfig(name="criteo_1tb", split="last_file"),
    )
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["rows"] == {"train": 600, "val": 150, "test": 150}
    assert [Path(i["path"]).name for i in meta["inputs"]] == [d.name for d in days]
    skew = meta["skew"]
    assert skew["overall"][-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(skew["overall"], skew["overall"][1:], strict=False))
    assert (out / "stats" / "skew.png").stat().st_size > 1000
    # one process per day file gives exactly what one process gives
    single = run(
        [str(tmp_path / "tb" / "day_*.gz")],
        tmp_path / "one",
        dataset=DatasetConfig(split="last_file"),
        workers=1,
    )
    for split in ("train", "val", "test"):
        assert read_split(single, split) == read_split(out, split)
    assert json.loads((single / "metadata.json").read_text())["vocab_sizes"] == meta["vocab_sizes"]


@pytest.mark.skipif(not EXCERPT.is_file(), reason="no real-data excerpt: set DLRM_CRITEO_EXCERPT to its file")
def test_real_criteo_excerpt_parses_like_the_reference(tmp_path):
    out = run([EXCERPT], tmp_path / "out")  # read in place: its licence forbids copying it
    lines = EXCERPT.read_text().splitlines()
    train_end = int(len(lines) * 6 / 7)
    expected, _ = reference(lines, train_end)
    assert_rows_equal(read_split(out, "train") + read_split(out, "val") + read_split(out, "test"), expected)


def test_unlabeled_test_file_is_accepted_and_marked(tmp_path):
    src = synth(tmp_path / "test.txt", rows=700, labeled=False)
    out = run([src], tmp_path / "out")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["labeled"] == [False]
    assert {r["label"] for r in read_split(out, "train")} == {-1}


def _lines_with(tmp_path, line_no, field, value, rows=300):
    src = synth(tmp_path / "src.txt", rows=rows)
    lines = src.read_text().splitlines()
    parts = lines[line_no - 1].split("\t")
    if field is None:
        parts = parts[:-1]  # a field short
    else:
        parts[field] = value
    lines[line_no - 1] = "\t".join(parts)
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines) + "\n")
    return bad


@pytest.mark.parametrize(
    ("line_no", "field", "value", "message"),
    [
        (137, None, None, r"bad.txt:137: 39 fields, expected 40"),
        (52, 3, "12x", r"bad.txt:52: field int_2 is '12x', expected an integer or nothing"),
        (250, 20, "zz00aa11", r"bad.txt:250: field cat_6 is 'zz00aa11', expected 8 hex digits or nothing"),
        (9, 0, "2", r"bad.txt:9: field label is '2', expected 0 or 1"),
    ],
)
@pytest.mark.parametrize("parser", PARSERS)
def test_bad_line_names_file_line_and_field_and_writes_nothing(
    tmp_path, line_no, field, value, message, parser
):
    bad = _lines_with(tmp_path, line_no, field, value)
    with pytest.raises(CriteoFormatError, match=message):
        run([bad], tmp_path / "out", chunk_mb=1, parser=parser)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "src.txt"], "nothing half-written"


@pytest.mark.parametrize("parser", PARSERS)
def test_skip_mode_drops_and_reports_bad_lines(tmp_path, parser):
    bad = _lines_with(tmp_path, 137, None, None)
    out = run([bad], tmp_path / "out", on_bad_lines="skip", parser=parser)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["skipped_lines"]["count"] == 1
    assert meta["skipped_lines"]["first"] == [f"{bad}:137"]
    assert sum(meta["rows"].values()) == 299


@pytest.mark.parametrize("parser", PARSERS)
def test_empty_truncated_and_missing_inputs(tmp_path, parser):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CriteoFormatError, match="empty.txt: the file is empty"):
        run([empty], tmp_path / "out", parser=parser)
    gz = synth(tmp_path / "t.txt.gz", rows=5000, gzip=True)
    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    with pytest.raises(CriteoFormatError, match="cut.txt.gz: unreadable"):
        run([truncated], tmp_path / "out", parser=parser)
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        run([tmp_path / "nope.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rerun_is_a_no_op_and_a_different_dataset_is_refused(tmp_path):
    a = synth(tmp_path / "a.txt", rows=400)
    b = synth(tmp_path / "b.txt", rows=500, seed=1)
    out = run([a], tmp_path / "out")
    stamp = (out / "metadata.json").stat().st_mtime_ns
    run([a], tmp_path / "out")
    assert (out / "metadata.json").stat().st_mtime_ns == stamp, "the same run again does nothing"
    meta = json.loads((out / "metadata.json").read_text())
    del meta["preprocess"]["max_ind_range"]  # written before the option existed: its default then
    (out / "metadata.json").write_text(json.dumps(meta))
    stamp = (out / "metadata.json").stat().st_mtime_ns
    run([a], tmp_path / "out")
    assert (out / "metadata.json").stat().st_mtime_ns == stamp, "an older dataset of the same run is kept"
    with pytest.raises(FileExistsError, match="already holds a different dataset"):
        run([a], tmp_path / "out", max_ind_range=5)
    with pytest.raises(FileExistsError, match="already holds a different dataset; pass overwrite=true"):
        run([b], tmp_path / "out")
    cfg = PreprocessRunConfig(
        input=[str(b)], output_dir=str(out), overwrite=True, preprocess=PreprocessOptions(progress=False)
    )
    preprocess(cfg)
    assert json.loads((out / "metadata.json").read_text())["rows"]["train"] == int(500 * 6 / 7)


def test_cli_errors_exit_non_zero_with_the_location(tmp_path):
    bad = _lines_with(tmp_path, 52, 3, "12x")

    def cli(*args, env=None):
        command = [sys.executable, "-m", "dlrm_cache.cli.preprocess", f"input={bad}", *args]
        return subprocess.run(command, capture_output=True, text=True, check=False, env=env)

    r = cli(f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 2
    assert "bad.txt:52: field int_2" in r.stderr
    r = cli(f"output_dir={tmp_path / 'o'}", "preprocess.min_count=0")
    assert r.returncode == 2 and "preprocess.min_count=0" in r.stderr
    no_compiler = {**os.environ, "CXX": "no-such-compiler", "DLRM_CACHE_BUILD_DIR": str(tmp_path / "build")}
    r = cli(f"output_dir={tmp_path / 'o'}", "preprocess.parser=native", env=no_compiler)
    assert r.returncode == 2
    assert "dlrm-preprocess: error: preprocess.parser=native: no C++ compiler" in r.stderr
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


@pytest.mark.parametrize("pieces", [1, 4], ids=["one-piece", "four-threads"])
@pytest.mark.parametrize("on_bad_lines", ["skip", "error"])
def test_native_and_arrow_parsers_read_every_line_alike(tmp_path, on_bad_lines, pieces, monkeypatch):
    """Edge cases side by side: CRLF endings, negative and empty integers, upper-case and empty hex,
    39-field lines and bad values (skipped, or the first one raised), blocks that cut lines in two, a
    last line without its newline; blocks parsed whole or in four pieces at once."""
    if pieces > 1:
        monkeypatch.setattr(criteo_tsv, "_PIECE_BYTES", 512)
        monkeypatch.setattr(criteo_tsv.os, "cpu_count", lambda: pieces)
    src = _mixed_file(tmp_path, empty_lines=False)
    results = {}
    for parser in PARSERS:
        bad = BadLines()
        try:
            chunks = list(read_chunks(src, LABELED_COLUMNS, 4096, on_bad_lines, bad, parser=parser))
        except CriteoFormatError as e:
            results[parser] = str(e)
            continue
        results[parser] = (
            np.concatenate([c.label for c in chunks]).tolist(),
            np.concatenate([c.ints for c in chunks]).tolist(),
            np.concatenate([c.cats for c in chunks]).tolist(),
            np.concatenate([c.lines for c in chunks]).tolist(),
            bad.count,
            bad.first,
        )
    assert results["native"] == results["arrow"]
    if on_bad_lines == "skip":
        assert results["native"][4] == 4 and len(results["native"][3]) == 396
    else:
        assert "mixed.txt:151: 39 fields, expected 40" in results["native"]


def test_native_parser_counts_empty_lines_in_line_numbers(tmp_path):
    """Line numbers are what an editor shows, empty lines included (the arrow fallback cannot see
    the empty lines pyarrow drops; docs/preprocess.md says so)."""
    src = _mixed_file(tmp_path, empty_lines=True)  # an empty line after every 50th
    bad = BadLines()
    chunks = list(read_chunks(src, LABELED_COLUMNS, 4096, "skip", bad, parser="native"))
    lines = np.concatenate([c.lines for c in chunks])
    assert 2 not in lines and lines[:3].tolist() == [1, 3, 4]
    assert bad.first == [f"{src}:{151 + 3}", f"{src}:{201 + 4}", f"{src}:{251 + 5}", f"{src}:{301 + 6}"]


def _mixed_file(tmp_path, empty_lines):
    good = synth(tmp_path / "src.txt", rows=400).read_text().splitlines()
    lines = []
    for i, line in enumerate(good):
        f = line.split("\t")
        if i % 7 == 0:
            f[2], f[5] = "-42", ""
        if i % 11 == 0:
            f[20], f[30] = f[20].upper(), ""
        if i in (150, 300):
            f = f[:-1]  # 39 fields
        if i == 200:
            f[4] = "1.5"
        if i == 250:
            f[0] = "x"
        lines.append("\t".join(f) + ("\r" if i % 3 == 0 else ""))
        if empty_lines and i % 50 == 0:
            lines.append("")
    src = tmp_path / "mixed.txt"
    src.write_text("\n".join(lines))  # no final newline
    return src


def test_a_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    """The vocabularies and the skew plot are written on a thread while the splits are written: a
    failure in the splits waits for it, then removes everything."""
    src = synth(tmp_path / "train.txt", rows=2000)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(write_pass, "renumbered", broken)
    with pytest.raises(OSError, match="disk full"):
        run([src], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.txt"], "nothing half-written"


@pytest.mark.parametrize("wide", [False, True], ids=["hashes", "wider-values"])
def test_vocabulary_ranks_by_count_then_value(wide):
    """Ids by descending train count, ties by raw value, the rare bucket after the kept values of its
    count: against a plain sort of (-count, value) tuples (one 64-bit key for raw hashes; lexsort for
    values that do not fit it)."""
    rng = np.random.default_rng(3)
    values = np.unique(np.concatenate([[-1], rng.integers(0, 2**40 if wide else 2**32, 3000)]))
    counts = rng.integers(3, 8, len(values))
    counts[[5, 50]] = [1, 2]  # the rare bucket's count, 3, ties with kept values'
    vocab = Vocabulary.fit(values, counts, min_count=3)
    kept = sorted((-int(c), int(v)) for v, c in zip(values, counts, strict=True) if c >= 3)
    rare = (-int(counts[counts < 3].sum()), np.iinfo(np.int64).max)
    expected = sorted([*kept, rare])
    assert vocab.rare_id == expected.index(rare)
    assert [(-int(c), int(v)) for v, c in zip(vocab.raw, vocab.count, strict=True)] == expected


@pytest.mark.parametrize("distinct", [50_000, 400_000])  # kept: under and over the 2^16 keys from
# which vocab_map.cpp fetches each value's keys ahead
def test_the_compact_lookup_gives_every_value_its_id_natively_and_in_numpy(distinct):
    """``IdLookup`` (sorted 32-bit keys and ids, a directory; vocab_map.cpp or numpy's binary search)
    against a plain dict of the vocabulary: kept values, values under min_count and values never counted
    (both the rare id), -1 (empty, kept here), values beyond 32 bits; and the lookup's size."""
    rng = np.random.default_rng(0)
    values = np.unique(np.concatenate([[-1], rng.integers(0, 2**32, distinct)]))
    counts = rng.integers(1, 6, len(values))
    counts[0] = 9  # the empty value kept
    queries = np.concatenate([values, rng.integers(0, 2**32, 20_000), [-1, 0, 2**32 - 1, 2**32, 2**40, -7]])
    rng.shuffle(queries)
    queries = np.concatenate([queries, [2**40, -1, -7, 5]])  # the last few: no value ahead of them
    vocab = Vocabulary.fit(values, counts, min_count=2)
    by_value = {int(r): i for i, r in enumerate(vocab.raw) if i != vocab.rare_id}
    expected = np.array([by_value.get(int(q), vocab.rare_id) for q in queries])
    fast, slow = vocab.lookup(), vocab.lookup(native=False)
    assert fast._lib is not None and slow._lib is None
    for lookup in (fast, slow):
        for dtype in (np.int64, np.int32):  # int32: the output's ids, written as such
            got = lookup.transform(queries, dtype)
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, expected)
    assert (expected == vocab.rare_id).sum() > 20_000  # unseen and rare values all went to the rare id
    assert fast.nbytes <= 9 * len(vocab)  # 8 bytes a kept value, the directory at most one more
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fast)).transform(queries), expected)


def test_raw_values_beyond_32_bits_are_looked_up_too():
    vocab = Vocabulary.fit(np.array([-1, 3, 2**40, 7]), np.array([5, 4, 3, 1]), min_count=2)
    lookup = vocab.lookup()
    got = lookup.transform(np.array([-1, 3, 2**40, 7, 9]))
    assert got.tolist() == [0, 1, 2, vocab.rare_id, vocab.rare_id]


def test_a_line_without_end_is_refused_in_bounded_memory(tmp_path):
    src = synth(tmp_path / "src.txt", rows=50)
    endless = tmp_path / "endless.txt"
    endless.write_bytes(src.read_bytes() + b"1\t" + b"x" * (5 << 20))
    with pytest.raises(CriteoFormatError, match=r"endless.txt:51: no end of line in [\d,]+ bytes"):
        run([endless], tmp_path / "out", chunk_mb=1, parser="native")


@pytest.mark.parametrize(
    "raw",
    [
        [],
        [-1, -1],
        [0, 2**32 - 1, 2**32 - 1, -1, 7, 0],  # the largest hash next to the empty value
        list(np.random.default_rng(0).integers(-1, 2**32, 5000)),
        list(np.random.default_rng(1).integers(-1, 40, 5000)),
        [2**40, -1, 3],  # not hashes: counted all the same
        list(np.random.default_rng(2).integers(-1, 2**18, 400_000)),  # a table slots are fetched ahead in
    ],
    ids=["none", "all-empty", "edges", "hashes", "few-values", "wider", "large-table"],
)
@pytest.mark.parametrize("native", [True, False], ids=["hash-table", "numpy"])
def test_value_counter_counts_like_numpy(raw, native):
    """The counts of two chunks (C++ hash table; or 32-bit sorts, the empty value counted apart), and
    of two counters merged, equal np.unique's."""
    raw = np.array(raw, dtype=np.int64)
    counter, other = ValueCounter(native), ValueCounter(native)
    counter.add(raw[: len(raw) // 2])
    counter.add(raw[len(raw) // 2 :])
    other.add(np.array([[v, 0] for v in raw[::-1]], dtype=np.int64).reshape(-1, 2)[:, 0])  # strided
    assert (counter._table is not None) == native  # the path under test is the one taken
    want_values, want_counts = np.unique(raw, return_counts=True)
    values, counts = counter.result()
    order = np.argsort(values)
    assert values[order].tolist() == want_values.tolist() and counts[order].tolist() == want_counts.tolist()
    counter.merge(other)
    values, counts = counter.result()
    order = np.argsort(values)
    assert values[order].tolist() == want_values.tolist()
    assert counts[order].tolist() == (2 * want_counts).tolist()


@pytest.mark.parametrize("native", [True, False], ids=["hash-table", "numpy"])
def test_a_drained_counter_hands_out_its_counts_by_part_and_counts_again(native):
    """``drain``: every value with its count (np.unique's), grouped by part ((value + 1) >> shift; a
    value beyond the parts in the last), the bounds of each part; then empty, and counting again in the
    same table and buffer."""
    rng = np.random.default_rng(3)
    counter = ValueCounter(native)
    for more in ([], [2**40], [2**32 - 1, -1]):
        raw = np.concatenate([rng.integers(-1, 2**32, 30_000), rng.integers(-1, 50, 30_000), more])
        counter.add(raw)
        pairs, bounds = counter.drain(27, 64)
        want_values, want_counts = np.unique(raw, return_counts=True)
        order = np.argsort(pairs["value"])
        assert pairs["value"][order].tolist() == want_values.tolist()
        assert pairs["count"][order].tolist() == want_counts.tolist()
        parts = np.minimum((pairs["value"] + 1) >> 27, 63)
        assert bounds[0] == 0 and bounds[-1] == len(pairs) and len(bounds) == 65
        assert all((parts[bounds[p] : bounds[p + 1]] == p).all() for p in range(64))
        assert counter.distinct() == 0
    assert (counter._table is not None) == native  # the path under test is the one taken
    counter.result()  # counts held as arrays from here on: the drain buffer goes with the table
    assert counter._table is None and len(counter._drained) == 0


@pytest.mark.parametrize("native", [True, False], ids=["in-c", "python"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_count_lines_counts_a_last_line_without_its_newline(tmp_path, gz, native, monkeypatch):
    """The line count that places the split boundaries: every line, the last one with or without
    its newline, empty lines included; counted in C, or by Python where the parser does not build."""
    if not native:
        monkeypatch.setattr(criteo_tsv, "_parser", _unbuildable)
    assert criteo_tsv.count_newlines(bytearray(b"x\ny\n\nz"), 2, 5) == 2  # within the bounds only
    for content, lines in [(b"", 0), (b"a", 1), (b"a\n", 1), (b"a\nb", 2), (b"a\n\nb\n", 3), (b"\n\n", 2)]:
        path = tmp_path / ("f.txt.gz" if gz else "f.txt")
        path.write_bytes(gzip.compress(content) if gz else content)
        assert preprocess_module.count_lines(path) == lines, content
    stopped = threading.Event()
    stopped.set()  # a failed run stops a count still running beside the parse
    assert preprocess_module.count_lines(path, stopped) == (-1 if lines else 0)


def _unbuildable():
    raise NativeUnavailable("no compiler (test)")


def test_dense_transform_gives_the_floats_of_computing_each_value():
    rng = np.random.default_rng(0)
    int64 = np.iinfo(np.int64)
    edges = [int64.min, -(2**40), -1, 0, 1, 2**16 - 1, 2**16, 2**31, 2**62, int64.max]
    ints = np.concatenate([edges, rng.integers(-100, 200_000, 5000), rng.integers(0, 2**63 - 1, 100)])
    ints = np.asfortranarray(np.resize(ints, (len(ints) // 13, 13)))
    expected = np.log1p(np.maximum(ints, 0)).astype(np.float32)
    got = preprocess_module._dense(ints)
    assert got.dtype == np.float32 and got.flags.f_contiguous
    assert got.tobytes("F") == expected.tobytes("F")
