"""One cache for the tables that share an embedding dim and a pooling mode.

The tables of a group are laid end to end in one row space (global row = table's row offset + id) and
one host array of rows ``[weight | optimizer state]``. The device holds ``cache``: the cached rows of
every table, each table in its own slot range of fixed capacity. All bookkeeping (which row sits in
which slot, dirty bits, eviction priorities) lives in host memory next to the ids, which come from the
data loader on the host anyway: the device holds the cached rows and nothing of size O(table rows), and
planning a step never waits for the device.

A training step for one batch:
1. ``prepare_features`` (at enqueue time, ``prepare.py``): global ids, their unique set and the inverse map.
2. ``plan`` (at prefetch or forward time): look the unique rows up; for each table with misses, take
   free slots, then evict by policy among slots no in-flight batch needs (dirty victims are written
   back to the host), and load the missing rows host -> device. Rows that cannot be admitted because a
   batch needs more rows than a table's cache holds are served from the host for that step
   (``overflow``), so training goes on exactly. The planner (``native.NativePlanner``, C++, or
   ``python_planner.PythonPlanner``) updates the ``slots.SlotState`` (through ``Bookkeeping``, its view of
   the group) and returns a ``SlotPlan``; the group's row mover (``row_movers.py``) copies what it lists,
   and the group turns it into the step's ``StepPlan``.
3. ``gather`` + ``pool`` (forward): the step's unique rows, then ``embedding_bag`` over them.
4. ``apply_gradients`` (backward): the summed gradient of each unique row, the fused optimizer update
   of weight and state together, the rows written back to their slots (marked dirty) or, for overflow
   rows, to the host (``host_served``: read when planned, written back lazily; the training thread
   never waits for the device).
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import InitVar, dataclass, field, replace
from typing import TYPE_CHECKING, BinaryIO

import torch
import torch.nn.functional as F

from dlrm_cache.cache import policy as pol
from dlrm_cache.cache import python_planner
from dlrm_cache.cache.bookkeeping import Bookkeeping, GroupStats
from dlrm_cache.cache.future import FutureIndex
from dlrm_cache.cache.host import CHUNK_BYTES, HostTable, TableShard, stream_rows
from dlrm_cache.cache.host_served import HostServed
from dlrm_cache.cache.layout import GroupLayout
from dlrm_cache.cache.native import NativePlanner
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.cache.prepare import PreparedBatch, from_global_ids, preparer
from dlrm_cache.cache.row_movers import row_mover
from dlrm_cache.cache.slots import SlotState

if TYPE_CHECKING:  # the cache core runs without torchrec (and so without fbgemm): plain PyTorch
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

log = logging.getLogger(__name__)
_PARALLEL_ROWS = 4096  # the C++ planner plans a step of this many unique rows or more on several threads


@dataclass(frozen=True)
class GroupSettings:
    """How a group caches its tables (``CachedEmbeddingBagCollection`` makes these from a ``CacheConfig``)."""

    capacities: list[int]  # cache slots per table
    policy: str
    optimizer: SparseOptimizer
    device: torch.device
    host_kind: str = "memory"  # the host tier: "memory" or "mmap" (files under ``mmap_dir``)
    mmap_dir: str | None = None
    frequencies: list[torch.Tensor | None] | None = None  # train counts per row, per table (coldness)
    warmup_ratio: float = 0.0
    seed: int = 0
    # for tables that are shards of larger ones (TorchRec sharding), where each sits in its full table
    # (initial values are those of the full table's rows and columns)
    shards: list[TableShard] | None = None
    planner: str = "python"  # "native" (the C++ planner, ``native.py``) or "python"
    native_copies: bool | None = None  # rows copied by C++ (``row_movers``); None: wherever they can be


@dataclass
class StepPlan:
    """Where each unique row of a batch is for one step, and the rows gathered for it."""

    batch: PreparedBatch
    step: int
    slots: torch.Tensor  # (U,) cache slot of each unique row, -1 for rows served from the host
    overflow: torch.Tensor | None  # positions in `uniq` of the rows served from the host (sorted)
    rows: torch.Tensor | None = None  # (U, width) on the device, set by `gather`
    ready: torch.cuda.Event | None = None  # CUDA: recorded once the loads this step gathers are done
    device_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    host_served: HostServed | None = None  # with overflow: where the host-served rows come from
    # With overflow, worked out with the plan (off the training thread): the global rows served from
    # the host; for training (`scratch`: the cache's scratch row), the slot each unique row is written
    # back to (the scratch row for those served from the host).
    scratch: InitVar[int | None] = None
    host_rows: torch.Tensor | None = field(init=False, default=None)
    write_slots: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self, scratch: int | None) -> None:
        if self.overflow is None:
            return
        self.host_rows = self.batch.uniq[self.overflow]
        if scratch is not None:
            self.write_slots = self.slots.index_fill(0, self.overflow, scratch)

    def on_device(self, name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The step's index tensor ``t`` on ``device``, copied once."""
        if name not in self.device_tensors:
            self.device_tensors[name] = t.to(device, non_blocking=True)
        return self.device_tensors[name]


