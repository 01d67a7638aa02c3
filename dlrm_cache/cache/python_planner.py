"""The step planner in tensor operations: the reference for (and the fallback of) ``planner.cpp``.

It plans as ``native.NativePlanner`` does, on the same ``SlotState``, and returns the same
``SlotPlan`` (tested step by step against it, ``tests/test_cache.py``). Eviction candidates come
from a pool per table (see ``_track_pool``): exact victim choice at O(misses) a step, not O(cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dlrm_cache.cache import policy as pol
from dlrm_cache.cache.slots import SlotPlan

if TYPE_CHECKING:
    from dlrm_cache.cache.bookkeeping import Bookkeeping
    from dlrm_cache.cache.layout import GroupLayout
    from dlrm_cache.cache.prepare import PreparedBatch

_INT64_MIN = torch.iinfo(torch.int64).min
_INT64_MAX = torch.iinfo(torch.int64).max
POOL_MIN = 4096  # eviction candidates kept per table, at least
POOL_FACTOR = 16  # ... and at least this many times the evictions asked for
POOL_REBUILD = 4  # rebuild a pool that has grown to this many times its target size


def pool_sizes() -> tuple[int, int, int]:
    """The candidate pools' sizes, which the C++ planner's take too."""
    return POOL_MIN, POOL_FACTOR, POOL_REBUILD


_EMPTY = torch.empty(0, dtype=torch.int64)


class PythonPlanner:
    """One table group's planner: its candidate pools, over the ``Bookkeeping`` each call is given."""

    def __init__(self, layout: GroupLayout):
        self.layout = layout
        self.book: Bookkeeping | None = None
        self.reset()

    @property
    def state(self):
        return self.book.state

    def reset(self) -> None:
        """Forget the candidate pools (after the group's slot state was reset): an empty pool with the
        top floor knows nothing."""
        tables, slots = self.layout.tables, self.layout.total_slots
        self._pool = [torch.empty(0, dtype=torch.int64) for _ in range(tables)]
        self._pool_floor = torch.full((tables,), _INT64_MAX, dtype=torch.int64)
        self._in_pool = torch.zeros(slots, dtype=torch.bool)

    def register_future(self, book: Bookkeeping, uniq: torch.Tensor) -> tuple[int, int]:
        """A batch's rows into ``book.future``; the next use of its cached rows lowered to it. Returns
        its sequence number and arena base."""
        seq, base = book.future.add(uniq)
        s = book.state.row_to_slot[uniq].to(torch.int64)
        s = s[s >= 0]
        book.state.next_use[s] = torch.minimum(book.state.next_use[s], torch.tensor(seq))
        return seq, base

    def plan(self, book: Bookkeeping, batch: PreparedBatch, step: int, pin_floor: int, host_rows,
             tiers: None = None) -> SlotPlan:  # fmt: skip
        """Plan ``batch`` for ``step`` (see ``TableGroup.plan``), updating ``book``'s slot state and
        counters; the rows to write back and load are returned, not copied (``tiers``: never given)."""
        self.book = book
        self._short_of = torch.zeros(self.layout.tables, dtype=torch.int64)
        self._write_back = (_EMPTY, _EMPTY)  # dirty victims: (rows, slots)
        loads = (_EMPTY, _EMPTY)
        uniq = batch.uniq
        self.book.stats.lookups += batch.lookups
        self.book.stats.touched += self.layout.count_per_table(uniq)
        slots = self.state.row_to_slot[uniq].to(torch.int64)
        hit = slots >= 0
        self.state.pin_until[slots[hit]] = step
        miss_pos = torch.nonzero(~hit).squeeze(1)
        overflow = held_pos = None
        if host_rows is not None and miss_pos.numel():
            held = torch.isin(uniq[miss_pos], host_rows)
            if bool(held.any()):
                held_pos, miss_pos = miss_pos[held], miss_pos[~held]
        lookahead = self.book.future is not None
        next_use = batch.next_use
        if miss_pos.numel():
            miss_rows = uniq[miss_pos]
            per_table_t = self.layout.count_per_table(miss_rows)
            if lookahead:
                miss_key = pol.lookahead_key(next_use[miss_pos], self.book.coldness(miss_rows))
            assigned, victims = self._assign_slots(
                batch, miss_rows, per_table_t, miss_key if lookahead else None, pin_floor
            )
            if victims.numel():
                self._evict(victims)
            admit = assigned >= 0
            loads = (miss_rows[admit], assigned[admit])
            self.state.admit(*loads)
            self.state.pin_until[assigned[admit]] = step
            slots[miss_pos] = assigned
            self.book.stats.loaded += per_table_t
            if not bool(admit.all()):
                overflow = miss_pos[~admit]
                self.book.stats.overflow += self.layout.count_per_table(uniq[overflow])
        if held_pos is not None:
            held_per_table = self.layout.count_per_table(uniq[held_pos])
            self.book.stats.loaded += held_per_table
            self.book.stats.overflow += held_per_table
            overflow = held_pos if overflow is None else torch.sort(torch.cat([overflow, held_pos])).values
        cached = slots >= 0
        if lookahead:
            self.state.next_use[slots[cached]] = next_use[cached]
        if self.state.last_used is not None:
            self.state.last_used[slots[cached]] = step
        if self.book.access_count is not None:
            self.book.access_count[uniq] += batch.occurrences
        self._track_pool(slots[cached])
        return SlotPlan(slots, overflow, *self._write_back, *loads, self._short_of)

    def _evict(self, victims: torch.Tensor) -> None:
        rows = self.state.slot_to_row[victims]
        dirty = self.state.dirty[victims]
        if bool(dirty.any()):
            self._write_back = (rows[dirty], victims[dirty])
            self.book.stats.written += self.layout.count_unsorted_per_table(rows[dirty])
        self.state.release(victims)

    def _slot_keys(self, slots: torch.Tensor) -> torch.Tensor:
        """Current eviction keys of filled slots (largest = evict first)."""
        if self.book.policy == "lru":
            return pol.lru_key(self.state.last_used[slots])
        rows = self.state.slot_to_row[slots]
        if self.book.policy == "lfu":
            return pol.coldness_from_counts(self.book.access_count[rows])
        if self.book.policy == "freq":
            return self.book.coldness(rows)
        return pol.lookahead_key(self.state.next_use[slots], self.book.coldness(rows))

    def _assign_slots(
        self, batch, miss_rows, per_table, miss_key, pin_floor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A slot for each miss (-1: served from the host this step) and the victims to evict, for all
        tables at once: free slots first, then victims by policy, most evictable first, never pinned.

        Misses are admitted in order of value (``miss_key`` ascending: nearest next use, then hottest)
        and, with ``miss_key`` (lookahead), a miss displaces a cached row only if that row is worth
        less (Belady with bypass). Victim choice is exact but costs O(misses), not O(cache): each
        table's candidates come from a pool holding every slot whose key may be >= its floor (all
        others are known to be below it); see ``_track_pool``."""
        n_miss = len(miss_rows)
        tables = torch.repeat_interleave(torch.arange(self.layout.tables), per_table, output_size=n_miss)
        first_miss = torch.cumsum(per_table, 0) - per_table
        take = torch.minimum(per_table, self.layout.capacity - self.state.filled)  # free slots used
        need = per_table - take  # victims wanted
        old_filled = self.state.filled.clone()
        self.state.filled += take
        # Candidates: the pools of the tables that need victims (rebuilt where they run short).
        needy = torch.nonzero(need > 0).squeeze(1).tolist()
        cand, cand_keys, avail = self._best_candidates(needy, need, old_filled, pin_floor)
        first_cand = torch.cumsum(avail, 0) - avail
        for t in torch.nonzero(avail < need).squeeze(1).tolist():
            self._short_of[t] = need[t] - avail[t]
        # Misses in admission order within each table, and their rank there.
        if miss_key is None:
            admit_order = torch.arange(n_miss)
        else:
            admit_order = torch.argsort(miss_key, stable=True)
            admit_order = admit_order[torch.argsort(tables[admit_order], stable=True)]
        t_of = tables[admit_order]
        rank = torch.arange(n_miss) - first_miss[t_of]
        assigned_in_order = torch.full((n_miss,), -1, dtype=torch.int64)
        free = rank < take[t_of]
        assigned_in_order[free] = self.layout.slot_starts[t_of[free]] + old_filled[t_of[free]] + rank[free]
        j = rank - take[t_of]  # victim index within the table
        use = (j >= 0) & (j < avail[t_of])
        victim_at = first_cand[t_of[use]] + j[use]
        if miss_key is not None:
            worth = cand_keys[victim_at] > miss_key[admit_order[use]]
            use[use.clone()] = worth
            victim_at = victim_at[worth]
        assigned_in_order[use] = cand[victim_at]
        assigned = torch.empty_like(assigned_in_order).index_copy_(0, admit_order, assigned_in_order)
        return assigned, cand[victim_at]

    def _best_candidates(self, needy: list[int], need, filled, pin_floor) -> tuple[torch.Tensor, ...]:
        """For the ``needy`` tables, up to ``need[t]`` victims each: (slots, keys), grouped by table in
        table order, most evictable first, and how many each table got. Candidates are the unpinned
        pool members at or above their table's floor; a pool that cannot cover its table's need is
        rebuilt from a full scan first."""
        empty = torch.empty(0, dtype=torch.int64)
        got = torch.zeros(self.layout.tables, dtype=torch.int64)
        if not needy:
            return empty, empty, got
        for attempt in range(2):
            pools = [self._pool[t] for t in needy]
            sizes = torch.tensor([len(p) for p in pools], dtype=torch.int64)
            cand = torch.cat(pools)
            row = torch.repeat_interleave(torch.arange(len(needy)), sizes, output_size=len(cand))
            tab = torch.tensor(needy, dtype=torch.int64)[row]
            keys = self._slot_keys(cand)
            usable = (keys >= self._pool_floor[tab]) & (self.state.pin_until[cand] < pin_floor)
            count = torch.zeros(len(needy), dtype=torch.int64).index_add_(0, row, usable.to(torch.int64))
            short = [
                t
                for r, t in enumerate(needy)
                if (count[r] < need[t] and self._pool_floor[t] != _INT64_MIN)  # not already every slot
                or len(self._pool[t]) > _pool_limit(int(need[t]))
            ]
            if not short or attempt:
                break
            for t in short:
                self._refresh_pool(t, int(need[t]), int(filled[t]))
        if not bool(usable.any()):
            return empty, empty, got
        # One top-k over a (tables, pool) matrix instead of one per table.
        col = torch.arange(len(cand)) - (torch.cumsum(sizes, 0) - sizes)[row]
        matrix = torch.full((len(needy), int(sizes.max())), _INT64_MIN, dtype=torch.int64)
        matrix[row[usable], col[usable]] = keys[usable]
        want = need[needy]
        values, idx = torch.topk(matrix, min(int(want.max()), matrix.shape[1]), dim=1)
        keep = (torch.arange(values.shape[1]) < want.unsqueeze(1)) & (values > _INT64_MIN)
        slots = torch.full_like(matrix, -1)
        slots[row, col] = cand
        chosen = torch.gather(slots, 1, idx)
        got[needy] = keep.sum(dim=1)
        return chosen[keep], values[keep], got

    def _refresh_pool(self, t: int, k: int, filled: int) -> None:
        """Rebuild table ``t``'s pool from a full scan: its top ``max(POOL_MIN, POOL_FACTOR * k)`` keys."""
        lo = self.layout.slot_offsets[t]
        hi = lo + filled
        self._in_pool[self._pool[t]] = False
        if hi == lo:
            self._pool[t] = torch.empty(0, dtype=torch.int64)
            self._pool_floor[t] = _INT64_MIN
            return
        full = self._slot_keys(torch.arange(lo, hi, dtype=torch.int64))
        m = min(hi - lo, max(POOL_MIN, POOL_FACTOR * k))
        keys, idx = torch.topk(full, m)
        self._pool[t] = idx + lo
        self._in_pool[self._pool[t]] = True
        self._pool_floor[t] = int(keys[-1]) if m < hi - lo else _INT64_MIN

    def _track_pool(self, slots: torch.Tensor) -> None:
        """Slots whose keys may have risen this step (the rows it touched or admitted) join their
        table's pool if they reach its floor, keeping every slot outside a pool below its floor."""
        keys = self._slot_keys(slots)
        tables = torch.searchsorted(self.layout.slot_ends, slots, right=True)
        join = (keys >= self._pool_floor[tables]) & ~self._in_pool[slots]
        if not bool(join.any()):
            return
        slots, tables = slots[join], tables[join]
        self._in_pool[slots] = True
        for t in torch.unique(tables).tolist():
            self._pool[t] = torch.cat([self._pool[t], slots[tables == t]])


def _pool_limit(k: int) -> int:
    """A pool grown past this many candidates (for ``k`` evictions) is rebuilt smaller."""
    return POOL_REBUILD * max(POOL_MIN, POOL_FACTOR * k)
