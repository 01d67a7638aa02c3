"""The C++ step planner (``planner.cpp``), built on first use (``dlrm_cache.native_build``) and loaded
with ctypes.

It does what ``python_planner.PythonPlanner`` does (the reference, and the fallback where no compiler is
found), as a few loops over the step's unique rows instead of dozens of tensor operations, each with
its own Python overhead.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dlrm_cache.cache.policy import NO_NEXT_USE
from dlrm_cache.cache.slots import SlotPlan
from dlrm_cache.native_build import choose, load

if TYPE_CHECKING:
    from dlrm_cache.cache.bookkeeping import Bookkeeping
    from dlrm_cache.cache.prepare import PreparedBatch

SOURCE = Path(__file__).with_name("planner.cpp")
POLICIES = {"lru": 0, "lfu": 1, "freq": 2, "lookahead": 3}
_I64 = ctypes.POINTER(ctypes.c_int64)


class _PlanArgs(ctypes.Structure):
    # the field order of PlanArgs in planner.cpp
    _fields_ = [
        ("n_uniq", ctypes.c_int64),
        ("uniq", ctypes.c_void_p),
        ("occurrences", ctypes.c_void_p),
        ("batch_next_use", ctypes.c_void_p),
        ("step", ctypes.c_int64),
        ("pin_floor", ctypes.c_int64),
        ("host_rows", ctypes.c_void_p),
        ("n_host", ctypes.c_int64),
        ("row_to_slot", ctypes.c_void_p),
        ("slot_to_row", ctypes.c_void_p),
        ("filled", ctypes.c_void_p),
        ("dirty", ctypes.c_void_p),
        ("pin_until", ctypes.c_void_p),
        ("next_use", ctypes.c_void_p),
        ("last_used", ctypes.c_void_p),
        ("access_count", ctypes.c_void_p),
        ("coldness", ctypes.c_void_p),
        ("host", ctypes.c_void_p),
        ("cache", ctypes.c_void_p),
        ("width", ctypes.c_int64),
        ("slots", ctypes.c_void_p),
        ("overflow", ctypes.c_void_p),
        ("wb_rows", ctypes.c_void_p),
        ("wb_slots", ctypes.c_void_p),
        ("load_rows", ctypes.c_void_p),
        ("load_slots", ctypes.c_void_p),
        ("short_of", ctypes.c_void_p),
        ("counts", ctypes.c_int64 * 4),
        ("lookups", ctypes.c_void_p),
        ("stat_lookups", ctypes.c_void_p),
        ("stat_touched", ctypes.c_void_p),
        ("stat_loaded", ctypes.c_void_p),
        ("stat_from_host", ctypes.c_void_p),
        ("stat_written", ctypes.c_void_p),
    ]


# the planner's outputs of one entry per unique row (the lists cut to their lengths after)
_PER_ROW = ("slots", "overflow", "wb_rows", "wb_slots", "load_rows", "load_slots")


def _declare(lib: ctypes.CDLL) -> None:
    lib.planner_new.restype = ctypes.c_void_p
    lib.planner_new.argtypes = [ctypes.c_int64, _I64, _I64, ctypes.c_int, *[ctypes.c_int64] * 4]
    lib.planner_free.argtypes = [ctypes.c_void_p]
    lib.planner_reset.argtypes = [ctypes.c_void_p]
    lib.planner_plan.argtypes = [ctypes.c_void_p, ctypes.POINTER(_PlanArgs)]
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.future_add.argtypes = [ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64, ptr, ptr]
    lib.future_add.restype = None
    lib.copy_rows.argtypes = [ptr, ptr, ptr, ptr, i64, i64]
    lib.copy_rows.restype = None
    lib.gather_rows.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ptr]
    lib.gather_rows.restype = None
    lib.scatter_rows.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ptr, ptr]
    lib.scatter_rows.restype = None


def library() -> ctypes.CDLL:
    """The planner library, built if needed; raises ``NativeUnavailable`` saying why not."""
    return load(SOURCE, _declare, openmp=True)


def resolve(planner: str) -> str:
    """``cache.planner`` to the planner used: ``auto`` is ``native`` where it builds, else ``python``
    (with a warning, once)."""
    chosen = choose(planner, "cache.planner", library, "cache planner", "planning in Python")
    return "python" if chosen is None else "native"


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("the planner needs contiguous host tensors")
    return t.data_ptr()


def _rows_ptr(t: torch.Tensor | None, width: int) -> int | None:
    if t is not None and (t.dtype != torch.float32 or t.shape[1] != width):
        raise ValueError(f"row copies need float32 rows of width {width}, got {t.dtype} {tuple(t.shape)}")
    return _ptr(t)


def _index_ptr(t: torch.Tensor) -> int:
    if t.dtype != torch.int64:
        raise ValueError(f"row copies need int64 row indices, got {t.dtype}")
    return _ptr(t)


class RowKernels:
    """Row copies between the cache and the host tier where both are host memory (the CPU): one
    ``memcpy`` per row on the threads, instead of torch's ``index_copy_`` / ``index_select`` (faster:
    docs/cache.md). Rows are float32 of one width, indices int64, all contiguous host tensors."""

    def __init__(self) -> None:
        self._lib = library()

    def __reduce__(self):
        """A copy (``copy.deepcopy``, pickle) loads the library again (a ctypes handle has no copy)."""
        return RowKernels, ()

    def copy(self, src: torch.Tensor, src_rows: torch.Tensor, dst: torch.Tensor, dst_rows: torch.Tensor):
        """``dst[dst_rows] = src[src_rows]``."""
        w = src.shape[1]
        n = len(src_rows)
        self._lib.copy_rows(
            _rows_ptr(src, w), _index_ptr(src_rows), _rows_ptr(dst, w), _index_ptr(dst_rows), n, w
        )

    def gather(
        self,
        cache: torch.Tensor,
        slots: torch.Tensor,
        host: torch.Tensor | None,
        host_rows: torch.Tensor,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``cache[slots[u]]`` for each ``u``, or ``host[host_rows[u]]`` where ``slots[u] < 0`` (then
        ``host`` must be given), into ``out`` where given ((len(slots), width) float32)."""
        w = cache.shape[1]
        out = torch.empty(len(slots), w) if out is None else out
        self._lib.gather_rows(
            _rows_ptr(cache, w),
            _index_ptr(slots),
            _rows_ptr(host, w),
            _index_ptr(host_rows),
            len(slots),
            w,
            _ptr(out),
        )
        return out

    def scatter(
        self,
        rows: torch.Tensor,
        slots: torch.Tensor,
        host_rows: torch.Tensor,
        cache: torch.Tensor,
        dirty: torch.Tensor | None,
        host: torch.Tensor | None,
    ) -> None:
        """``rows[u]`` to ``cache[slots[u]]`` (marking ``dirty[slots[u]]`` where given), or to
        ``host[host_rows[u]]`` where ``slots[u] < 0``."""
        w = cache.shape[1]
        if dirty is not None and dirty.dtype != torch.bool:
            raise ValueError("dirty bits must be a bool tensor")
        self._lib.scatter_rows(
            _rows_ptr(rows, w), _index_ptr(slots), _index_ptr(host_rows), len(slots), w, _rows_ptr(cache, w),
            _ptr(dirty), _rows_ptr(host, w),
        )  # fmt: skip


