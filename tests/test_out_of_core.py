"""dlrm-preprocess in bounded memory (preprocess.memory_gb) and the reference's id hashing
(preprocess.max_ind_range)."""

import gc
import json
import logging
import re
import subprocess
import sys
import weakref
from collections import Counter

import pyarrow.parquet as pq
import pytest
from test_preprocess import read_split, run

from dlrm_cache.config import ConfigError, DatasetConfig, PreprocessOptions, SynthConfig
from dlrm_cache.criteo import TERABYTE_CARDINALITIES
from dlrm_cache.data import held_lookups, memory_budget, spilled_counts
from dlrm_cache.data.synthetic import CriteoSynthesizer, generate, output_files

TERABYTE = DatasetConfig(name="criteo_1tb", split="last_file")


def synth(path, rows, cardinality_scale=0.0005, **kw):
    generate(SynthConfig(rows=rows, out=str(path), cardinality_scale=cardinality_scale, progress=False, **kw))
    return path


def outputs(out) -> dict[str, bytes]:
    """Every file of a preprocessed dataset but metadata.json (which says how it was made), by name."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != "metadata.json"}  # fmt: skip


@pytest.mark.parametrize(
    "layout,min_count", [("kaggle", 1), ("kaggle", 3), ("terabyte", 2)], ids=["kaggle", "min3", "1tb-days"]
)
def test_out_of_core_writes_the_same_bytes_as_in_memory(tmp_path, monkeypatch, caplog, layout, min_count):
    """A budget so small that every feature's counter spills many runs (a counter holds a handful of
    distinct values); values unseen in train (val/test) and dropped by min_count map alike."""
    if layout == "terabyte":
        inputs = sorted(synth(tmp_path / "days", rows=4000, layout="terabyte", days=4).iterdir())
        dataset = TERABYTE
    else:
        inputs, dataset = [synth(tmp_path / "in.txt", rows=4000)], None
    in_memory = run(inputs, tmp_path / "mem", dataset, min_count=min_count, workers=1)
    monkeypatch.setattr(memory_budget, "BYTES_PER_VALUE", 10**8)  # -> a few values per counter
    with caplog.at_level(logging.INFO, logger="dlrm_cache.data.preprocess"):
        spilled = run(inputs, tmp_path / "ooc", dataset, min_count=min_count, workers=1, memory_gb=2)
    assert "out of core: the counts of 26 feature(s)" in caplog.text
    a, b = outputs(in_memory), outputs(spilled)
    assert a.keys() == b.keys() and len(a) > 10
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert not any("_counts" in str(p) for p in spilled.rglob("*"))  # spilled runs removed
    assert not list(tmp_path.glob(".ooc.tmp-*"))


@pytest.mark.parametrize("room", [0, 40_000], ids=["a-feature-a-group", "several-a-group"])
def test_lookups_applied_a_group_at_a_time_write_the_same_bytes(tmp_path, monkeypatch, caplog, room):
    """Where the re-numbering does not fit the room the budget leaves it, the lookups go to disk and
    are applied a group at a time, each group but the last in a pass of its own: the same bytes as
    with every lookup in memory, and nothing of the passes left in the output."""
    inputs = sorted(synth(tmp_path / "days", rows=6000, layout="terabyte", days=3).iterdir())
    in_memory = run(inputs, tmp_path / "mem", TERABYTE, workers=1)
    made = held_lookups.HeldLookups.__init__
    monkeypatch.setattr(
        held_lookups.HeldLookups, "__init__", lambda self, folder, _: made(self, folder, room)
    )
    with caplog.at_level(logging.INFO, logger="dlrm_cache.data.held_lookups"):
        grouped = run(inputs, tmp_path / "grouped", TERABYTE, workers=1)
    passes = re.search(r"applied in (\d+) groups of features, (\d+) pass", caplog.text)
    groups = int(passes[1])
    assert int(passes[2]) == groups - 1
    assert groups == 26 if room == 0 else 1 < groups < 26
    a, b = outputs(in_memory), outputs(grouped)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    assert (
        json.loads((in_memory / "metadata.json").read_text())["rows"]
        == json.loads((grouped / "metadata.json").read_text())["rows"]
    )
    assert {p.name for p in grouped.iterdir()} == {"train", "val", "test", "vocab", "stats", "metadata.json"}


def test_max_ind_range_hashes_like_the_reference(tmp_path):
    """``int(hex, 16) % max_ind_range`` on every value before counting (the empty value apart), against
    an independent parse of the lines."""
    src = synth(tmp_path / "in.txt", rows=3000)
    m = 7
    out = run([src], tmp_path / "out", max_ind_range=m)
    lines = src.read_text().splitlines()
    train_end = json.loads((out / "metadata.json").read_text())["split_lines"][0]["train_last_line"]
    rows = [line.split("\t") for line in lines]

    def key(v: str) -> int:
        return int(v, 16) % m if v else -1

    got = read_split(out, "train") + read_split(out, "val") + read_split(out, "test")
    for j in range(26):
        counts = Counter(key(r[14 + j]) for r in rows[:train_end])
        ranked = sorted(counts, key=lambda v: (-counts[v], v))  # min_count 1: nothing rare
        rare = len(ranked)  # the rare bucket (count 0) comes last
        ids = {v: i for i, v in enumerate(ranked)}
        expected = [ids.get(key(r[14 + j]), rare) for r in rows]
        assert [g[f"cat_{j}"] for g in got] == expected, j
        assert pq.read_table(out / "vocab" / f"cat_{j}.parquet").num_rows == len(ranked) + 1
        assert len(ranked) <= m + 1
    assert json.loads((out / "metadata.json").read_text())["max_ind_range"] == m


def peak_rss_mb(*args) -> tuple[float, subprocess.CompletedProcess]:
    """Run dlrm-preprocess in a child of a fresh interpreter; the child's peak resident memory."""
    code = (
        "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(p.stderr); "
        "sys.exit(p.returncode)"
    )
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "dlrm_cache.cli.preprocess", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return int(proc.stdout.split()[-1]) / 1024, proc


