"""Id frequencies and the frequency-ranked re-numbering (NVTabular's Categorify: fit -> finalize ->
transform).

``ValueCounter`` counts raw values of one feature over chunks: in a hash table (``vocab_map.cpp``, one
probe or two per value) where the C++ library builds, else as sorted per-chunk runs merged when they
outgrow the merged table (an LSM-style amortized merge). Two counters merge as sorted runs, so counting
can run one file per process. ``Vocabulary`` ranks values by descending train count (ties by raw
value, the empty value ranked like any other); values seen fewer than ``min_count`` times, and values
never seen in train, share one "rare" id ranked by its total train count. The hottest k rows are then
ids 0..k-1.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlrm_cache.native_build import NativeUnavailable, load


class ValueCounter:
    def __init__(self, native: bool = True) -> None:
        """``native``: count in the C++ hash table where it builds (the same counts either way)."""
        self.values = np.empty(0, dtype=np.int64)  # unique (sorted, once merged)
        self.counts = np.empty(0, dtype=np.int64)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._run_size = 0
        self._table = _NativeCounter.create() if native else None

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
        if self._table is not None:  # from here on, counted as runs
            self._runs.append(self._table.export())
            self._table = None
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

    def __getstate__(self) -> dict:
        self._compact()  # a counter crosses a process boundary as arrays, not as a C++ table
        return self.__dict__


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
    native: bool = True  # look values up in vocab_map.cpp's hash table where it builds
    _map: _NativeMap | None = field(default=None, init=False, repr=False, compare=False)
    _sorted: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

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

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}  # the hash table is rebuilt where it is next used

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """Raw values -> new ids; values not kept map to ``rare_id``."""
        if self.native and self._map is None:
            try:
                self._map = _NativeMap(*self._kept())
            except NativeUnavailable:
                self.native = False  # the binary search below gives the same ids
        if self._map is not None:
            return self._map.lookup(raw, self.rare_id)
        if self._sorted is None:  # the kept values in ascending order, and their ids
            keys, ids = self._kept()
            sorter = np.argsort(keys, kind="stable")
            self._sorted = keys[sorter], ids[sorter]
        keys, ids = self._sorted
        if len(keys) == 0:
            return np.full(len(raw), self.rare_id, dtype=np.int64)
        pos = np.minimum(np.searchsorted(keys, raw), len(keys) - 1)
        return np.where(keys[pos] == raw, ids[pos], self.rare_id)

    def _kept(self) -> tuple[np.ndarray, np.ndarray]:
        """The kept raw values and their ids (every id but the rare bucket's), in id order."""
        ids = np.delete(np.arange(len(self.raw)), self.rare_id)
        return self.raw[ids], ids


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
    lib.vocab_map_new.restype = ctypes.c_void_p
    lib.vocab_map_new.argtypes = [_I64, _I64, ctypes.c_int64]
    lib.vocab_map_free.argtypes = [ctypes.c_void_p]
    lib.vocab_map_lookup.argtypes = [ctypes.c_void_p, _I64, ctypes.c_int64, ctypes.c_int64, _I64]
    lib.vocab_map_lookup.restype = None


class _NativeMap:
    """A hash table of raw value -> id (``vocab_map.cpp``)."""

    def __init__(self, keys: np.ndarray, ids: np.ndarray):
        self._lib = load(Path(__file__).with_name("vocab_map.cpp"), _declare)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self._handle = self._lib.vocab_map_new(keys.ctypes.data_as(_I64), ids.ctypes.data_as(_I64), len(keys))

    def lookup(self, raw: np.ndarray, missing: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.int64)
        out = np.empty(len(raw), dtype=np.int64)
        self._lib.vocab_map_lookup(
            self._handle, raw.ctypes.data_as(_I64), len(raw), missing, out.ctypes.data_as(_I64)
        )
        return out

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._lib.vocab_map_free(self._handle)
            self._handle = None


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

    def _free(self) -> None:
        if getattr(self, "_handle", None) is not None:
            self._lib.value_counter_free(self._handle)
            self._handle = None

    __del__ = _free
