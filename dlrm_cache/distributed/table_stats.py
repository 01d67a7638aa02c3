"""What the planners know of a table: its size and its frequency curve (train lookups of each row,
hottest first, from ``dlrm-preprocess``'s vocabularies), and what follows from the curve: the share of
lookups a cache of the ``k`` hottest rows serves, the distinct rows a batch touches, and cache sizes
fitted to a batch. numpy only: both planners and the cost model sit on it, none of them on torchrec.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dlrm_cache.config import CacheConfig
from dlrm_cache.data.saved_vocab import missing_vocabulary


@dataclass
class TableStats:
    """A table as the planner sees it; ``counts``: train lookups of each row, hottest first (``None``:
    unknown, taken as uniform)."""

    name: str
    rows: int
    dim: int
    features: int = 1  # bags per sample (features that use the table)
    counts: np.ndarray | None = None
    ids_per_bag: float = 1.0  # ids a bag holds, on average (1: one-hot; MLPerf's multi-hot: 1 to 100)
    _cum: np.ndarray | None = field(default=None, init=False, repr=False)  # cumulative counts
    _neg: np.ndarray | None = field(default=None, init=False, repr=False)  # -counts, ascending (search)
    _touched: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.counts is not None:
            c = np.asarray(self.counts, dtype=np.float64)
            if len(c) != self.rows:
                raise ValueError(f"table {self.name}: {len(c)} counts for {self.rows} rows")
            if len(c) > 1 and np.any(np.diff(c) > 0):
                raise ValueError(f"table {self.name}: counts must be hottest first (non-increasing)")
            self.counts = c
            self._cum = np.concatenate([[0.0], np.cumsum(c)])
            self._neg = -c

    @property
    def lookups(self) -> float:
        """Ids looked up per sample: every id of every bag."""
        return self.features * self.ids_per_bag

    def bag_share(self, id_share: float) -> float:
        """Share of bags holding at least one id of a set that ``id_share`` of the ids fall in (ids
        drawn independently; for one id a bag, ``id_share`` itself)."""
        if self.ids_per_bag == 1.0:
            return id_share
        return -math.expm1(self.ids_per_bag * math.log1p(-min(id_share, 1 - 1e-12)))

    @property
    def total(self) -> float:
        """The lookups of all rows together (0 when unknown)."""
        return 0.0 if self._cum is None else float(self._cum[-1])

    def counted_rows(self) -> int:
        """How many rows were looked up at all (counts > 0: a prefix, hottest first)."""
        return int(np.searchsorted(self._neg, 0.0, side="left"))

    @property
    def known(self) -> bool:
        """Whether the counts are known and not all zero (else lookups are taken as uniform)."""
        return self._cum is not None and self._cum[-1] > 0

    def expected_distinct(self, lookups: float) -> float:
        """Expected distinct rows that ``lookups`` lookups touch: sum over rows of 1 - (1 - p)^lookups."""
        if not self.known:
            return self.rows * -math.expm1(lookups * math.log1p(-1 / self.rows)) if self.rows > 1 else 1.0
        p = self.counts / self._cum[-1]
        return float(-np.expm1(lookups * np.log1p(-np.minimum(p, 1 - 1e-12))).sum())

    def cacheability(self) -> float:
        """Twice the area between the hit curve and full hits over the cache fraction: 1 for uniform
        access (a cache of x of the rows serves x of the lookups), near 0 when a few rows take them all."""
        if not self.known:
            return 1.0
        hits = self._cum[1:] / self._cum[-1]
        return float(min(1.0, max(0.0, 2 * (1 - hits).mean())))

    def hit_share(self, k: int) -> float:
        """Share of lookups served by a cache of the ``k`` hottest rows."""
        k = min(max(k, 0), self.rows)
        if self._cum is None or self._cum[-1] == 0:
            return k / self.rows
        return float(self._cum[k] / self._cum[-1])

    def expected_touched(self, k: int, lookups: float) -> float:
        """Expected distinct rows among the ``k`` hottest that ``lookups`` lookups touch (each row with
        probability ``1 - (1 - p)^lookups``); prefix sums cached per ``lookups``, grown as needed."""
        k = min(max(k, 0), self.rows)
        if not k:
            return 0.0
        if self.counts is None or self._cum[-1] == 0:
            return k * -math.expm1(lookups * math.log1p(-1 / self.rows)) if self.rows > 1 else 1.0
        cum = self._touched.get(lookups)
        if cum is None or len(cum) <= k:
            n = min(self.rows, max(k, 2 * (len(cum) - 1) if cum is not None else 1024))
            p = np.minimum(self.counts[:n] / self._cum[-1], 1 - 1e-12)
            cum = np.concatenate([[0.0], np.cumsum(-np.expm1(lookups * np.log1p(-p)))])
            self._touched[lookups] = cum
        return float(cum[k])

    def rows_at_least(self, threshold: float) -> int:
        """How many rows have a count >= ``threshold`` (uniform unknown counts: all or none)."""
        if self.counts is None:
            return self.rows if threshold <= 1 else 0
        return int(np.searchsorted(self._neg, -threshold, side="right"))


def load_table_stats(root: Path, tables: dict[str, str], dims: dict[str, int]) -> list[TableStats]:
    """``TableStats`` from a ``dlrm-preprocess`` output; ``tables``: table name -> its feature. The ids
    per bag are the train lookups counted over the train rows (1 for one id a row)."""
    train_rows = json.loads((root / "metadata.json").read_text())["rows"]["train"]
    out = []
    for name, feature in tables.items():
        path = root / "vocab" / f"{feature}.parquet"
        if not path.is_file():
            raise FileNotFoundError(missing_vocabulary(path))
        t = pq.read_table(path, columns=["id", "train_count"])
        ids = t.column("id").to_numpy()
        counts = np.zeros(len(ids), dtype=np.float64)
        counts[ids] = t.column("train_count").to_numpy()
        # Ids are ranked by train count; rare/unseen buckets at the end may break the order: sort.
        lookups = float(counts.sum())
        per_bag = lookups / train_rows if train_rows and lookups else 1.0
        out.append(TableStats(name, len(ids), dims[name], 1, -np.sort(-counts), ids_per_bag=per_bag))
    pa.default_memory_pool().release_unused()  # the files' buffers (~16 bytes a row), before the tables
    return out


def fit_to_batch(
    cache: CacheConfig, stats: list[TableStats], lookups: float | dict[str, float]
) -> tuple[CacheConfig, dict]:
    """``cache`` with the caches that ``cache.ratio`` leaves too small for a batch raised to fit one:
    a step holds the rows of its batch and, prefetched, of the next, so a cache needs twice the
    distinct rows a batch's ``lookups`` per table (one number for all, or per table name) touch
    (expected, plus four standard deviations). Tables kept whole, and tables with a
    ``cache.table_ratios`` entry (a size asked for), stay as they are. Returns the config and, per
    raised table, (rows before, rows now)."""
    ratios, raised = dict(cache.table_ratios), {}
    for t in stats:
        if cache.keeps_whole(t.rows) or t.name in cache.table_ratios:
            continue
        n = lookups[t.name] if isinstance(lookups, dict) else lookups * t.lookups
        expected = t.expected_touched(t.rows, n)
        need = min(t.rows, math.ceil(2 * (expected + 4 * math.sqrt(expected))))
        have = cache.capacity(t.name, t.rows)
        if need > have:
            ratios[t.name] = need / t.rows
            raised[t.name] = (have, need)
    return replace(cache, table_ratios=ratios), raised