class NativePlanner:
    """One table group's planner state (its candidate pools); the rest of its state is the group's."""

    def __init__(self, slot_offsets: list[int], row_offsets: list[int], policy: str, tuning: tuple[int, ...]):
        """``tuning``: the candidate pools' minimum size, factor and rebuild limit
        (``python_planner.pool_sizes``), and the unique rows from which a step is planned on several
        threads."""
        self._args = (slot_offsets, row_offsets, policy, tuning)
        self._lib = library()
        self.tables = len(slot_offsets) - 1
        slots = torch.tensor(slot_offsets, dtype=torch.int64)  # copied by planner_new
        rows = torch.tensor(row_offsets, dtype=torch.int64)
        self._handle = self._lib.planner_new(
            self.tables,
            ctypes.cast(slots.data_ptr(), _I64),
            ctypes.cast(rows.data_ptr(), _I64),
            POLICIES[policy],
            *tuning,
        )

    def __reduce__(self):
        """A copy (``copy.deepcopy``, pickle) is a planner of its own with empty pools, which is
        always correct: a pool only remembers candidates, and an empty one is refilled by a scan."""
        return NativePlanner, self._args

    def reset(self) -> None:
        """Forget the candidate pools (after the group's bookkeeping was reset)."""
        self._lib.planner_reset(self._handle)

    def register_future(self, book: Bookkeeping, uniq: torch.Tensor) -> tuple[int, int]:
        """In one pass: the batch's rows into ``book.future`` (its sequence number and arena base are
        returned), and the next use of its cached rows lowered to it."""
        f = book.future
        seq, base = f.open(len(uniq))
        self._lib.future_add(
            self._handle, _ptr(uniq), len(uniq), seq, base, f.tail, _ptr(f.last_pos), _ptr(f.arena),
            len(f.arena), NO_NEXT_USE, _ptr(book.state.row_to_slot), _ptr(book.state.next_use),
        )  # fmt: skip
        return seq, base

    def plan(
        self,
        book: Bookkeeping,
        batch: PreparedBatch,
        step: int,
        pin_floor: int,
        host_rows: torch.Tensor | None,
        tiers: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> SlotPlan:
        """Plan ``batch`` for ``step``, updating ``book``'s slot state and counters; with ``tiers`` (the
        host rows and the cache, both in host memory) also write back the dirty victims and load the
        misses (the plan then lists none to copy)."""
        n = len(batch.uniq)
        buf = torch.empty(len(_PER_ROW) * n + self.tables, dtype=torch.int64)
        out = dict(zip(_PER_ROW, buf[: len(_PER_ROW) * n].view(len(_PER_ROW), n), strict=True))
        out["short_of"] = buf[len(_PER_ROW) * n :]
        s, state = book.stats, book.state
        host, cache = tiers if tiers is not None else (None, None)
        a = _PlanArgs(
            n_uniq=n,
            uniq=_ptr(batch.uniq),
            occurrences=_ptr(batch.occurrences),
            batch_next_use=_ptr(batch.next_use),
            step=step,
            pin_floor=pin_floor,
            host_rows=_ptr(host_rows),
            n_host=0 if host_rows is None else len(host_rows),
            row_to_slot=_ptr(state.row_to_slot),
            slot_to_row=_ptr(state.slot_to_row),
            filled=_ptr(state.filled),
            dirty=_ptr(state.dirty),
            pin_until=_ptr(state.pin_until),
            next_use=_ptr(state.next_use),
            last_used=_ptr(state.last_used),
            access_count=_ptr(book.access_count),
            coldness=_ptr(book.coldness_table),
            host=_ptr(host),
            cache=_ptr(cache),
            width=0 if host is None else host.shape[1],
            **{k: _ptr(v) for k, v in out.items()},
            lookups=_ptr(batch.lookups),
            stat_lookups=_ptr(s.lookups),
            stat_touched=_ptr(s.touched),
            stat_loaded=_ptr(s.loaded),
            stat_from_host=_ptr(s.overflow),
            stat_written=_ptr(s.written),
        )
        self._lib.planner_plan(self._handle, ctypes.byref(a))
        n_over, n_wb, n_load, _ = a.counts
        return SlotPlan(
            out["slots"], out["overflow"][:n_over] if n_over else None, out["wb_rows"][:n_wb],
            out["wb_slots"][:n_wb], out["load_rows"][:n_load], out["load_slots"][:n_load], out["short_of"],
        )  # fmt: skip

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle is not None:
            self._lib.planner_free(handle)
            self._handle = None
