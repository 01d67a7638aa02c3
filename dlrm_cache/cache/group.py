"""One cache for the tables that share an embedding dim and a pooling mode.

The tables of a group are laid end to end in one row space (global row = table's row offset + id) and
one host array of rows ``[weight | optimizer state]``. The device holds ``cache``: the cached rows of
every table, each table in its own slot range of fixed capacity. All bookkeeping (which row sits in
which slot, dirty bits, eviction priorities) lives in host memory next to the ids, which come from the
data loader on the host anyway: the device holds the cached rows and nothing of size O(table rows), and
planning a step never waits for the device.

A training step for one batch:
1. ``prepare`` (at enqueue time): global ids, their unique set and the inverse map.
2. ``plan`` (at prefetch or forward time): look the unique rows up; for each table with misses, take
   free slots, then evict by policy among slots no in-flight batch needs (dirty victims are written
   back to the host), and load the missing rows host -> device. Rows that cannot be admitted because a
   batch needs more rows than a table's cache holds are served from the host for that step
   (``overflow``), so training goes on exactly. The planner (``native.NativePlanner``, C++, or
   ``python_planner.PythonPlanner``) updates the ``slots.SlotState`` and returns a ``SlotPlan``; the
   group copies what it lists (``transfer.py`` on CUDA) and turns it into the step's ``StepPlan``.
3. ``gather`` + ``pool`` (forward): the step's unique rows, then ``embedding_bag`` over them.
4. ``apply_gradients`` (backward): the summed gradient of each unique row, the fused optimizer update
   of weight and state together, the rows written back to their slots (marked dirty) or, for overflow
   rows, to the host.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import torch
import torch.nn.functional as F

from dlrm_cache.cache import policy as pol
from dlrm_cache.cache import python_planner
from dlrm_cache.cache.future import FutureIndex
from dlrm_cache.cache.host import HostTable, TableShard, stream_rows
from dlrm_cache.cache.native import NativePlanner, RowKernels
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.cache.slots import SlotState
from dlrm_cache.cache.transfer import DeviceTransfers

if TYPE_CHECKING:  # the cache core runs without torchrec (and so without fbgemm): plain PyTorch
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

log = logging.getLogger(__name__)
_PARALLEL_ROWS = 4096  # the C++ planner plans a step of this many unique rows or more on several threads


@dataclass
class PreparedBatch:
    """A batch's ids for one group, in host memory."""

    uniq: torch.Tensor  # (U,) sorted global rows
    inverse: torch.Tensor  # (N,) position in `uniq` of every id
    occurrences: torch.Tensor  # (U,) how often each unique row occurs
    offsets: torch.Tensor  # (B * F + 1,) bag offsets, sample-major: bag b * F + f is sample b, feature f
    batch_size: int
    lookups: torch.Tensor  # (T,) ids looked up per table
    bag_of_id: torch.Tensor | None  # (N,) the bag of every id; None when every bag holds one id
    seq: int | None = None  # lookahead: sequence number and arena position, set by register_future
    arena_base: int | None = None
    next_use: torch.Tensor | None = None  # (U,) each row's next use after this batch, once planned


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


@dataclass
class GroupStats:
    """Counters in host memory (no device sync to read them); one entry per table. The planner (on the
    bookkeeping thread with a CUDA device) and the update (on the training thread) add to counters of
    their own: rows written back are ``written`` (dirty victims, flushes) + ``written_by_update``
    (rows served from the host, updated there)."""

    lookups: torch.Tensor
    touched: torch.Tensor
    loaded: torch.Tensor
    written: torch.Tensor
    written_by_update: torch.Tensor
    overflow: torch.Tensor
    warmup: torch.Tensor
    eval_lookups: torch.Tensor
    eval_host_rows: torch.Tensor
    bookkeeping_s: float = 0.0

    @classmethod
    def zeros(cls, tables: int) -> GroupStats:
        z = [torch.zeros(tables, dtype=torch.int64) for _ in range(9)]
        return cls(*z)


