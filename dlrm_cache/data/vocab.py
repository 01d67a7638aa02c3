"""Id frequencies and the frequency-ranked re-numbering (NVTabular's Categorify: fit -> finalize ->
transform).

``ValueCounter`` counts raw values of one feature over chunks: in a hash table (``vocab_map.cpp``, one
probe or two per value) where the C++ library builds, else as sorted per-chunk runs merged when they
outgrow the merged table (an LSM-style amortized merge). Two counters merge as sorted runs, so counting
can run one file per process. ``Vocabulary`` ranks values by descending train count (ties by raw
value, the empty value ranked like any other); values seen fewer than ``min_count`` times, and values
never seen in train, share one "rare" id ranked by its total train count. The hottest k rows are then
ids 0..k-1. ``IdLookup`` re-numbers raw values in about 9 bytes a kept value (what the write pass holds).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlrm_cache.native_build import NativeUnavailable, load

VOCAB_GROUP_ROWS = 1 << 20  # ids a row group of a vocabulary file holds
LOOKUP_BYTES = 9  # an ``IdLookup``'s bytes a kept value, at most (32-bit raw values)


PAIR = np.dtype([("value", "<i8"), ("count", "<i8")])  # a value and its count, as counters drain them


class ValueCounter:
    def __init__(self, native: bool = True) -> None:
        """``native``: count in the C++ hash table where it builds (the same counts either way)."""
        self.values = np.empty(0, dtype=np.int64)  # unique (sorted, once merged)
        self.counts = np.empty(0, dtype=np.int64)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._run_size = 0
        self._table = _NativeCounter.create() if native else None
        self._drained = np.empty(0, dtype=PAIR)  # what ``drain`` hands out, reused

    def add(self, raw: np.ndarray) -> None:
        """Count ``raw`` (int64 raw values, -1 .. 2^32 - 1 as the parsers give them; any stride)."""
        if self._table is not None:
            self._table.add(raw)
            return
        v, c = _unique_counts(raw)
        self._runs.append((v, c))
        self._run_size += len(v)
        if self._run_size > max(1 << 20, len(self.values)):
            self._compact()

    def distinct(self) -> int:
        """Distinct values held now (an upper bound while runs are not merged)."""
        if self._table is not None:
            return self._table.size()
        return len(self.values) + self._run_size

    def merge(self, other: ValueCounter) -> None:
        other._compact()
        self._runs.append((other.values, other.counts))
        self._compact()

    def _compact(self) -> None:
        if self._table is not None:  # from here on, counted as runs (and drained into new memory)
            self._runs.append(self._table.export())
            self._table, self._drained = None, np.empty(0, dtype=PAIR)
        if not self._runs:
            return
        if len(self.values) == 0 and len(self._runs) == 1:  # one run: its values are distinct already
            (self.values, self.counts), self._runs, self._run_size = self._runs[0], [], 0
            return
        v = np.concatenate([self.values, *(r[0] for r in self._runs)])
        c = np.concatenate([self.counts, *(r[1] for r in self._runs)])
        self.values, inverse = np.unique(v, return_inverse=True)
        self.counts = np.bincount(inverse, weights=c, minlength=len(self.values)).astype(np.int64)
        self._runs, self._run_size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct values (in no particular order) and their counts."""
        self._compact()
        return self.values, self.counts

    def drain(self, shift: int, parts: int) -> tuple[np.ndarray, np.ndarray]:
        """Every distinct value with its count (``PAIR``s), grouped by part - ``(value + 1) >> shift``,
        the last part taking any beyond - the parts in order, and where each part starts (``parts + 1``
        offsets); the counter is left empty. The pairs are valid until the next drain: in the hash table's
        case their memory, like the table's, is used again (no new pages to fault in for every run).
        Counts held as arrays (merged counters, or no compiler) drain into new memory: a merged counter
        spills seldom, and keeps no buffer beside its counts."""
        if self._table is not None:
            return self._table.drain(shift, parts, self._room)
        values, counts = self.result()
        order, bounds = grouped(np.minimum((values + 1) >> shift, parts - 1), parts)
        pairs = np.empty(len(values), dtype=PAIR)
        pairs["value"], pairs["count"] = values[order], counts[order]
        self.values, self.counts = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        return pairs, bounds

    def _room(self, n: int) -> np.ndarray:
        """``n`` pairs of the reused drain buffer (made larger when needed)."""
        if len(self._drained) < n:
            self._drained = np.empty(n, dtype=PAIR)
        return self._drained[:n]

    def __getstate__(self) -> dict:
        self._compact()  # a counter crosses a process boundary as arrays, not as a C++ table
        return self.__dict__


