"""A batch's ids made ready for one table group's cache: each id checked against its table, the bags
reordered sample-major (bag ``b * F + f`` is sample ``b``, feature ``f``: the pooled (B * F, D) output
is then DLRM's (B, F * D) layout with no copy), the sorted unique global rows (table's row offset + id)
with their occurrences, and each id's position among them.

Two implementations that give the same tensors: ``prepare.cpp`` (``NativePrepare``: per table, a
histogram or a radix sort, the tables over the threads), used with the native planner, and torch's
(``prepare_torch``: the reference, and the fallback where no compiler is found).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dlrm_cache.cache.layout import GroupLayout
from dlrm_cache.native_build import choose, load
from dlrm_cache.reused_buffers import ReusedBuffers

SOURCE = Path(__file__).with_name("prepare.cpp")
_NATIVE_LIMIT = 1 << 32  # ids and positions each fit in 32 bits of the native sort's keys


@dataclass
class PreparedBatch:
    """A batch's ids for one group, in host memory."""

    uniq: torch.Tensor  # (U,) sorted global rows
    inverse: torch.Tensor  # (N,) position in `uniq` of every id
    occurrences: torch.Tensor  # (U,) how often each unique row occurs
    offsets: torch.Tensor  # (B * F + 1,) bag offsets, sample-major: bag b * F + f is sample b, feature f
    batch_size: int
    lookups: torch.Tensor  # (T,) ids looked up per table
    one_hot: bool  # every bag holds one id
    seq: int | None = None  # lookahead: sequence number and arena position, set by register_future
    arena_base: int | None = None
    next_use: torch.Tensor | None = None  # (U,) each row's next use after this batch, once planned


def out_of_table(
    layout: GroupLayout, values: torch.Tensor, starts: list[int], counts: list[int], position: int
) -> ValueError:
    """The error for the id at ``position`` among the group's ids (taken feature after feature)."""
    f, at = 0, position
    while at >= counts[f]:
        at, f = at - counts[f], f + 1
    t = int(layout.feature_table[f])
    return ValueError(
        f"feature {layout.features[f]!r}: id {int(values[starts[f] + at])} is outside its table "
        f"{layout.configs[t].name!r} of {layout.rows[t]} rows"
    )


def prepare_torch(
    values: torch.Tensor,
    starts: list[int],
    lengths: torch.Tensor,
    layout: GroupLayout,
    threads: int | None = None,
) -> PreparedBatch:
    """The reference: torch operations. ``values`` the batch's ids (every feature), ``starts`` where
    each of the group's features starts in them, ``lengths`` (F, B) int64 its bags (``threads`` is
    not used: torch's operations use torch's threads)."""
    counts = lengths.sum(dim=1)
    local = torch.cat([values[s : s + c] for s, c in zip(starts, counts.tolist(), strict=True)]).to(
        torch.int64
    )
    limit = torch.repeat_interleave(layout.feature_rows, counts, output_size=len(local))
    bad = (local < 0) | (local >= limit)
    if bool(bad.any()):
        raise out_of_table(layout, values, starts, counts.tolist(), int(torch.nonzero(bad)[0]))
    global_ids = local + torch.repeat_interleave(layout.feature_row_offset, counts, output_size=len(local))
    global_ids, lengths_sm = _to_sample_major(global_ids, lengths)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths_sm, 0, out=offsets[1:])
    lookups = torch.zeros(layout.tables, dtype=torch.int64).index_add_(0, layout.feature_table, counts)
    return from_global_ids(global_ids, offsets, lengths.shape[1], lookups)


def from_global_ids(
    global_ids: torch.Tensor, offsets: torch.Tensor, batch_size: int, lookups: torch.Tensor
) -> PreparedBatch:
    """A batch from its global ids in sample-major bag order and their (B * F + 1) bag offsets: its
    unique rows by torch's ``unique``."""
    uniq, inverse, occurrences = torch.unique(
        global_ids, sorted=True, return_inverse=True, return_counts=True
    )
    lengths = offsets[1:] - offsets[:-1]
    one_hot = len(global_ids) == len(lengths) and bool((lengths == 1).all())
    return PreparedBatch(uniq, inverse, occurrences, offsets, batch_size, lookups, one_hot)