class TableGroup:
    def __init__(
        self,
        configs: list[EmbeddingBagConfig],
        capacities: list[int],
        policy: str,
        optimizer: SparseOptimizer,
        device: torch.device,
        host_kind: str = "memory",
        mmap_dir: str | None = None,
        frequencies: list[torch.Tensor | None] | None = None,
        warmup_ratio: float = 0.0,
        seed: int = 0,
        shards: list[TableShard] | None = None,
        planner: str = "python",
        native_copies: bool | None = None,
    ):
        """``shards``: for tables that are shards of larger ones (TorchRec sharding), where each sits in
        its full table (initial values are those of the full table's rows and columns). ``planner``:
        ``native`` (the C++ planner, ``native.py``) or ``python``. ``native_copies``: rows copied by
        C++ (``RowKernels``, CPU device with the native planner only) rather than torch; None: wherever
        they can be."""
        can_copy_natively = planner == "native" and device.type == "cpu"
        if native_copies and not can_copy_natively:
            raise ValueError(
                f"cache.row_copies=native needs the native planner on the CPU device "
                f"(planner {planner}, device {device.type}): use row_copies=torch or auto"
            )
        self.configs = configs
        self.features = [f for c in configs for f in c.feature_names]
        self.dim = configs[0].embedding_dim
        # SUM or MEAN, by name: a torchrec PoolingType, or any object with the same fields
        self.mean = getattr(configs[0].pooling, "name", str(configs[0].pooling)).upper() == "MEAN"
        self.optimizer = optimizer
        self.width = self.dim + optimizer.state_width(self.dim)
        self.device = device
        self.policy = policy
        self.warmup_ratio = warmup_ratio
        self.rows = [c.num_embeddings for c in configs]
        self.capacities = [min(c, r) for c, r in zip(capacities, self.rows, strict=True)]
        self.row_offsets = [0]
        for r in self.rows:
            self.row_offsets.append(self.row_offsets[-1] + r)
        self.slot_offsets = [0]
        for c in self.capacities:
            self.slot_offsets.append(self.slot_offsets[-1] + c)
        self._row_ends = torch.tensor(self.row_offsets[1:], dtype=torch.int64)
        self._row_bounds = torch.tensor(self.row_offsets, dtype=torch.int64)
        self._slot_ends = torch.tensor(self.slot_offsets[1:], dtype=torch.int64)
        self._slot_starts = torch.tensor(self.slot_offsets[:-1], dtype=torch.int64)
        self._capacity_t = torch.tensor(self.capacities, dtype=torch.int64)
        feature_table = [t for t, c in enumerate(configs) for _ in c.feature_names]
        self.feature_row_offset = torch.tensor(
            [self.row_offsets[t] for t in feature_table], dtype=torch.int64
        )
        self.feature_rows = torch.tensor([self.rows[t] for t in feature_table], dtype=torch.int64)
        self.feature_table = torch.tensor(feature_table, dtype=torch.int64)
        self.resident = self.capacities == self.rows and policy == "none"
        total_rows = self.row_offsets[-1]
        name = "_".join(c.name for c in configs)[:100]
        host = HostTable(total_rows, self.width, "memory" if self.resident else host_kind, mmap_dir, name)
        host.initialize(configs, self.row_offsets, self.dim, seed, shards)
        self.stats = GroupStats.zeros(len(configs))
        self._inflight: StepPlan | None = None
        self._overflow_logged: set[int] = set()
        self.future: FutureIndex | None = None
        self._rows = RowKernels() if (can_copy_natively if native_copies is None else native_copies) else None
        self._transfers: DeviceTransfers | None = None
        if self.resident:
            # The whole table lives on the device: the baseline (policy=none). The cache *is* the table.
            self.host = None
            self.cache = host.data.to(device)
            return
        self.host = host
        # On CUDA, loads and write-backs on a copy stream through pinned staging (transfer.py)
        if device.type == "cuda":
            self._transfers = DeviceTransfers(device, self.width)
        # The cache's slots, and after them one scratch row: the updated rows of a step are written
        # back in one indexed copy, those served from the host (overflow) into the scratch row.
        self._cache_and_scratch = torch.zeros(self.slot_offsets[-1] + 1, self.width, device=device)
        self.cache = self._cache_and_scratch[:-1]
        # Coldness of each row for warm-up, `freq` and `lookahead`: from train counts where given,
        # else the id itself (ids re-numbered by frequency: id 0 is the hottest).
        self._coldness_table = None
        if frequencies is not None and any(f is not None for f in frequencies):
            self._coldness_table = torch.cat(
                [
                    pol.coldness_from_counts(f.to(torch.int64)) if f is not None else torch.arange(r)
                    for f, r in zip(frequencies, self.rows, strict=True)
                ]
            )
        if policy == "lookahead":
            self.future = FutureIndex(total_rows)
        # LFU's counts cover every row and survive eviction and re-admission.
        self.access_count = torch.zeros(total_rows, dtype=torch.int64) if policy == "lfu" else None
        # the C++ planner's candidate pools sized as the Python planner's
        pools = python_planner.POOL_MIN, python_planner.POOL_FACTOR, python_planner.POOL_REBUILD
        tuning = (*pools, _PARALLEL_ROWS)
        self._native = self._python = None
        if planner == "native":
            self._native = NativePlanner(self.slot_offsets, self.row_offsets, policy, tuning)
        self._reset_cache([])

    # ---------------------------------------------------------------- bookkeeping state
    def _reset_cache(self, queued: list[PreparedBatch]) -> None:
        """Empty the cache (the host must hold every row), then warm it up with the hottest rows;
        ``queued``: the enqueued batches not yet consumed, whose uses the lookahead policy needs."""
        tables = len(self.configs)
        self.state = SlotState.empty(self.row_offsets[-1], self.slot_offsets[-1], tables, self.policy)
        if self._native is not None:
            self._native.reset()
        elif self._python is None:
            self._python = python_planner.PythonPlanner(self)
        else:
            self._python.reset()
        self._inflight = None
        self._warm_up()
        for p in reversed(queued):  # nearest use last, so it wins
            if p.seq is not None:
                s = self.state.row_to_slot[p.uniq].to(torch.int64)
                self.state.next_use[s[s >= 0]] = p.seq

    def _warm_up(self) -> None:
        for t, cap in enumerate(self.capacities):
            k = cap if cap == self.rows[t] else int(self.warmup_ratio * cap)
            if k == 0:
                continue
            lo = self.row_offsets[t]
            if self._coldness_table is None:
                rows = torch.arange(lo, lo + k, dtype=torch.int64)  # ids ranked by frequency: a prefix
            else:
                coldness = self._coldness_table[lo : self.row_offsets[t + 1]]
                rows = torch.topk(coldness, k, largest=False).indices + lo
            slots = torch.arange(self.slot_offsets[t], self.slot_offsets[t] + k, dtype=torch.int64)
            self._load(rows, slots)
            self.state.filled[t] = k
            self.stats.warmup[t] += k

    def coldness(self, rows: torch.Tensor) -> torch.Tensor:
        """Static coldness of global rows: from train counts, or the row itself for ranked ids."""
        return rows if self._coldness_table is None else self._coldness_table[rows]

    def table_of(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self._row_ends, rows, right=True)

    def count_unsorted_per_table(self, rows: torch.Tensor) -> torch.Tensor:
        """How many of ``rows`` (any order) fall in each table."""
        return torch.bincount(self.table_of(rows), minlength=len(self.configs))

    def count_per_table(self, sorted_rows: torch.Tensor) -> torch.Tensor:
        """How many of ``sorted_rows`` (ascending global rows) fall in each table: O(T log n)."""
        return torch.searchsorted(sorted_rows, self._row_bounds).diff()

    # ---------------------------------------------------------------- prepare and plan
    def prepare(
        self, global_ids: torch.Tensor, offsets: torch.Tensor, batch_size: int, lookups
    ) -> PreparedBatch:
        """``global_ids`` in sample-major bag order, ``offsets`` their (B * F + 1) bag offsets."""
        uniq, inverse, occurrences = torch.unique(
            global_ids, sorted=True, return_inverse=True, return_counts=True
        )
        if self.host is not None and self.host.mapped:  # the rows this batch will miss, read meanwhile
            self.host.will_need(uniq[self.state.row_to_slot[uniq] < 0])
        lengths = offsets[1:] - offsets[:-1]
        one_hot = len(global_ids) == len(lengths) and bool((lengths == 1).all())
        bag_of_id = None if one_hot else torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        return PreparedBatch(uniq, inverse, occurrences, offsets, batch_size, lookups, bag_of_id)

    def register_future(self, batch: PreparedBatch) -> None:
        """A batch the trainer will train on later (lookahead): record its rows' uses."""
        if self.future is None:
            return
        if self._native is not None:
            batch.seq, batch.arena_base = self._native.register_future(self, batch.uniq)
            return
        batch.seq, batch.arena_base = self.future.add(batch.uniq)
        s = self.state.row_to_slot[batch.uniq].to(torch.int64)
        s = s[s >= 0]
        self.state.next_use[s] = torch.minimum(self.state.next_use[s], torch.tensor(batch.seq))

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
            self.stats.touched += self.count_per_table(batch.uniq)
            plan = StepPlan(batch, step, batch.uniq, None)
        else:
            with self.host.measured():
                plan = self._plan_cached(batch, step, pin_floor, host_rows)
            if self._transfers is not None:  # the step's gather waits for the loads made so far
                plan.ready = self._transfers.ready
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
        if self._native is None:
            p, copied = self._python.plan(batch, step, pin_floor, host_rows), False
        else:
            copied = self._rows is not None  # the C++ planner copies the rows itself
            p = self._native.plan(self, batch, step, pin_floor, host_rows, copy_rows=copied)
        if not copied:
            self._copy_out(p.write_back_slots, p.write_back_rows)  # victims out first: their slots are reused
            self._copy_in(p.load_rows, p.load_slots)
        for t in torch.nonzero(p.short_of).squeeze(1).tolist():
            self._log_overflow(t, batch, int(p.short_of[t]))
        return StepPlan(batch, step, p.slots, p.overflow, scratch=self._scratch())

    def _scratch(self) -> int | None:
        """The scratch row for a plan's ``write_slots`` (where the rows go back by ``index_copy_``)."""
        return None if self._rows is not None else self.slot_offsets[-1]

    def _log_overflow(self, t: int, batch: PreparedBatch, short: int) -> None:
        if t in self._overflow_logged:
            return
        self._overflow_logged.add(t)
        need = int((self.table_of(batch.uniq) == t).sum())
        log.warning(
            "table %s: a batch needs %d distinct rows but its cache holds %d, less the rows of a batch still "
            "in flight (%d rows served from the host this step); a capacity of at least %d rows "
            "(ratio >= %.4g, twice that with prefetch) avoids this. Logged once.",
            self.configs[t].name, need, self.capacities[t], short, need, need / self.rows[t],
        )  # fmt: skip

    def _copy_out(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Cache slots back into host rows (the data only)."""
        if not slots.numel():
            return
        if self._rows is not None:
            self._rows.copy(self.cache, slots, self.host.data, rows)
        elif self._transfers is not None:
            self._transfers.write_back(self.cache, slots, self.host.data, rows)
        else:
            self.host.data.index_copy_(0, rows, self.cache.index_select(0, slots.to(self.device)).cpu())

    def _copy_in(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Host rows into cache slots (the data only)."""
        if not rows.numel():
            return
        if self._rows is not None:
            self._rows.copy(self.host.data, rows, self.cache, slots)
        elif self._transfers is not None:
            self._transfers.load(self.host.data, rows, self.cache, slots)
        else:
            self.cache.index_copy_(
                0, slots.to(self.device), self.host.data.index_select(0, rows).to(self.device)
            )

    def _load(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        if rows.numel() == 0:
            return
        self._copy_in(rows, slots)
        self.state.admit(rows, slots)

    # ---------------------------------------------------------------- compute
    def _dev(self, plan: StepPlan, name: str, t: torch.Tensor) -> torch.Tensor:
        if name not in plan.device_tensors:
            plan.device_tensors[name] = t.to(self.device, non_blocking=True)
        return plan.device_tensors[name]

    def gather(self, plan: StepPlan) -> torch.Tensor:
        """The step's unique rows (U, width) on the device; overflow rows come from the host."""
        if self._rows is not None:
            host = None if plan.overflow is None else self.host.data
            return self._rows.gather(self.cache, plan.slots, host, plan.batch.uniq)
        if plan.overflow is None:
            return self.cache.index_select(0, self._dev(plan, "slots", plan.slots))
        # Every position reads a slot (overflow ones slot 0), then the host rows replace those.
        rows = self.cache.index_select(0, self._dev(plan, "slots", plan.slots).clamp(min=0))
        host = self.host.data.index_select(0, plan.host_rows).to(self.device, non_blocking=True)
        return rows.index_copy_(0, self._dev(plan, "overflow", plan.overflow), host)

    def pool(self, plan: StepPlan, rows: torch.Tensor) -> torch.Tensor:
        """Pooled embeddings (B, F * D) of the batch from its unique rows (sample-major bags: no copy)."""
        b = plan.batch
        weight = rows[:, : self.dim] if rows.shape[1] == self.dim else rows[:, : self.dim].contiguous()
        mode = "mean" if self.mean else "sum"
        pooled = F.embedding_bag(
            self._dev(plan, "inverse", b.inverse),
            weight,
            self._dev(plan, "offsets", b.offsets),
            mode=mode,
            include_last_offset=True,
        )  # (B * F, D)
        return pooled.view(b.batch_size, -1)

    def begin_step(self, plan: StepPlan) -> None:
        if self._transfers is not None:
            self._transfers.wait_ready(plan.ready)
        with self._host_io(plan):
            plan.rows = self.gather(plan)
        self._inflight = plan

    def record_load_timings(self) -> list | None:
        """CUDA: from now on, the (start, end) timing events of every load's copies (for benchmarks);
        None elsewhere."""
        if self._transfers is None:
            return None
        self._transfers.load_timings = []
        return self._transfers.load_timings

    def _host_io(self, plan: StepPlan) -> AbstractContextManager:
        """Counts the disk I/O of a step's work with rows served from the (mapped) host."""
        return nullcontext() if plan.overflow is None else self.host.measured()

    @torch.no_grad()
    def apply_gradients(self, plan: StepPlan, grad_out: torch.Tensor) -> None:
        """The fused update of the step's unique rows from the gradient of the pooled output."""
        b, dim = plan.batch, self.dim
        grad_bags = grad_out.reshape(-1, dim)  # (B * F, D): a view, bags are sample-major
        if self.mean:
            offsets = self._dev(plan, "offsets", b.offsets)
            grad_bags = grad_bags / (offsets[1:] - offsets[:-1]).clamp(min=1).unsqueeze(1)
        per_id = (
            grad_bags
            if b.bag_of_id is None
            else grad_bags.index_select(0, self._dev(plan, "bags", b.bag_of_id))
        )
        grad_rows = torch.zeros(len(b.uniq), dim, device=self.device)
        grad_rows.index_add_(0, self._dev(plan, "inverse", b.inverse), per_id)
        self.optimizer.update(plan.rows, grad_rows, plan.step)
        with self._host_io(plan):
            self._write_back(plan)
        if self._transfers is not None:  # later copies of these slots wait for this update
            self._transfers.after_update()
        plan.rows = None
        if self._inflight is plan:
            self._inflight = None

    def _write_back(self, plan: StepPlan) -> None:
        """The step's updated rows into their slots (marked dirty), or to the host where served from it."""
        b, rows = plan.batch, plan.rows
        if self._rows is not None:
            dirty = None if self.resident else self.state.dirty
            host = None if plan.overflow is None else self.host.data
            self._rows.scatter(rows, plan.slots, b.uniq, self.cache, dirty, host)
            if plan.overflow is not None:
                self.stats.written_by_update += self.count_per_table(plan.host_rows)
        elif plan.overflow is None:
            self.cache.index_copy_(0, self._dev(plan, "slots", plan.slots), rows)
            if not self.resident:
                self.state.dirty[plan.slots] = True
        else:
            self._cache_and_scratch.index_copy_(0, self._dev(plan, "write_slots", plan.write_slots), rows)
            self.state.dirty_and_scratch[plan.write_slots] = True
            host = rows.index_select(0, self._dev(plan, "overflow", plan.overflow)).to("cpu")
            self.host.data.index_copy_(0, plan.host_rows, host)
            self.stats.written_by_update += self.count_per_table(plan.host_rows)

    @torch.no_grad()
    def lookup_readonly(self, batch: PreparedBatch) -> torch.Tensor:
        """Evaluation: hits from the cache, misses straight from the host; nothing admitted or written."""
        self.stats.eval_lookups += batch.lookups
        if self._transfers is not None:
            self._transfers.wait_ready(self._transfers.ready)
        if self.resident:
            plan = StepPlan(batch, 0, batch.uniq, None)
        else:
            slots = self.state.row_to_slot[batch.uniq].to(torch.int64)
            miss = torch.nonzero(slots < 0).squeeze(1)
            plan = StepPlan(batch, 0, slots, miss if miss.numel() else None)
            if miss.numel():
                self.stats.eval_host_rows += self.count_per_table(batch.uniq[miss])
        return self.pool(plan, self.gather(plan))

    # ---------------------------------------------------------------- state
    @torch.no_grad()
    def flush(self) -> None:
        """Write every dirty cached row back to the host (they stay cached, now clean)."""
        if self.resident:
            return
        slots = torch.nonzero(self.state.dirty).squeeze(1)
        if slots.numel():
            rows = self.state.slot_to_row[slots]
            with self.host.measured():
                self._copy_out(slots, rows)
            self.stats.written += self.count_unsorted_per_table(rows)
            self.state.dirty[slots] = False

    def table_rows(self, t: int) -> torch.Tensor:
        """Table ``t``'s rows ``[weight | state]`` in the host layout (call ``flush`` first)."""
        lo, hi = self.row_offsets[t], self.row_offsets[t + 1]
        return (self.cache if self.resident else self.host.data)[lo:hi]

    def save_table(self, t: int, out: BinaryIO) -> None:
        """Stream table ``t``'s rows (host layout) into the open file ``out``, in bounded memory
        (call ``flush`` first)."""
        lo, hi = self.row_offsets[t], self.row_offsets[t + 1]
        if self.resident:
            stream_rows(self.cache, lo, hi - lo, out)
        else:
            self.host.save_rows(lo, hi - lo, out)

    @torch.no_grad()
    def write_table_rows(self, t: int, first: int, rows: torch.Tensor) -> None:
        """Rows ``[first, first + len(rows))`` of table ``t`` become ``rows`` (host layout); call
        ``rebuild`` once done."""
        lo = self.row_offsets[t] + first
        if lo + len(rows) > self.row_offsets[t + 1]:
            name, end = self.configs[t].name, first + len(rows)
            raise ValueError(f"table {name}: rows up to {end} written, it has {self.rows[t]}")
        if self.resident:
            self.cache[lo : lo + len(rows)] = rows.to(self.device)
        else:
            self.host.write_rows(lo, rows)

    def rebuild(self, queued: list[PreparedBatch]) -> None:
        """After the host rows changed underneath: drop the cache and warm it up again."""
        if not self.resident:
            self._reset_cache(queued)
        self._inflight = None

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
