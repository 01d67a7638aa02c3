"""Counting a feature's values in bounded memory: once its counter holds ``limit`` distinct values,
they go to disk as a run, split by value into ``PARTITIONS`` files, and counting starts again in the
same memory (``ValueCounter.drain``: the hash table emptied in place, the run's buffer reused).

Fitting then reads one partition at a time (every run's share of it: the values of one partition only),
sums the counts of each value and hands those seen ``min_count`` times or more to a ``SpilledVocabulary``,
which ranks them on disk: what is ever held together is one partition's distinct values, never the
counts of every distinct value nor every kept value with its count. The vocabulary is the same as from
one in-memory counter (``Vocabulary.fit``): the same counts, ranked the same way.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np

from dlrm_cache.data.spilled_vocab import SpilledVocabulary, append_by_key, append_groups
from dlrm_cache.data.vocab import PAIR, ValueCounter, Vocabulary

PARTITIONS = 64
_SHIFT = 33 - 6  # raw values -1 .. 2^32 - 1, shifted by one: 33 bits; the top 6 pick the partition
BYTES_PER_VALUE = 100  # a counter's bytes per distinct value at its peak (hash table growth, export)


class SpilledCounter:
    """A ``ValueCounter`` whose runs spill into ``folder/<name>-<process id>.<partition>.bin``
    (appended): the counters of one feature share a process's files, whatever inputs it counts, so a
    run creates a few files a feature and process, not a set per input."""

    def __init__(self, folder: Path, name: str, limit: int):
        self.folder, self.name, self.limit = folder, name, max(1, limit)
        self.counter = ValueCounter()
        self.files: set[Path] = set()  # every partition file written (by this counter, or merged ones)
        self.spilled_bytes = 0
        self.spills = 0

    def add(self, raw: np.ndarray) -> None:
        self.counter.add(raw)
        if self.counter.distinct() >= self.limit:
            self.spill()

    def spill(self) -> None:
        # Each partition's pairs in no order: fitting sums each partition by value.
        pairs, bounds = self.counter.drain(_SHIFT, PARTITIONS)
        paths = [self.folder / f"{self.name}-{os.getpid()}.{p}.bin" for p in range(PARTITIONS)]
        self.files.update(paths[p] for p in append_groups(pairs, bounds, paths))
        if len(pairs):
            self.spilled_bytes += pairs.nbytes
            self.spills += 1

    def merge(self, other: SpilledCounter) -> None:
        """Take in another counter of the same feature (another input file's): its runs stay on disk."""
        self.counter.merge(other.counter)
        self.files |= other.files
        self.spilled_bytes += other.spilled_bytes
        self.spills += other.spills
        if self.counter.distinct() >= self.limit:
            self.spill()

    def fit(self, min_count: int, partition_bytes: int = 1 << 30) -> Vocabulary | SpilledVocabulary:
        """The vocabulary: in memory where nothing spilled, else ranked on disk (``SpilledVocabulary``)
        from one partition at a time, a partition of more than ``partition_bytes`` of runs split first
        by its values' next bits into pieces of about that size; the spilled runs are removed."""
        if not self.files:  # nothing spilled: the in-memory path
            return Vocabulary.fit(*self.counter.result(), min_count)
        self.spill()
        self.counter = ValueCounter()  # its table and buffer go: nothing more is counted
        by_part: dict[int, list[Path]] = {}
        for path in self.files:
            by_part.setdefault(int(path.name.rsplit(".", 2)[1]), []).append(path)
        vocab = SpilledVocabulary(self.folder, self.name)

        def merged(p: int, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
            runs = [np.fromfile(path, dtype=PAIR) for path in paths]
            pairs = np.concatenate(runs) if len(runs) > 1 else runs[0]
            del runs
            for path in paths:
                path.unlink()
            return _summed(pairs, p)

        pieces = (
            piece for p in sorted(by_part) for piece in self._pieces(p, sorted(by_part[p]), partition_bytes)
        )
        # Two pieces merged side by side (numpy's sorts release the GIL), handed over in value order:
        # at most two merged and one being merged in memory.
        with ThreadPoolExecutor(2, thread_name_prefix="dlrm-preprocess-merge") as pool:
            pending = deque(pool.submit(merged, *piece) for piece in islice(pieces, 2))
            while pending:
                values, counts = pending.popleft().result()
                for piece in islice(pieces, 1):
                    pending.append(pool.submit(merged, *piece))
                vocab.add_partition(values, counts, min_count)
                del values, counts
        return vocab

    def _pieces(self, p: int, paths: list[Path], most: int) -> Iterator[tuple[int, list[Path]]]:
        """Partition ``p``'s runs (``paths``) as pieces of at most about ``most`` bytes, in value order:
        the partition whole, or split by the values' next bits, a block of a run at a time."""
        size = sum(path.stat().st_size for path in paths)
        if size <= most:
            yield p, paths
            return
        bits = (-(-size // most) - 1).bit_length()
        split = [self.folder / f"{self.name}.{p}.split{k}" for k in range(1 << bits)]
        for path in paths:
            with open(path, "rb") as f:
                while len(block := np.fromfile(f, dtype=PAIR, count=max(1, most // 4 // PAIR.itemsize))):
                    append_by_key(block, ((block["value"] + 1) >> (_SHIFT - bits)) & ((1 << bits) - 1), split)
            path.unlink()
        for piece in split:
            if piece.exists():
                yield p, [piece]

    def __getstate__(self) -> dict:
        self.counter.result()  # compacted: it crosses a process boundary as arrays
        return self.__dict__


_COUNT_BITS = 36  # a count beside a value's 27 low bits in one int64 key


def _summed(pairs: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Partition ``p``'s distinct values (ascending) and the sum of their counts in ``pairs``: one
    sort of (value's low bits, count) keys, then a sum per value (~4x ``np.unique``'s inverse)."""
    if not len(pairs) or int(pairs["count"].max()) >= 1 << _COUNT_BITS:
        values, inverse = np.unique(pairs["value"], return_inverse=True)
        return values, np.bincount(inverse, weights=pairs["count"], minlength=len(values)).astype(np.int64)
    key = ((pairs["value"] + 1 - (p << _SHIFT)) << _COUNT_BITS) | pairs["count"]
    del pairs
    key.sort()
    local = key >> _COUNT_BITS
    starts = np.flatnonzero(np.concatenate(([True], local[1:] != local[:-1])))
    counts = np.add.reduceat(key & ((1 << _COUNT_BITS) - 1), starts)
    return local[starts] + (p << _SHIFT) - 1, counts