@pytest.mark.parametrize("min_count", [2, 1], ids=["tail-dropped", "every-value-kept"])
def test_peak_memory_stays_under_the_budget_where_in_memory_does_not(tmp_path, min_count):
    """Nearly every value distinct (the shape of Criteo 1TB's long tail), dropped by min_count=2 or
    every one kept (min_count=1: the write pass re-numbers millions of kept values): counting them all
    in memory needs more than the budget; out of core, ranking and the write pass stay under it."""
    src = synth(tmp_path / "wide.txt", rows=1_000_000, zipf=0.05, cardinality_scale=20000)
    budget_gb = 0.45
    common = [f"input={src}", f"preprocess.min_count={min_count}", "preprocess.chunk_mb=4",
              "preprocess.progress=false", "preprocess.row_group_rows=65536",
              "preprocess.workers=1"]  # fmt: skip
    free, proc = peak_rss_mb(*common, f"output_dir={tmp_path / 'mem'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    bounded, proc = peak_rss_mb(
        *common, f"output_dir={tmp_path / 'ooc'}", f"preprocess.memory_gb={budget_gb}"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "out of core" in proc.stderr
    assert free > budget_gb * 1024 > bounded, (free, bounded)
    assert outputs(tmp_path / "mem") == outputs(tmp_path / "ooc")
    if min_count == 1:  # millions of values kept, and none of them rare
        kept = sum(json.loads((tmp_path / "ooc" / "metadata.json").read_text())["vocab_sizes"].values())
        assert kept > 5_000_000, kept


def test_each_files_counts_are_merged_as_it_ends(tmp_path, monkeypatch):
    """Files parsed one after the other in this process (preprocess.workers=1): each file's counters
    are merged into the first file's as it ends, so one set of counters holds counts between files
    (a set per finished file, held to the end, grew the memory with the files: 1.15 GiB against a 1
    GiB budget at 16M rows of 24 files)."""
    inputs = sorted(synth(tmp_path / "days", rows=3000, layout="terabyte", days=6).iterdir())
    live: weakref.WeakSet = weakref.WeakSet()
    most = [0]
    made = spilled_counts.SpilledCounter.__init__

    def counting(self, *args, **kwargs):
        made(self, *args, **kwargs)
        live.add(self)
        if self.name == "cat_0":  # a file's first counter: what is held, garbage collected
            gc.collect()
            most[0] = max(most[0], sum(1 for c in live if c.counter.distinct()))

    monkeypatch.setattr(spilled_counts.SpilledCounter, "__init__", counting)
    run(inputs, tmp_path / "out", TERABYTE, workers=1)
    assert most[0] == 26, most  # the merged set, never a second one


def test_bad_memory_settings_are_refused_before_any_work(tmp_path):
    src = synth(tmp_path / "in.txt", rows=100)
    refused = r"preprocess.memory_gb=0.05: below the fixed costs .* the smallest that works is \d+\.\d\d"
    with pytest.raises(ValueError, match=refused):
        run([src], tmp_path / "out", memory_gb=0.05)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(ConfigError, match="preprocess.max_ind_range"):
        PreprocessOptions(max_ind_range=-1)
    with pytest.raises(ConfigError, match="preprocess.memory_gb"):
        PreprocessOptions(memory_gb=-1)


def test_a_full_disk_while_spilling_leaves_nothing(tmp_path, monkeypatch):
    """The output on a small tmpfs: the spilled runs fill it; one line naming the file, nothing left."""
    src = synth(tmp_path / "in.txt", rows=20_000, cardinality_scale=0.05)
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        code = (
            "from dlrm_cache.data import memory_budget; memory_budget.BYTES_PER_VALUE = 10**8; "
            "from dlrm_cache.cli.preprocess import main; main()"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, f"input={src}", f"output_dir={disk / 'out'}",
             "preprocess.progress=false", "preprocess.memory_gb=2", "preprocess.workers=1"],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("dlrm-preprocess: error: ") and "No space left on device" in last, last
        assert "Traceback" not in proc.stderr
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_terabyte_profile_and_layout(tmp_path):
    cfg = SynthConfig(rows=48, out=str(tmp_path / "tb"), cardinalities="terabyte", cardinality_scale=1e-3)
    assert cfg.layout == "terabyte"  # the profile brings its day_N layout
    assert [p.name for p, _ in output_files(cfg)] == [f"day_{d}" for d in range(24)]
    assert CriteoSynthesizer(cfg).cardinalities == [max(1, round(c * 1e-3)) for c in TERABYTE_CARDINALITIES]
    assert sum(TERABYTE_CARDINALITIES) == 882_774_559
    with pytest.raises(ConfigError, match="cardinalities"):
        SynthConfig(cardinalities="petabyte")
