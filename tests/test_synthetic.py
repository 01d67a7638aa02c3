"""The generator writes real Criteo layout, with the requested skew and a learnable label."""

import csv
import gzip
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from dlrm_cache.config import SynthConfig
from dlrm_cache.data.synthetic import CriteoSynthesizer, generate, hash_to_hex, rank_to_hash

HEX8 = re.compile(r"^[0-9a-f]{8}$")


def _read(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _check_criteo_row(row, labeled):
    """An independent check of one line against the Criteo Kaggle layout."""
    assert len(row) == (40 if labeled else 39)
    if labeled:
        assert row[0] in ("0", "1")
    ints, cats = row[-39:-26], row[-26:]
    for i, v in enumerate(ints):
        if v:
            assert int(v) >= (-3 if i == 1 else 0), (i, v)
    for v in cats:
        assert v == "" or HEX8.match(v), v


def test_kaggle_train_layout(tmp_path):
    out = tmp_path / "train.txt"
    generate(SynthConfig(rows=3000, out=str(out), cardinality_scale=0.01, progress=False))
    rows = _read(out)
    assert len(rows) == 3000
    for row in rows:
        _check_criteo_row(row, labeled=True)
    columns = list(zip(*rows, strict=True))
    assert any(v.startswith("-") for v in columns[2]), "I2 is sometimes negative"
    empty_i1 = sum(v == "" for v in columns[1]) / len(rows)
    assert 0.35 < empty_i1 < 0.55, "I1 is empty about 45% of the time, as in the Kaggle data"
    assert sum(v == "" for v in columns[1 + 13 + 21]) > 0.6 * len(rows), "C22 is mostly empty"
    assert 0.15 < np.mean([int(v) for v in columns[0]]) < 0.35, "a Criteo-like click rate"


def test_unlabeled_gzip_and_terabyte_day_files(tmp_path):
    test_txt = tmp_path / "test.txt.gz"
    generate(
        SynthConfig(
            rows=500, out=str(test_txt), labeled=False, gzip=True, cardinality_scale=0.01, progress=False
        )
    )
    for row in _read(test_txt):
        _check_criteo_row(row, labeled=False)
    paths = generate(
        SynthConfig(rows=100, out=str(tmp_path / "tb"), layout="terabyte", days=3, gzip=True, progress=False)
    )
    assert [p.name for p in paths] == ["day_0.gz", "day_1.gz", "day_2.gz"]
    assert [len(_read(p)) for p in paths] == [34, 33, 33]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def make(name, seed):
        out = tmp_path / name
        generate(SynthConfig(rows=70_000, out=str(out), seed=seed, cardinality_scale=0.01, progress=False))
        return out.read_bytes()

    a, b, c = make("a", 1), make("b", 1), make("c", 2)
    assert a == b
    assert a != c


@pytest.mark.parametrize("zipf", [0.8, 1.05, 1.3])
def test_id_frequencies_follow_the_requested_power_law(tmp_path, zipf):
    n = 20_000
    out = tmp_path / "t.txt"
    generate(SynthConfig(rows=100_000, out=str(out), zipf=zipf, cardinalities=[n] * 26, progress=False))
    values = [row[14] for row in _read(out) if row[14]]  # C1, never empty
    counts = sorted(Counter(values).values(), reverse=True)
    top = n // 100
    measured = sum(counts[:top]) / len(values)
    weights = np.arange(1, n + 1, dtype=np.float64) ** -zipf
    implied = weights[:top].sum() / weights.sum()
    assert measured == pytest.approx(implied, abs=0.015)


def test_hot_ids_are_scattered_over_the_hash_space():
    hashes = rank_to_hash(np.arange(1000), feature=3)
    assert len(np.unique(hashes)) == 1000
    assert hashes.max() > 2**31 and hashes.min() < 2**31
    assert not np.all(np.diff(hashes.astype(np.int64)) > 0), "hot ids are not the smallest values"
    assert hash_to_hex(np.array([0, 0xDEADBEEF, 0xFFFFFFFF], dtype=np.uint32)).tolist() == [
        b"00000000",
        b"deadbeef",
        b"ffffffff",
    ]


def _auc(scores, labels):
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    pos = labels.sum()
    return (ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(labels) - pos))


@pytest.mark.slow
def test_labels_are_learnable_from_ids_more_than_from_dense_features():
    syn = CriteoSynthesizer(SynthConfig(cardinality_scale=0.01, seed=3))
    blocks = [syn.block(i, 50_000) for i in range(2)]
    label = np.concatenate([b.label for b in blocks])
    ints = np.concatenate([b.ints for b in blocks])
    dense = torch.tensor(
        np.where(np.concatenate([b.int_missing for b in blocks]), 0, np.log1p(np.maximum(ints, 0))),
        dtype=torch.float32,
    )
    card = np.array(syn.cardinalities) + 1  # + the missing value
    ids = np.where(
        np.concatenate([b.cat_missing for b in blocks]), card - 1, np.concatenate([b.ranks for b in blocks])
    )
    ids = torch.tensor(ids + np.concatenate([[0], np.cumsum(card)[:-1]]))
    y = torch.tensor(label, dtype=torch.float32)

    def fit(use_ids):
        torch.manual_seed(0)
        emb = torch.nn.EmbeddingBag(int(card.sum()), 1, mode="sum")
        torch.nn.init.zeros_(emb.weight)
        lin = torch.nn.Linear(13, 1)
        opt = torch.optim.Adam([*emb.parameters(), *lin.parameters()], lr=0.01)

        def logit(sl):
            return lin(dense[sl]).squeeze(1) + (emb(ids[sl]).squeeze(1) if use_ids else 0)

        for _ in range(2):
            for i in range(0, 80_000, 1000):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logit(slice(i, i + 1000)), y[i : i + 1000]
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            return _auc(logit(slice(80_000, None)).numpy(), label[80_000:])

    with_ids, dense_only = fit(True), fit(False)
    assert with_ids > 0.72
    assert with_ids > dense_only + 0.1


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["rows=-5"], "rows=-5"),
        (["zipf=0"], "zipf=0"),
        (["cardinalities=[0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]"], "cardinalities[0]=0"),
        (["rows=abc"], "rows"),
        (["colour=red"], "colour"),
    ],
)
def test_cli_refuses_bad_config_and_writes_nothing(tmp_path, args, key):
    out = tmp_path / "d" / "t.txt"
    r = subprocess.run(
        [sys.executable, "-m", "dlrm_cache.cli.synth", f"out={out}", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode != 0
    assert key in r.stderr
    assert not (tmp_path / "d").exists()


def test_cli_does_not_overwrite_unless_asked(tmp_path):
    out = tmp_path / "t.txt"
    out.write_text("keep me")
    cmd = [sys.executable, "-m", "dlrm_cache.cli.synth", f"out={out}", "rows=5", "progress=false"]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "overwrite=true" in r.stderr
    assert out.read_text() == "keep me"
    assert subprocess.run([*cmd, "overwrite=true"], check=False).returncode == 0
    assert len(out.read_text().splitlines()) == 5