def grouped(key: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """The stable order that puts ``key`` (0 .. groups - 1) in ascending groups, and where each group
    starts in it (``groups + 1`` offsets). Keys of 16 bits or fewer are sorted by numpy's radix sort."""
    narrow = np.min_scalar_type(groups - 1)
    if narrow.itemsize <= 2:
        key = key.astype(narrow)
    order = np.argsort(key, kind="stable")
    return order, np.searchsorted(key[order], np.arange(groups + 1))


def _unique_counts(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(raw, return_counts=True)``, faster for raw hashes (0 .. 2^32 - 1, and -1 for the
    empty value): the empty value is counted apart and the rest sorted as 32-bit values (~1.3x)."""
    present = raw >= 0
    n_empty = len(raw) - int(np.count_nonzero(present))
    values = raw[present] if n_empty else raw
    if len(values) == 0 or values.max() >= 1 << 32 or (n_empty and raw.min() < -1):
        v, c = np.unique(raw, return_counts=True)
        return v, c.astype(np.int64)
    values = np.sort(values.astype(np.uint32))
    starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1], [True])))
    v, c = values[starts[:-1]].astype(np.int64), np.diff(starts)
    if n_empty:
        v, c = np.concatenate(([-1], v)), np.concatenate(([n_empty], c))
    return v, c.astype(np.int64)


@dataclass
class Vocabulary:
    """The re-numbering of one feature: ``raw[i]`` and ``count[i]`` of new id ``i``; ``rare_id`` is
    the shared id of rare and unseen values (its ``raw`` entry is meaningless)."""

    raw: np.ndarray  # (V,) int64 raw value per new id
    count: np.ndarray  # (V,) int64 train count per new id: non-increasing (hottest first)
    rare_id: int

    @classmethod
    def fit(cls, values: np.ndarray, counts: np.ndarray, min_count: int) -> Vocabulary:
        keep = counts >= min_count
        return cls.fit_kept(values[keep], counts[keep], int(counts[~keep].sum()))

    @classmethod
    def fit_kept(cls, values: np.ndarray, counts: np.ndarray, rare_count: int) -> Vocabulary:
        """From the kept values (distinct) and their counts, and the train count of all the others."""
        raw, cnt = _by_rank(values, counts)
        # The rare bucket ranks by its count, after the kept values of the same count (as the value
        # "+inf" would).
        rare_id = int(np.searchsorted(-cnt, -rare_count, side="right"))
        raw = np.insert(raw, rare_id, np.iinfo(np.int64).max)
        return cls(raw, np.insert(cnt, rare_id, rare_count), rare_id)

    def __len__(self) -> int:
        return len(self.raw)

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The raw value and train count of each id, ``VOCAB_GROUP_ROWS`` ids at a time (a row group of
        the vocabulary file each)."""
        for lo in range(0, len(self), VOCAB_GROUP_ROWS):
            yield self.raw[lo : lo + VOCAB_GROUP_ROWS], self.count[lo : lo + VOCAB_GROUP_ROWS]

    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """The train counts of the ids, descending, and how many ids have each."""
        levels, n = np.unique(self.count, return_counts=True)
        return levels[::-1], n[::-1]

    def in_memory(self) -> Vocabulary:
        return self

    def lookup(self, native: bool = True) -> IdLookup:
        """What re-numbers raw values (``IdLookup``): made from this vocabulary, which the caller may
        then drop (its raw values and counts take 16 bytes a value, the lookup about 9)."""
        return IdLookup.of(self.raw, self.rare_id, native)


class IdLookup:
    """Raw values -> new ids of one feature; values not kept map to ``rare_id``.

    Compact: the kept values as sorted 32-bit keys with 32-bit ids beside them (8 bytes a value) and a
    directory of where each run of keys sharing their top bits starts (at most a quarter of an entry,
    one byte, a value); the empty value (-1) apart. Looked up by ``vocab_map.cpp`` where it builds, else
    by a binary search (the same ids). Raw values beyond 32 bits (not Criteo's hashes: other integer
    data) take int64 keys and ids instead, 16 bytes a value."""

    def __init__(self, keys: np.ndarray, ids: np.ndarray, rare_id: int, empty_id: int, size: int,
                 native: bool):  # fmt: skip
        self.keys, self.ids, self.rare_id, self.empty_id, self.size = keys, ids, rare_id, empty_id, size
        self.bits = max(0, len(keys).bit_length() - 3) if keys.dtype == np.uint32 else 0
        self.directory = _directory(keys, self.bits) if keys.dtype == np.uint32 else None
        self._lib = _lookup_library() if native and keys.dtype == np.uint32 else None

    @classmethod
    def of(cls, raw: np.ndarray, rare_id: int, native: bool = True) -> IdLookup:
        """From a vocabulary's raw value per id (``Vocabulary.raw``) and its rare id."""
        ids = np.arange(len(raw), dtype=np.int64)
        kept = (ids != rare_id) & (raw != -1)
        empty = np.flatnonzero((raw == -1) & (ids != rare_id))
        empty_id = int(empty[0]) if len(empty) else rare_id
        values = raw[kept]
        if len(values) and (values.min() < 0 or values.max() >= 1 << 32):  # not 32-bit hashes
            order = np.argsort(values, kind="stable")
            return cls(values[order], ids[kept][order], rare_id, empty_id, len(raw), native)
        # one 64-bit key (value, id) per kept value, sorted in place, then split: 8 bytes a value kept
        packed = (values.astype(np.uint64) << np.uint64(32)) | ids[kept].astype(np.uint64)
        del values, ids, kept
        packed.sort()
        keys = (packed >> np.uint64(32)).astype(np.uint32)
        own = (packed & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        return cls(keys, own, rare_id, empty_id, len(raw), native)

    def save(self, path: Path) -> None:
        """Into the folder ``path`` (made here), for ``load`` (the directory is made again there)."""
        path.mkdir()
        np.save(path / "keys.npy", self.keys)
        np.save(path / "ids.npy", self.ids)
        np.save(path / "numbers.npy", np.array([self.rare_id, self.empty_id, self.size], dtype=np.int64))

    @classmethod
    def load(cls, path: Path, native: bool = True) -> IdLookup:
        rare_id, empty_id, size = np.load(path / "numbers.npy").tolist()
        return cls(np.load(path / "keys.npy"), np.load(path / "ids.npy"), rare_id, empty_id, size, native)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.ids.nbytes + (0 if self.directory is None else self.directory.nbytes)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lib": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lib = _lookup_library() if self.keys.dtype == np.uint32 else None

    def transform(self, raw: np.ndarray, dtype: type = np.int64) -> np.ndarray:
        """Raw values (int64) -> new ids, as ``dtype``: int64, or int32 (the output's column type for a
        table of fewer than 2^31 ids) written as such, not narrowed from int64 afterwards."""
        raw = np.ascontiguousarray(raw, dtype=np.int64)
        if self._lib is not None:
            out = np.empty(len(raw), dtype=dtype)
            lookup, kind = (
                (self._lib.sorted_map_lookup_int32, _I32)
                if out.dtype == np.int32
                else (self._lib.sorted_map_lookup, _I64)
            )
            lookup(
                _ptr(self.keys, _U32), _ptr(self.ids, _U32), len(self.keys), _ptr(self.directory, _U32),
                self.bits, _ptr(raw, _I64), len(raw), self.rare_id, self.empty_id, _ptr(out, kind),
            )  # fmt: skip
            return out
        out = np.full(len(raw), self.rare_id, dtype=np.int64)
        out[raw == -1] = self.empty_id
        if self.keys.dtype == np.uint32:
            where = np.flatnonzero((raw >= 0) & (raw < 1 << 32))
            query = raw[where].astype(np.uint32)
        else:
            where = np.flatnonzero(raw != -1)
            query = raw[where]
        if len(self.keys) and len(where):
            pos = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
            hit = self.keys[pos] == query
            out[where[hit]] = self.ids[pos[hit]]
        return out.astype(dtype, copy=False)


def _lookup_library() -> ctypes.CDLL | None:
    """``vocab_map.cpp``, or None where it does not build (the binary search gives the same ids)."""
    try:
        return load(Path(__file__).with_name("vocab_map.cpp"), _declare)
    except NativeUnavailable:
        return None


def _directory(keys: np.ndarray, bits: int) -> np.ndarray:
    """Where each run of sorted ``keys`` sharing their top ``bits`` bits starts, and ``len(keys)`` last."""
    if bits == 0:
        return np.array([0, len(keys)], dtype=np.uint32)
    starts = (np.arange(1 << bits, dtype=np.uint64) << np.uint64(32 - bits)).astype(np.uint32)
    return np.append(np.searchsorted(keys, starts), len(keys)).astype(np.uint32)


def _by_rank(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ``values`` and their ``counts``, by descending count, ties by ascending value. Raw
    hashes (-1 .. 2^32 - 1) with counts under 2^30 sort as one 64-bit key (count rank, value): one
    plain sort instead of lexsort's two stable ones."""
    if len(values) == 0:
        return values.astype(np.int64), counts.astype(np.int64)
    top = int(counts.max())
    if values.min() >= -1 and values.max() < 1 << 32 and top < 1 << 30:
        key = ((top - counts) << 33) | (values + 1)
        key.sort()
        return (key & ((1 << 33) - 1)) - 1, top - (key >> 33)
    order = np.lexsort((values, -counts))
    return values[order], counts[order]


_I64 = ctypes.POINTER(ctypes.c_int64)
_U32 = ctypes.POINTER(ctypes.c_uint32)
_I32 = ctypes.POINTER(ctypes.c_int32)


def _declare(lib: ctypes.CDLL) -> None:
    lib.value_counter_new.restype = ctypes.c_void_p
    lib.value_counter_new.argtypes = []
    lib.value_counter_free.argtypes = [ctypes.c_void_p]
    lib.value_counter_add.argtypes = [ctypes.c_void_p, _I64, ctypes.c_int64, ctypes.c_int64]
    lib.value_counter_add.restype = None
    lib.value_counter_size.argtypes = [ctypes.c_void_p]
    lib.value_counter_size.restype = ctypes.c_int64
    lib.value_counter_export.argtypes = [ctypes.c_void_p, _I64, _I64]
    lib.value_counter_export.restype = None
    lib.value_counter_drain.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, _I64, _I64]
    lib.value_counter_drain.restype = None
    lib.sorted_map_lookup.argtypes = [_U32, _U32, ctypes.c_int64, _U32, ctypes.c_int64, _I64, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, _I64]  # fmt: skip
    lib.sorted_map_lookup.restype = None
    lib.sorted_map_lookup_int32.argtypes = [*lib.sorted_map_lookup.argtypes[:-1], _I32]
    lib.sorted_map_lookup_int32.restype = None


def _ptr(a: np.ndarray, kind):
    return a.ctypes.data_as(kind)


class _NativeCounter:
    """Counts per distinct raw value in a hash table (``vocab_map.cpp``); ``add`` releases the GIL."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        self._handle = lib.value_counter_new()

    @classmethod
    def create(cls) -> _NativeCounter | None:
        """A counter, or None where the C++ library does not build (numpy counts instead)."""
        try:
            return cls(load(Path(__file__).with_name("vocab_map.cpp"), _declare))
        except NativeUnavailable:
            return None

    def add(self, raw: np.ndarray) -> None:
        if raw.dtype != np.int64 or raw.ndim != 1 or raw.strides[0] % 8:
            raw = np.ascontiguousarray(raw, dtype=np.int64).reshape(-1)
        stride = raw.strides[0] // 8 if len(raw) > 1 else 1
        self._lib.value_counter_add(self._handle, raw.ctypes.data_as(_I64), len(raw), stride)

    def size(self) -> int:
        return self._lib.value_counter_size(self._handle)

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct values and their counts; the table is freed."""
        n = self._lib.value_counter_size(self._handle)
        values, counts = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        self._lib.value_counter_export(self._handle, values.ctypes.data_as(_I64), counts.ctypes.data_as(_I64))
        self._free()
        return values, counts

    def drain(self, shift: int, parts: int, room) -> tuple[np.ndarray, np.ndarray]:
        """``ValueCounter.drain``, into ``room(n)`` (n pairs); the table is emptied, its room kept."""
        pairs, bounds = room(self.size()), np.empty(parts + 1, dtype=np.int64)
        self._lib.value_counter_drain(self._handle, shift, parts, _ptr(pairs, _I64), _ptr(bounds, _I64))
        return pairs, bounds

    def _free(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._lib.value_counter_free(self._handle)
            self._handle = None

    __del__ = _free