class TableGroup:
    def __init__(self, configs: list[EmbeddingBagConfig], settings: GroupSettings):
        s = self.settings = settings
        self.layout = layout = GroupLayout(configs, settings.capacities)
        self.configs = configs
        self.dim = configs[0].embedding_dim
        # SUM or MEAN, by name: a torchrec PoolingType, or any object with the same fields
        self.mean = getattr(configs[0].pooling, "name", str(configs[0].pooling)).upper() == "MEAN"
        self.optimizer = s.optimizer
        self.width = self.dim + s.optimizer.state_width(self.dim)
        self.device = s.device
        self.resident = layout.capacities == layout.rows and s.policy == "none"
        name = "_".join(c.name for c in configs)[:100]
        host_kind = "memory" if self.resident else s.host_kind
        host = HostTable(layout.total_rows, self.width, host_kind, s.mmap_dir, name)
        host.initialize(configs, layout.row_offsets, self.dim, s.seed, s.shards)
        self.stats = GroupStats.zeros(layout.tables)
        self._inflight: StepPlan | None = None
        self._overflow_logged: set[int] = set()
        self._prepare = preparer(layout, s.planner == "native")
        self.mover = row_mover(s.device, self.width, s.native_copies, s.planner, self.resident)
        self._chunk_rows = max(1, CHUNK_BYTES // (4 * self.width))  # warm-up and flush copy this many at once
        if self.resident:
            # The whole table lives on the device: the baseline (policy=none). The cache *is* the table.
            self.host, self.cache, self._cache_and_scratch = None, host.data.to(s.device), None
            self.book = None
            return
        self.host = host
        # The cache's slots, and after them one scratch row (``row_movers``: where the updated rows of a
        # step served from the host go back, in the one indexed copy of all of them).
        self._cache_and_scratch = torch.zeros(layout.total_slots + 1, self.width, device=s.device)
        self.cache = self._cache_and_scratch[:-1]
        self.mover.adopt(self._cache_and_scratch)
        self.book = Bookkeeping(
            layout, s.policy, self.stats, self._empty_state(), _coldness_table(layout, s.frequencies),
            torch.zeros(layout.total_rows, dtype=torch.int64) if s.policy == "lfu" else None,
            FutureIndex(layout.total_rows) if s.policy == "lookahead" else None,
        )  # fmt: skip
        self.planner = (
            NativePlanner(
                layout.slot_offsets,
                layout.row_offsets,
                s.policy,
                (*python_planner.pool_sizes(), _PARALLEL_ROWS),
            )
            if s.planner == "native"
            else python_planner.PythonPlanner(layout)
        )
        self._warm_up()

    # ---------------------------------------------------------------- bookkeeping state
    @property
    def state(self) -> SlotState:
        return self.book.state

    @property
    def future(self) -> FutureIndex | None:
        return None if self.book is None else self.book.future

    def _empty_state(self) -> SlotState:
        lay = self.layout
        return SlotState.empty(lay.total_rows, lay.total_slots, lay.tables, self.settings.policy)

    def _reset_cache(self, queued: list[PreparedBatch]) -> None:
        """Empty the cache (the host must hold every row), then warm it up with the hottest rows;
        ``queued``: the enqueued batches not yet consumed, whose uses the lookahead policy needs."""
        self.book.state = self._empty_state()
        self.planner.reset()
        self._inflight = None
        self._warm_up()
        for p in reversed(queued):  # nearest use last, so it wins
            if p.seq is not None:
                s = self.state.row_to_slot[p.uniq].to(torch.int64)
                self.state.next_use[s[s >= 0]] = p.seq

    def _warm_up(self) -> None:
        lay = self.layout
        for t, cap in enumerate(lay.capacities):
            k = cap if cap == lay.rows[t] else int(self.settings.warmup_ratio * cap)
            if k == 0:
                continue
            lo = lay.row_offsets[t]
            if self.book.coldness_table is None:
                rows = torch.arange(lo, lo + k, dtype=torch.int64)  # ids ranked by frequency: a prefix
            else:
                coldness = self.book.coldness_table[lo : lay.row_offsets[t + 1]]
                rows = torch.topk(coldness, k, largest=False).indices + lo
            slots = torch.arange(lay.slot_offsets[t], lay.slot_offsets[t] + k, dtype=torch.int64)
            for at in range(0, k, self._chunk_rows):  # bounded: a chunk of rows in flight at a time
                self._copy_in(rows[at : at + self._chunk_rows], slots[at : at + self._chunk_rows], None)
            self.state.admit(rows, slots)
            self.state.filled[t] = k
            self.stats.warmup[t] += k

    # ---------------------------------------------------------------- prepare and plan
    def prepare_features(
        self, values: torch.Tensor, starts: list[int], lengths: torch.Tensor, threads: int | None = None
    ) -> PreparedBatch:
        """A batch's ids as a ``KeyedJaggedTensor`` holds them: ``values`` (every feature's), where each of
        the group's features starts in them, and its (F, B) int64 bag ``lengths`` (``prepare.py``), its
        tables spread over ``threads`` (None: torch's intra-op threads)."""
        return self._read_ahead(self._prepare(values, starts, lengths, threads=threads))

    def prepare(
        self, global_ids: torch.Tensor, offsets: torch.Tensor, batch_size: int, lookups
    ) -> PreparedBatch:
        """``global_ids`` in sample-major bag order, ``offsets`` their (B * F + 1) bag offsets."""
        return self._read_ahead(from_global_ids(global_ids, offsets, batch_size, lookups))

    def _read_ahead(self, batch: PreparedBatch) -> PreparedBatch:
        """A mapped host tier reads the rows this batch will miss meanwhile."""
        if self.host is not None and self.host.mapped:
            self.host.will_need(batch.uniq[self.state.row_to_slot[batch.uniq] < 0])
        return batch

    def register_future(self, batch: PreparedBatch) -> None:
        """A batch the trainer will train on later (lookahead): record its rows' uses."""
        if self.future is not None:
            batch.seq, batch.arena_base = self.planner.register_future(self.book, batch.uniq)

    def pin_floor(self, step: int) -> int:
        """Slots used at or after this step stay: those of ``step`` and of a batch still in flight."""
        return step - 1 if self._inflight is not None else step

    def inflight_host_rows(self) -> torch.Tensor | None:
        """Rows the batch in flight reads from the host and will update there (sorted), if any."""
        p = self._inflight
        return None if p is None else p.host_rows

    def plan(
        self, batch: PreparedBatch, step: int, pin_floor: int, host_rows: torch.Tensor | None = None
    ) -> StepPlan:
        """Make every row of ``batch`` available for training step ``step`` (loads and evictions).
        ``host_rows``: rows the batch in flight updates on the host; loading them now would read them
        stale, so this batch reads them from the host too, at its forward, after that update."""
        t0 = time.perf_counter()
        if self.resident:
            self.stats.lookups += batch.lookups
            self.stats.touched += self.layout.count_per_table(batch.uniq)
            plan = StepPlan(batch, step, batch.uniq, None)
        else:
            with self.host.measured():
                plan = self._plan_cached(batch, step, pin_floor, host_rows)
            self.mover.stage(plan)
            plan.ready = self.mover.ready()  # the step's gather waits for its loads (and index tensors)
        self.stats.bookkeeping_s += time.perf_counter() - t0
        return plan

    def _plan_cached(self, batch: PreparedBatch, step: int, pin_floor: int, host_rows) -> StepPlan:
        if self.future is not None and batch.next_use is None:
            # each row's next use after this batch (kept: a batch may be planned again)
            batch.next_use = (
                torch.full((len(batch.uniq),), pol.NO_NEXT_USE, dtype=torch.int64)
                if batch.arena_base is None
                else self.future.consume(batch.arena_base, len(batch.uniq))
            )
        # the updates of the steps before the one in flight are in the host before anything reads it
        self.mover.settle(self.host.data, pin_floor)
        tiers = (self.host.data, self.cache) if self.mover.planner_copies else None
        p = self.planner.plan(self.book, batch, step, pin_floor, host_rows, tiers)
        if tiers is None:  # after the update of the last step that may have used the slots
            after = pin_floor - 1
            self._copy_out(p.write_back_slots, p.write_back_rows, after)  # victims first: slots are reused
            self._copy_in(p.load_rows, p.load_slots, after)
        for t in torch.nonzero(p.short_of).squeeze(1).tolist():
            self._log_overflow(t, batch, int(p.short_of[t]))
        scratch = self.layout.total_slots if self.mover.scratch else None  # where ``write_slots`` point
        plan = StepPlan(batch, step, p.slots, p.overflow, scratch=scratch)
        if plan.overflow is not None and self.mover.reads_host_at_plan:
            plan.host_served = HostServed.plan(self.host.data, plan.host_rows, plan.overflow, host_rows, step)
        return plan

    def _log_overflow(self, t: int, batch: PreparedBatch, short: int) -> None:
        if t in self._overflow_logged:
            return
        self._overflow_logged.add(t)
        need = int((self.layout.table_of(batch.uniq) == t).sum())
        log.warning(
            "table %s: a batch needs %d distinct rows but its cache holds %d, less the rows of a batch still "
            "in flight (%d rows served from the host this step); a capacity of at least %d rows "
            "(ratio >= %.4g, twice that with prefetch) avoids this. Logged once.",
            self.configs[t].name, need, self.layout.capacities[t], short, need, need / self.layout.rows[t],
        )  # fmt: skip

    def _copy_out(self, slots: torch.Tensor, rows: torch.Tensor, after: int | None) -> None:
        """Cache slots back into host rows (the data only), once step ``after`` is updated (None: all)."""
        if slots.numel():
            self.mover.copy_out(self.cache, slots, self.host.data, rows, after)

    def _copy_in(self, rows: torch.Tensor, slots: torch.Tensor, after: int | None) -> None:
        """Host rows into cache slots (the data only), once step ``after`` is updated (None: all)."""
        if rows.numel():
            self.mover.copy_in(self.host.data, rows, self.cache, slots, after)

    # ---------------------------------------------------------------- compute
    def gather(self, plan: StepPlan) -> torch.Tensor:
        """The step's unique rows (U, width) on the device; overflow rows come from the host."""
        return self.mover.gather(plan, self.cache, None if self.host is None else self.host.data)

    def pool(self, plan: StepPlan, rows: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings (B, F * D) of the batch from its unique rows (sample-major bags: no copy)."""
        b = plan.batch
        weight = rows[:, : self.dim] if rows.shape[1] == self.dim else rows[:, : self.dim].contiguous()
        mode = "mean" if self.mean else "sum"
        pooled = F.embedding_bag(
            plan.on_device("inverse", b.inverse, self.device),
            weight,
            plan.on_device("offsets", b.offsets, self.device),
            mode=mode,
            include_last_offset=True,
        )  # (B * F, D)
        return pooled.view(b.batch_size, -1)

    def begin_step(self, plan: StepPlan) -> None:
        self.mover.wait(plan.ready)
        with self._host_io(plan):
            plan.rows = self.gather(plan)
        self._inflight = plan

    def record_load_timings(self) -> list | None:
        """CUDA: from now on, the (start, end) timing events of every load's copies (for benchmarks);
        None elsewhere."""
        return self.mover.record_load_timings()

    def _host_io(self, plan: StepPlan) -> AbstractContextManager:
        """Counts the disk I/O of a step's work with rows served from the (mapped) host."""
        return nullcontext() if plan.overflow is None else self.host.measured()

    @torch.no_grad()
    def apply_gradients(self, plan: StepPlan, grad_out: torch.Tensor) -> None:
        """The fused update of the step's unique rows from the gradient of the pooled output."""
        b, dim = plan.batch, self.dim
        grad_bags = grad_out.reshape(-1, dim)  # (B * F, D): a view, bags are sample-major
        if self.mean or not b.one_hot:
            offsets = plan.on_device("offsets", b.offsets, self.device)
            lengths = offsets[1:] - offsets[:-1]
        if self.mean:
            grad_bags = grad_bags / lengths.clamp(min=1).unsqueeze(1)
        # each id's gradient is its bag's (repeated from the bag lengths on the device: no host index)
        per_id = (
            grad_bags
            if b.one_hot
            else torch.repeat_interleave(grad_bags, lengths, dim=0, output_size=len(b.inverse))
        )
        grad_rows = torch.zeros(len(b.uniq), dim, device=self.device)
        grad_rows.index_add_(0, plan.on_device("inverse", b.inverse, self.device), per_id)
        self.optimizer.update(plan.rows, grad_rows, plan.step)
        with self._host_io(plan):
            state = None if self.resident else self.state
            host = None if self.host is None else self.host.data
            self.mover.write_back(plan, plan.rows, self.cache, self._cache_and_scratch, state, host)
            if plan.overflow is not None:
                self.stats.written_by_update += self.layout.count_per_table(plan.host_rows)
        self.mover.after_update(plan.step)  # the copies that reuse these slots wait for this update
        plan.rows = None
        if self._inflight is plan:
            self._inflight = None

    @torch.no_grad()
    def lookup_readonly(self, batch: PreparedBatch) -> torch.Tensor:
        """Evaluation: hits from the cache, misses straight from the host; nothing admitted or written."""
        self.stats.eval_lookups += batch.lookups
        self.mover.wait(self.mover.ready())
        if self.resident:
            plan = StepPlan(batch, 0, batch.uniq, None)
        else:
            self.mover.settle(self.host.data)
            slots = self.state.row_to_slot[batch.uniq].to(torch.int64)
            miss = torch.nonzero(slots < 0).squeeze(1)
            plan = StepPlan(batch, 0, slots, miss if miss.numel() else None)
            if miss.numel():
                self.stats.eval_host_rows += self.layout.count_per_table(plan.host_rows)
                plan.host_served = HostServed.plan(self.host.data, plan.host_rows, miss, None, 0)
        return self.pool(plan, self.gather(plan))

    # ---------------------------------------------------------------- state
    def set_learning_rate(self, lr: float) -> None:
        """The optimizer's learning rate from the next update on."""
        self.optimizer = replace(self.optimizer, lr=lr)

    @torch.no_grad()
    def flush(self) -> None:
        """Write every dirty cached row back to the host (they stay cached, now clean)."""
        if self.resident:
            return
        with self.host.measured():
            self.mover.settle(self.host.data)
        slots = torch.nonzero(self.state.dirty).squeeze(1)
        for at in range(0, len(slots), self._chunk_rows):  # bounded: a chunk of rows in flight at a time
            chunk = slots[at : at + self._chunk_rows]
            rows = self.state.slot_to_row[chunk]
            with self.host.measured():
                self._copy_out(chunk, rows, None)
            self.stats.written += self.layout.count_unsorted_per_table(rows)
        self.state.dirty[slots] = False

    def table_rows(self, t: int) -> torch.Tensor:
        """Table ``t``'s rows ``[weight | state]`` in the host layout (call ``flush`` first)."""
        lo, hi = self.layout.row_offsets[t], self.layout.row_offsets[t + 1]
        return (self.cache if self.resident else self.host.data)[lo:hi]

    def save_table(self, t: int, out: BinaryIO) -> None:
        """Stream table ``t``'s rows (host layout) into the open file ``out``, in bounded memory
        (call ``flush`` first)."""
        lo, hi = self.layout.row_offsets[t], self.layout.row_offsets[t + 1]
        if self.resident:
            stream_rows(self.cache, lo, hi - lo, out)
        else:
            self.host.save_rows(lo, hi - lo, out)

    @torch.no_grad()
    def write_table_rows(self, t: int, first: int, rows: torch.Tensor) -> None:
        """Rows ``[first, first + len(rows))`` of table ``t`` become ``rows`` (host layout); call
        ``rebuild`` once done."""
        lo = self.layout.row_offsets[t] + first
        if lo + len(rows) > self.layout.row_offsets[t + 1]:
            name, end = self.configs[t].name, first + len(rows)
            raise ValueError(f"table {name}: rows up to {end} written, it has {self.layout.rows[t]}")
        if self.resident:
            self.cache[lo : lo + len(rows)] = rows.to(self.device)
        else:
            self.mover.settle(self.host.data)  # no update queued before may land on these rows later
            self.host.write_rows(lo, rows)

    def rebuild(self, queued: list[PreparedBatch]) -> None:
        """After the host rows changed underneath: drop the cache and warm it up again."""
        if not self.resident:
            self._reset_cache(queued)
        self._inflight = None

    def close(self) -> None:
        if self.host is not None:
            self.host.close()


def _coldness_table(
    layout: GroupLayout, frequencies: list[torch.Tensor | None] | None
) -> torch.Tensor | None:
    """Coldness of each row for warm-up, ``freq`` and ``lookahead``: from train counts where given,
    else the id itself (ids re-numbered by frequency: id 0 is the hottest); None when no table has counts."""
    if frequencies is None or all(f is None for f in frequencies):
        return None
    return torch.cat(
        [
            pol.coldness_from_counts(f.to(torch.int64)) if f is not None else torch.arange(r)
            for f, r in zip(frequencies, layout.rows, strict=True)
        ]
    )
