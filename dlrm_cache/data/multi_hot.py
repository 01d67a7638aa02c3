"""MLPerf DLRM-DCNv2's synthetic multi-hot Criteo: every id of a feature's table expands to a fixed bag.

The bag of an id holds the id itself first, then ``size - 1`` ids drawn once for that id from a seeded
generator: ``uniform`` over the table, or ``pareto``: Pareto(a=0.25) samples (numpy's form,
``(1 - u)^(-1/a) - 1``), floored, modulo the table size (most land on the first rows). The draws are
made over the table in *dictionary order* (the ids sorted by raw value, the empty value first, the rare
bucket last: the order the reference's dictionaries give), so that the bag of a value does not depend
on how often anything was seen. Draw ``j`` of the id at position ``q`` is a hash of (``seed``,
feature, ``q``, ``j``): nothing is materialised, and the same id always expands to the same bag.

Because the extra ids land anywhere in the table, the ranking counts the expanded ids: the count of an
id is its own train count plus the train count of every id whose bag draws it (``expanded``), and ids
are ranked by that (``min_count`` still decides, on the values' own counts, which values have ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlrm_cache.config import PreprocessOptions
from dlrm_cache.data.synthetic import splitmix64
from dlrm_cache.data.vocab import IdLookup, Vocabulary

PARETO_A = 0.25  # the reference's shape
_DRAWS_AT_ONCE = 1 << 23  # ids drawn per step when counting (bounds the arrays: ~200 MB)


@dataclass(frozen=True)
class MultiHot:
    """``preprocess.multi_hot_*``: ids per bag of each feature, how the extra ids are drawn, the seed."""

    sizes: tuple[int, ...]
    distribution: str
    seed: int

    @classmethod
    def of(cls, opts: PreprocessOptions) -> MultiHot | None:
        """The expansion ``opts`` asks for; None for one id a value (plain Criteo)."""
        if opts.multi_hot_sizes is None:
            return None
        return cls(tuple(opts.multi_hot_sizes), opts.multi_hot_distribution, opts.multi_hot_seed)

    def draws(self, feature: int, positions: np.ndarray, rows: int) -> np.ndarray:
        """The extra ids of the ids at dictionary ``positions`` of a table of ``rows``:
        (len(positions), size - 1) positions."""
        extra = self.sizes[feature] - 1
        salt = splitmix64(np.array([self.seed * 1_000_003 + feature], dtype=np.uint64))[0]
        slots = np.arange(1, extra + 1, dtype=np.uint64)
        keys = (positions.astype(np.uint64)[:, None] << np.uint64(16)) | slots[None, :]
        h = splitmix64(keys ^ salt)
        if self.distribution == "uniform":
            return (h % np.uint64(rows)).astype(np.int64)
        u = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
        x = np.floor(np.expm1(-np.log1p(-u) / PARETO_A))
        return np.fmod(x, float(rows)).astype(np.int64)


def dictionary_order(vocab: Vocabulary) -> np.ndarray:
    """The ids of ``vocab`` sorted by raw value, the rare bucket last: position -> id."""
    key = vocab.raw.copy()
    key[vocab.rare_id] = np.iinfo(np.int64).max
    return np.argsort(key, kind="stable")


def expanded(vocab: Vocabulary, feature: int, multi: MultiHot) -> Vocabulary:
    """``vocab`` ranked again by the train counts of the expanded ids (the same values, the same
    rare bucket): the count of an id is its own plus that of every id whose bag draws it."""
    size = multi.sizes[feature]
    if size == 1:
        return vocab
    order = dictionary_order(vocab)
    rows = len(order)
    own = vocab.count[order]
    total = own.astype(np.float64)  # exact below 2^53
    step = max(1, _DRAWS_AT_ONCE // (size - 1))
    for lo in range(0, rows, step):
        positions = np.arange(lo, min(rows, lo + step))
        drawn = multi.draws(feature, positions, rows).reshape(-1)
        total += np.bincount(drawn, weights=np.repeat(own[positions], size - 1), minlength=rows)
    counts = np.rint(total).astype(np.int64)
    raw = vocab.raw[order]
    return Vocabulary.fit_kept(raw[:-1], counts[:-1], int(counts[-1]))


class BagLookup:
    """Raw values -> bags of new ids of one feature: (n, size) ids a call. Holds the values in
    dictionary order (an ``IdLookup`` to positions, ~9 bytes a value) and each position's id (4 bytes)."""

    def __init__(self, positions: IdLookup, ids: np.ndarray, feature: int, multi: MultiHot):
        self.positions, self.ids, self.feature, self.multi = positions, ids, feature, multi
        self.size = positions.size
        self.rare_id = int(ids[positions.rare_id])

    @classmethod
    def of(cls, vocab: Vocabulary, feature: int, multi: MultiHot) -> BagLookup:
        order = dictionary_order(vocab)
        raw = vocab.raw[order]
        raw[-1] = np.iinfo(np.int64).max  # the rare bucket's (IdLookup skips it)
        ids = order.astype(np.int32 if len(order) < 2**31 else np.int64)
        return cls(IdLookup.of(raw, len(raw) - 1), ids, feature, multi)

    @property
    def nbytes(self) -> int:
        return self.positions.nbytes + self.ids.nbytes

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """Raw values (int64) -> their bags, (len(raw), size) int64 ids."""
        first = self.positions.transform(raw)
        bags = np.empty((len(first), self.multi.sizes[self.feature]), dtype=np.int64)
        bags[:, 0] = first
        if bags.shape[1] > 1:
            bags[:, 1:] = self.multi.draws(self.feature, first, self.size)
        return self.ids[bags].astype(np.int64, copy=False)

    def save(self, path: Path) -> None:
        self.positions.save(path)
        np.save(path / "bag_ids.npy", self.ids)
        multi = self.multi
        np.save(path / "bag.npy", np.array([self.feature, multi.seed, *multi.sizes], dtype=np.int64))
        (path / "bag_distribution.txt").write_text(multi.distribution)

    @classmethod
    def load(cls, path: Path) -> BagLookup:
        feature, seed, *sizes = np.load(path / "bag.npy").tolist()
        multi = MultiHot(tuple(sizes), (path / "bag_distribution.txt").read_text(), seed)
        return cls(IdLookup.load(path), np.load(path / "bag_ids.npy"), feature, multi)


def load_lookup(path: Path) -> IdLookup | BagLookup:
    """A lookup ``save``-d into ``path``, of either kind."""
    return BagLookup.load(path) if (path / "bag.npy").exists() else IdLookup.load(path)
