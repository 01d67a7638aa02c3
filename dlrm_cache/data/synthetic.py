"""Criteo-format synthetic click logs.

Writes tab-separated lines exactly like Criteo Kaggle's ``train.txt`` (``label``, 13 integer fields,
26 categorical fields as 8 lowercase hex digits, empty fields where a value is missing) or the 39-field
unlabeled ``test.txt``, or the 1TB ``day_N`` files. Everything is vectorized with NumPy and written
through pyarrow's CSV writer, so memory stays bounded by one block of rows.

How the ids are drawn: feature ``f`` has ``n_f`` distinct values ranked by popularity; rank ``k`` is
drawn with probability proportional to ``1 / (k + 1)^s`` (a Zipf law with exponent ``s = zipf``). A
rank becomes a 32-bit "hash" through a per-feature bijection of the 32-bit space, so hot values are
scattered across the hash space, as in the real logs, rather than being the smallest values.

How the label is made: a hidden logistic model whose logit is a bias, small weights on a few
log-transformed integer features, a random effect per id for eight categorical features, and two
crosses (a random effect per id pair). Most of the signal is categorical, so a model with embeddings
beats a dense-only model clearly. Everything follows from ``seed``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm import tqdm

from dlrm_cache.config import SynthConfig
from dlrm_cache.criteo import (
    CARDINALITY_PROFILES,
    CAT_COLUMNS,
    CAT_FEATURE_COUNT,
    INT_COLUMNS,
    INT_FEATURE_COUNT,
)
from dlrm_cache.data.zipf import ZipfSampler
from dlrm_cache.files import as_umask_allows

BLOCK_ROWS = 65_536  # rows generated per step: bounds memory, and each block has its own seed

# Share of empty values per field, approximately as in the Kaggle training data.
INT_MISSING = [0.45, 0.0, 0.21, 0.22, 0.03, 0.22, 0.04, 0.0, 0.04, 0.45, 0.04, 0.77, 0.22]
CAT_MISSING = [0.0, 0.0, 0.03, 0.03, 0.0, 0.12, 0.0, 0.0, 0.0, 0.0, 0.0, 0.03, 0.0,
               0.0, 0.0, 0.03, 0.0, 0.0, 0.44, 0.44, 0.03, 0.76, 0.0, 0.03, 0.44, 0.44]  # fmt: skip
# Integer features are log-normal counts: (median, spread of log value).
INT_SHAPE = [(1, 1.2), (2, 1.8), (5, 1.5), (4, 1.0), (2500, 1.8), (33, 1.5), (3, 1.3), (8, 1.0),
             (39, 1.3), (1, 0.6), (1, 0.9), (0.5, 1.0), (3, 1.1)]  # fmt: skip
I2_NEGATIVE = 0.04  # share of int_1 (I2) values that are -1, -2 or -3

# The hidden label model.
_LABEL_BIAS = -1.3
_INT_WEIGHTS = {0: 0.25, 6: -0.15, 10: 0.2}  # on log1p(max(x, 0))
_CAT_EFFECT_STD = {0: 0.6, 1: 0.5, 6: 0.6, 9: 0.5, 12: 0.7, 14: 0.6, 17: 0.5, 23: 0.5}
_CROSSES = [((0, 12), 0.6), ((6, 17), 0.6)]

_MASK32 = np.uint64(0xFFFFFFFF)
# byte -> its two hex digits, as one little-endian uint16 (first digit in the low byte)
_HEX_PAIRS = np.array([ord(f"{b:02x}"[0]) | ord(f"{b:02x}"[1]) << 8 for b in range(256)], dtype=np.uint16)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A fixed 64-bit mixing function (vectorized), used for per-id random effects."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hash_normal(key: np.ndarray, salt: int) -> np.ndarray:
    """A standard normal value that is a fixed function of ``key`` (Box-Muller on two hashes)."""
    h1 = splitmix64(key ^ np.uint64(salt))
    h2 = splitmix64(h1)
    u1 = ((h1 >> np.uint64(11)).astype(np.float64) + 0.5) / 2.0**53
    u2 = (h2 >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def rank_to_hash(rank: np.ndarray, feature: int) -> np.ndarray:
    """A bijection of the 32-bit space per feature: popular ranks land all over the hash space."""
    with np.errstate(over="ignore"):
        x = rank.astype(np.uint64) & _MASK32
        x = (x * np.uint64(0x9E3779B1) + np.uint64(0x7F4A7C15 * (feature + 1))) & _MASK32
        x ^= x >> np.uint64(15)
        x = (x * np.uint64(0x2C1B3C6D)) & _MASK32
        x ^= x >> np.uint64(12)
        return x


def hash_to_hex(h: np.ndarray) -> np.ndarray:
    """uint32 values -> fixed-width 8-digit lowercase hex (dtype ``S8``), vectorized: each value's four
    bytes, most significant first, looked up as digit pairs."""
    big_endian = np.ascontiguousarray(h, dtype=">u4").view(np.uint8).reshape(-1, 4)
    return _HEX_PAIRS[big_endian].view("S8").ravel()


@dataclass
class Block:
    """One block of generated rows, in Criteo's columns (ranks are the ids before hashing)."""

    label: np.ndarray  # (n,) int8
    ints: np.ndarray  # (n, 13) int64
    int_missing: np.ndarray  # (n, 13) bool
    ranks: np.ndarray  # (n, 26) int64, popularity rank of each categorical value
    cat_missing: np.ndarray  # (n, 26) bool