def _to_sample_major(ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder ids from a KeyedJaggedTensor's feature-major bags (F, B) to sample-major bags (B, F)."""
    nf, batch = lengths.shape
    lengths_sm = lengths.t().reshape(-1)
    if len(ids) == nf * batch and bool((lengths == 1).all()):  # one id per bag (Criteo): a transpose
        return ids.view(nf, batch).t().reshape(-1), lengths_sm
    bag_fm = torch.repeat_interleave(torch.arange(nf * batch), lengths.reshape(-1), output_size=len(ids))
    start_fm = torch.cumsum(lengths.reshape(-1), 0) - lengths.reshape(-1)
    start_sm = (torch.cumsum(lengths_sm, 0) - lengths_sm).view(batch, nf).t().reshape(-1)
    new_pos = start_sm[bag_fm] + (torch.arange(len(ids)) - start_fm[bag_fm])
    return torch.empty_like(ids).index_copy_(0, new_pos, ids), lengths_sm


class _PrepareArgs(ctypes.Structure):
    # the field order of PrepareArgs in prepare.cpp
    _fields_ = [
        *[(k, ctypes.c_int64) for k in ("features", "batch", "tables", "threads")],
        *[(k, ctypes.c_void_p) for k in ("values", "value_start", "lengths", "feature_table", "row_offsets")],
        *[(k, ctypes.c_void_p) for k in ("offsets", "inverse", "uniq", "occurrences", "lookups")],
        *[(k, ctypes.c_int64) for k in ("n_uniq", "one_hot", "bad")],
    ]


def _declare(lib: ctypes.CDLL) -> None:
    lib.prepare_ids.argtypes = [ctypes.POINTER(_PrepareArgs)]
    lib.prepare_ids.restype = None
    for name in ("checksum_i64", "checksum_i32"):
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64]
        getattr(lib, name).restype = ctypes.c_int64


def library() -> ctypes.CDLL:
    """The library, built if needed; raises ``NativeUnavailable`` saying why not."""
    return load(SOURCE, _declare, openmp=True)


class NativePrepare:
    """``prepare.cpp`` for one group (the same tensors as ``prepare_torch``); its sort's workspace is
    kept by each thread that calls it, sized by the largest batch it prepared, and its outputs are
    views of buffers reused once no batch holds them (``ReusedBuffers``)."""

    def __init__(self, layout: GroupLayout):
        self.layout = layout
        self._lib = library()
        self._row_offsets = layout.row_bounds.contiguous()
        self._feature_table = layout.feature_table.contiguous()
        self.fits = max(layout.rows) < _NATIVE_LIMIT
        self._buffers = ReusedBuffers(torch.int64)

    def __reduce__(self):
        """A copy (``copy.deepcopy``, pickle) loads the library again (a ctypes handle has no copy)."""
        return NativePrepare, (self.layout,)

    def __call__(
        self, values: torch.Tensor, starts: list[int], lengths: torch.Tensor, threads: int | None = None
    ) -> PreparedBatch:
        """``threads``: the threads the tables are spread over (None: torch's intra-op threads)."""
        n = int(lengths.sum())
        if not self.fits or n >= _NATIVE_LIMIT:
            return prepare_torch(values, starts, lengths, self.layout)
        values = values.to(torch.int64).contiguous()
        lengths = lengths.contiguous()
        nf, batch = lengths.shape
        value_start = torch.tensor(starts, dtype=torch.int64)
        tables, bags = self.layout.tables, nf * batch
        buf = self._buffers.take(tables + bags + 1 + 3 * n)
        lookups, offsets = buf[:tables], buf[tables : tables + bags + 1]
        inverse, uniq, occurrences = buf[tables + bags + 1 :].view(3, n)
        a = _PrepareArgs(
            features=nf, batch=batch, tables=tables, threads=threads or torch.get_num_threads(),
            values=values.data_ptr(), value_start=value_start.data_ptr(), lengths=lengths.data_ptr(),
            feature_table=self._feature_table.data_ptr(), row_offsets=self._row_offsets.data_ptr(),
            offsets=offsets.data_ptr(), inverse=inverse.data_ptr(),
            uniq=uniq.data_ptr(),
            occurrences=occurrences.data_ptr(), lookups=lookups.data_ptr(),
        )  # fmt: skip
        self._lib.prepare_ids(ctypes.byref(a))
        if a.bad >= 0:
            raise out_of_table(self.layout, values, starts, lengths.sum(dim=1).tolist(), a.bad)
        u = a.n_uniq
        return PreparedBatch(uniq[:u], inverse, occurrences[:u], offsets, batch, lookups, bool(a.one_hot))


def preparer(layout: GroupLayout, native: bool) -> Callable[..., PreparedBatch]:
    """The group's preparation: ``NativePrepare`` where ``native`` (the native planner is used) and it
    builds, else ``prepare_torch``."""
    if native and choose("auto", "cache.planner", library, "id preparation", "torch prepares the ids"):
        return NativePrepare(layout)
    return functools.partial(prepare_torch, layout=layout)
