"""A feature's vocabulary ranked out of core, from its counts spilled by value into partitions
(``spilled_counts``): what is held is the feature's re-numbering (``IdLookup``, 8 bytes a kept value)
and one partition's values at a time, never every kept value with its count (``Vocabulary``: 16 bytes,
and ~65 at the peak of ranking it in memory).

1. A partition at a time: its runs merged (the counts of each value summed), the kept values written
   back sorted by value, their counts tallied (how many kept values have each count), the others'
   counts summed (the rare bucket).
2. The ids follow from the tally. Ranked by descending count, ties by ascending value, a value's id is
   the number of kept values of a higher count, plus the number of values of its own count before it
   in value order (the partitions are value ranges, read in order), plus one past the rare bucket.
   A partition at a time again: each value's id goes into the lookup (sorted by value, as the
   partitions come) and, with its value, into the bucket file of its range of ids.
3. The vocabulary file is written a bucket (a row group) at a time.

The ids are those of ``Vocabulary.fit_kept`` on the same counts, so the files are the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dlrm_cache.data.vocab import PAIR, VOCAB_GROUP_ROWS, IdLookup, Vocabulary, grouped
from dlrm_cache.files import naming

_PLACED = np.dtype([("id", "<i8"), ("value", "<i8")])  # a kept value in the bucket of its id


class SpilledVocabulary:
    """The vocabulary of one feature whose kept values wait on disk (``folder/<name>.kept.<p>``) until
    ``rank`` places them; then its file is written from buckets (``chunks``), its lookup is held."""

    def __init__(self, folder: Path, name: str, bucket_rows: int = VOCAB_GROUP_ROWS):
        self.folder, self.name, self.bucket_rows = folder, name, bucket_rows
        self.partitions: list[Path] = []  # the kept values of each partition, sorted by value
        self.kept = 0
        self.rare_count = 0
        self._tally: dict[int, int] = {}  # count -> kept values with it
        self._lookup: IdLookup | None = None

    def add_partition(self, values: np.ndarray, counts: np.ndarray, min_count: int) -> None:
        """One partition's distinct values (ascending, above every earlier partition's) and their counts."""
        keep = counts >= min_count
        self.rare_count += int(counts[~keep].sum())
        pairs = np.empty(int(keep.sum()), dtype=PAIR)
        pairs["value"], pairs["count"] = values[keep], counts[keep]
        path = self.folder / f"{self.name}.kept.{len(self.partitions)}"
        with naming(path):
            pairs.tofile(path)
        self.partitions.append(path)
        self.kept += len(pairs)
        levels, n = np.unique(pairs["count"], return_counts=True)
        for level, k in zip(levels.tolist(), n.tolist(), strict=True):
            self._tally[level] = self._tally.get(level, 0) + k

    @property
    def rare_id(self) -> int:
        """As ``Vocabulary.fit_kept`` places it: after the kept values of its count or more."""
        return sum(n for level, n in self._tally.items() if level >= self.rare_count)

    def __len__(self) -> int:
        return self.kept + 1

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """The train counts of the ids, descending, and how many ids have each (the rare bucket too)."""
        tally = dict(self._tally)
        tally[self.rare_count] = tally.get(self.rare_count, 0) + 1
        levels = np.array(sorted(tally, reverse=True), dtype=np.int64)
        return levels, np.array([tally[v] for v in levels.tolist()], dtype=np.int64)

    def rank(self, native: bool = True) -> None:
        """Step 2: every kept value's id, into the lookup and the buckets; the partition files go."""
        levels = np.array(sorted(self._tally, reverse=True), dtype=np.int64)
        before = np.cumsum([0] + [self._tally[v] for v in levels.tolist()])[:-1]  # kept ids above a count
        seen = np.zeros(len(levels), dtype=np.int64)  # per count, its values placed so far
        ascending = levels[::-1]
        rare_id = self.rare_id
        has_empty = False
        empty_id = rare_id
        keys = np.empty(self.kept, dtype=np.uint32)  # the empty value (-1) is not a key: trimmed below
        ids = np.empty(self.kept, dtype=np.uint32)
        filled = 0
        buckets = [self._bucket(b) for b in range(-(-len(self) // self.bucket_rows))]
        for path in self.partitions:
            pairs = np.fromfile(path, dtype=PAIR)
            path.unlink()
            values, counts = pairs["value"], pairs["count"]
            level = len(levels) - 1 - np.searchsorted(ascending, counts)
            order = np.argsort(level, kind="stable")  # by count, each count's values ascending
            by_level = level[order]
            place = np.arange(len(order)) - np.searchsorted(by_level, by_level)
            own = np.empty(len(order), dtype=np.int64)
            own[order] = before[by_level] + seen[by_level] + place
            seen += np.bincount(level, minlength=len(levels))
            own += own >= rare_id
            if len(values) and values[0] == -1:  # the empty value: its own id, outside the keys
                has_empty, empty_id = True, int(own[0])
            start = 1 if len(values) and values[0] == -1 else 0
            n = len(values) - start
            keys[filled : filled + n] = values[start:]
            ids[filled : filled + n] = own[start:]
            filled += n
            self._place(buckets, own, values)
        self.partitions = []
        keys, ids = keys[:filled], ids[:filled]
        self._lookup = IdLookup(keys, ids, rare_id, empty_id if has_empty else rare_id, len(self), native)

    def _bucket(self, b: int) -> Path:
        return self.folder / f"{self.name}.ids.{b}"

    def _place(self, buckets: list[Path], own: np.ndarray, values: np.ndarray) -> None:
        placed = np.empty(len(own), dtype=_PLACED)
        placed["id"], placed["value"] = own, values
        append_by_key(placed, own // self.bucket_rows, buckets)

    def lookup(self, native: bool = True) -> IdLookup:
        if self._lookup is None:
            self.rank(native)
        return self._lookup

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Step 3: the raw value and train count of each id, a bucket of ids at a time, once (each
        bucket file goes once read)."""
        self.lookup()
        rows = self.bucket_rows
        levels, n = self.histogram()
        ends = np.cumsum(n)  # the ids of each count end here
        for b, lo in enumerate(range(0, len(self), rows)):
            hi = min(len(self), lo + rows)
            raw = np.full(hi - lo, np.iinfo(np.int64).max, dtype=np.int64)  # the rare bucket's stays
            path = self._bucket(b)
            if path.exists():
                placed = np.fromfile(path, dtype=_PLACED)
                path.unlink()
                raw[placed["id"] - lo] = placed["value"]
            yield raw, levels[np.searchsorted(ends, np.arange(lo, hi), side="right")]

    def in_memory(self) -> Vocabulary:
        """The whole vocabulary as arrays (16 bytes a value): for what needs them (bags)."""
        raw, count = (np.concatenate(parts) for parts in zip(*self.chunks(), strict=True))
        return Vocabulary(raw, count, self.rare_id)


def append_by_key(rows: np.ndarray, key: np.ndarray, paths: list[Path]) -> list[int]:
    """Each of ``rows`` appended to the file ``paths[key]`` (keys 0 .. len(paths) - 1), in their order
    within each file; the keys written."""
    order, bounds = grouped(key, len(paths))
    return append_groups(rows[order], bounds, paths)


def append_groups(rows: np.ndarray, bounds: np.ndarray, paths: list[Path]) -> list[int]:
    """``rows[bounds[j]:bounds[j + 1]]`` appended to the file ``paths[j]``, for each such group that is
    not empty; the groups written."""
    written = np.flatnonzero(np.diff(bounds)).tolist()
    for j in written:
        with naming(paths[j]), open(paths[j], "ab") as f:
            f.write(rows[bounds[j] : bounds[j + 1]].view(np.uint8))
    return written