class CriteoSynthesizer:
    """Generates blocks of Criteo-format rows; a block depends only on (seed, block index)."""

    def __init__(self, cfg: SynthConfig):
        named = isinstance(cfg.cardinalities, str)
        base = CARDINALITY_PROFILES[cfg.cardinalities] if named else cfg.cardinalities
        self.cardinalities = [max(1, round(c * cfg.cardinality_scale)) for c in base]
        self.samplers = [ZipfSampler(n, cfg.zipf) for n in self.cardinalities]
        self.seed = cfg.seed

    def block(self, index: int, rows: int) -> Block:
        rng = np.random.default_rng([self.seed, index])
        ranks = np.stack([s.sample(rng, rows) for s in self.samplers], axis=1)
        cat_missing = rng.random((rows, CAT_FEATURE_COUNT)) < np.array(CAT_MISSING)
        med = np.array([m for m, _ in INT_SHAPE])
        spread = np.array([sd for _, sd in INT_SHAPE])
        ints = np.floor(med * np.exp(spread * rng.standard_normal((rows, INT_FEATURE_COUNT)))).astype(
            np.int64
        )
        negative = rng.random(rows) < I2_NEGATIVE
        ints[negative, 1] = -rng.integers(1, 4, size=int(negative.sum()))
        int_missing = rng.random((rows, INT_FEATURE_COUNT)) < np.array(INT_MISSING)
        logit = self._logit(ints, int_missing, ranks, cat_missing)
        label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
        return Block(label, ints, int_missing, ranks, cat_missing)

    def _logit(self, ints, int_missing, ranks, cat_missing) -> np.ndarray:
        logit = np.full(len(ranks), _LABEL_BIAS)
        for f, w in _INT_WEIGHTS.items():
            logit += w * np.where(int_missing[:, f], 0.0, np.log1p(np.maximum(ints[:, f], 0)))
        # A missing categorical value is a value of its own (rank n_f), with its own effect.
        r = np.where(cat_missing, np.array(self.cardinalities), ranks).astype(np.uint64)
        for f, std in _CAT_EFFECT_STD.items():
            logit += std * _hash_normal(r[:, f], salt=1000 + f)
        for (f, g), std in _CROSSES:
            pair = r[:, f] * np.uint64(0x100000001) ^ r[:, g]
            logit += std * _hash_normal(pair, salt=2000 + 31 * f + g)
        return logit

    def to_table(self, b: Block, labeled: bool) -> pa.Table:
        cols: dict[str, pa.Array] = {}
        if labeled:
            cols["label"] = pa.array(b.label)
        for f, name in enumerate(INT_COLUMNS):
            cols[name] = pa.array(b.ints[:, f], mask=b.int_missing[:, f])
        for f, name in enumerate(CAT_COLUMNS):
            hexes = hash_to_hex(rank_to_hash(b.ranks[:, f], f))
            cols[name] = pa.array(hexes, type=pa.binary(), mask=b.cat_missing[:, f]).cast(pa.string())
        return pa.table(cols)


def output_files(cfg: SynthConfig) -> list[tuple[Path, int]]:
    """The files ``cfg`` asks for, with the rows each gets (the 1TB layout splits rows over days)."""
    if cfg.layout == "kaggle":
        return [(Path(cfg.out), cfg.rows)]
    suffix = ".gz" if cfg.gzip else ""
    per_day, extra = divmod(cfg.rows, cfg.days)
    return [(Path(cfg.out) / f"day_{d}{suffix}", per_day + (d < extra)) for d in range(cfg.days)]


def _blocks(total: int) -> Iterator[tuple[int, int]]:
    for index, start in enumerate(range(0, total, BLOCK_ROWS)):
        yield index, min(BLOCK_ROWS, total - start)


def generate(cfg: SynthConfig) -> list[Path]:
    """Write the files ``cfg`` describes; each appears only once complete (temp file, then rename).

    Raises ``FileExistsError`` before writing anything if a target exists and ``overwrite`` is false.
    """
    files = output_files(cfg)
    existing = [str(p) for p, _ in files if p.exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"{existing[0]} already exists (pass overwrite=true to replace it)")
    synth = CriteoSynthesizer(cfg)
    write_opts = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    block_index = 0
    with tqdm(
        total=cfg.rows, unit="rows", unit_scale=True, disable=not cfg.progress, desc="dlrm-synth"
    ) as bar:
        for path, rows in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
            os.close(fd)
            as_umask_allows(Path(tmp))
            try:
                sink = pa.OSFile(tmp, "wb")
                stream = pa.CompressedOutputStream(sink, "gzip") if cfg.gzip else sink
                with stream:
                    for _, n in _blocks(rows):
                        table = synth.to_table(synth.block(block_index, n), cfg.labeled)
                        pacsv.write_csv(table, stream, write_opts)
                        block_index += 1
                        bar.update(n)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    return [p for p, _ in files]
