"""A frequency-aware plan for the cached tables: which rank holds which table (or column shard), and how
many rows of each its cache keeps.

TorchRec's planner cannot cost ``customized_kernel`` tables (it refuses them), so the plan is built here
and handed to TorchRec with ``construct_module_sharding_plan`` and its ``table_wise`` / ``column_wise``
helpers. What it uses is each table's frequency curve from ``dlrm-preprocess`` (``vocab/<feature>``
train counts, hottest id first): a cache holding a table's ``k`` hottest rows serves the share
``sum(counts[:k]) / sum(counts)`` of its lookups, so the rest are expected misses.

- **Cache sizes**: ``cache.ratio`` (and ``cache.table_ratios``) of each table's rows, or, with
  ``cache.device_budget_gb`` > 0, the rows that save the most misses within each rank's budget: every
  cached row costs its bytes and saves its count of lookups, so the best caches keep every row whose
  count is above one threshold per rank (water-filling), found by bisection.
- **Placement**: tables above ``cache.full_table_rows`` are split by columns over all ranks
  (``sharding=column_wise``) or placed whole (``table_wise``); whole tables go, largest cost first, to
  the rank where the largest of its three normalised loads stays smallest: expected miss traffic per
  sample (bytes moved host -> device), host memory, device memory; then single moves and pairwise
  swaps between ranks while they lower the largest load, from that start and a few seeded random
  ones, keeping the best.

The frequency curves and their arithmetic are ``table_stats.py``'s; this module and ``hybrid_plan.py``
plan over them with numpy alone (no torchrec).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import GB, CacheConfig
from dlrm_cache.distributed.comm_model import StepBytes
from dlrm_cache.distributed.table_stats import TableStats

LOADS = ("miss_bytes_per_sample", "host_bytes", "device_bytes")
_RESTARTS = 8  # seeded random starting placements for the local search, besides the greedy one


@dataclass
class ShardPlan:
    table: str
    rank: int
    cols: int  # columns of the table this shard holds
    cache_rows: int
    hit_share: float


@dataclass
class CachePlan:
    world_size: int
    sharding: dict[str, str]  # table -> "table_wise" | "column_wise"
    shards: list[ShardPlan]
    loads: np.ndarray  # (world_size, len(LOADS))
    cache: CacheConfig  # with the planned table_ratios
    shard_loads: dict[tuple[str, int], np.ndarray]  # (table, rank) -> what that shard adds to `loads`
    predicted: StepBytes = field(default_factory=StepBytes)  # a step's bytes (``placement.plan_tables``)

    def ranks_of(self, table: str) -> list[int]:
        return [s.rank for s in self.shards if s.table == table]

    def torchrec_plan(self, ebc, sharder, local_size: int | None = None, device_type: str = "cpu"):
        """The plan of an ``EmbeddingBagCollection``, for ``ShardingPlan({fqn: ...})``."""
        from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, table_wise

        kernel = "customized_kernel"
        per_table = {
            t: table_wise(rank=self.ranks_of(t)[0], compute_kernel=kernel)
            if kind == "table_wise"
            else column_wise(ranks=self.ranks_of(t), compute_kernel=kernel)
            for t, kind in self.sharding.items()
        }
        return construct_module_sharding_plan(
            ebc,
            per_table,
            sharder=sharder,
            local_size=local_size or self.world_size,
            world_size=self.world_size,
            device_type=device_type,
        )

    def imbalance(self) -> dict[str, float]:
        """Max over mean of each load across ranks (1.0: perfectly balanced)."""
        mean = self.loads.mean(axis=0)
        return {k: float(self.loads[:, i].max() / mean[i]) if mean[i] else 1.0 for i, k in enumerate(LOADS)}

    def describe(self) -> str:
        lines = [f"cache plan over {self.world_size} rank(s):"]
        lines.append(
            f"  {'table':<12}{'sharding':<13}{'ranks':<10}{'cols':>5}{'cache rows':>12}{'hit share':>10}"
        )
        for t, kind in self.sharding.items():
            shards = [s for s in self.shards if s.table == t]
            s = shards[0]
            ranks = ",".join(str(x.rank) for x in shards)
            lines.append(f"  {t:<12}{kind:<13}{ranks:<10}{s.cols:>5}{s.cache_rows:>12}{s.hit_share:>10.3f}")
        lines.append(f"  {'rank':<6}{'miss MB/1k samples':>20}{'host GB':>10}{'device GB':>11}")
        for r, (miss, host, dev) in enumerate(self.loads):
            lines.append(f"  {r:<6}{miss * 1000 / 1e6:>20.3f}{host / GB:>10.3f}{dev / GB:>11.4f}")
        lines.append(
            "  imbalance (max/mean): " + ", ".join(f"{k} {v:.3f}" for k, v in self.imbalance().items())
        )
        return "\n".join(lines)


def plan_cache(
    tables: list[TableStats],
    world_size: int,
    cache: CacheConfig,
    optimizer: SparseOptimizer,
    sharding: str = "table_wise",
    placement: dict[str, int] | None = None,
) -> CachePlan:
    """``placement``: table -> rank, given (the hybrid split places its cold parts itself); otherwise
    searched as the module docstring says."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: expected >= 1")
    names = [t.name for t in tables]
    unknown = set(cache.table_ratios) - set(names)
    if unknown:
        raise ValueError(f"cache.table_ratios names unknown tables: {sorted(unknown)}")

    def whole(t: TableStats) -> bool:  # lives wholly on the device
        return cache.keeps_whole(t.rows)

    def split(t: TableStats) -> bool:
        return sharding == "column_wise" and world_size > 1 and not whole(t) and t.dim % world_size == 0

    kinds = {t.name: "column_wise" if split(t) else "table_wise" for t in tables}

    def row_bytes(t: TableStats, cols: int) -> int:
        return 4 * (cols + optimizer.state_width(cols))

    budget = cache.device_budget_gb * GB

    # Provisional cache sizes, to cost the tables for placement: by ratio, or by one water-fill of the
    # budget of all ranks together over all tables.
    if budget:
        items = [(t, row_bytes(t, t.dim)) for t in tables]
        provisional = dict(
            zip(names, _water_fill(items, budget * world_size, whole, "all ranks"), strict=True)
        )
    else:
        provisional = {t.name: cache.capacity(t.name, t.rows) for t in tables}

    def cost(t: TableStats, cols: int, k: int) -> np.ndarray:
        b = row_bytes(t, cols)
        return np.array([t.features * (1 - t.hit_share(k)) * b, t.rows * b, k * b], dtype=np.float64)

    fixed = np.zeros((world_size, len(LOADS)))  # the column shards' loads
    placed: dict[str, list[int]] = {}
    for t in tables:
        if kinds[t.name] == "column_wise":
            placed[t.name] = list(range(world_size))
            fixed += cost(t, t.dim // world_size, provisional[t.name])
    whole_costs = {
        t.name: cost(t, t.dim, provisional[t.name]) for t in tables if kinds[t.name] == "table_wise"
    }
    total = fixed.sum(axis=0) + sum(whole_costs.values(), np.zeros(len(LOADS)))
    norm = np.where(total > 0, total / world_size, 1.0)
    if placement is not None:
        starts = [{n: [placement[n]] for n in whole_costs}]
    else:
        greedy, g_loads = {}, fixed.copy()
        for name in sorted(whole_costs, key=lambda n: -float((whole_costs[n] / norm).max())):
            after = (g_loads + whole_costs[name]) / norm  # (ranks, loads) if the table went to each rank
            r = int(np.argmin(after.max(axis=1) + 1e-9 * after.sum(axis=1)))
            greedy[name] = [r]
            g_loads[r] += whole_costs[name]
        rng = np.random.default_rng(0)  # seeded restarts of the local search: the plan is deterministic
        starts = [
            greedy,
            *({n: [int(rng.integers(world_size))] for n in whole_costs} for _ in range(_RESTARTS)),
        ]
    best = None
    for start in starts:
        trial = fixed.copy()
        for n, (r,) in start.items():
            trial[r] += whole_costs[n]
        if placement is None:
            _improve(start, whole_costs, trial, norm)
        if best is None or _score(trial, norm) < _score(best[1], norm):
            best = (start, trial)
    placed.update(best[0])

    # Final cache sizes: ratio, or one water-fill per rank within its own budget. Column shards of a
    # table keep the same rows on every rank (the smallest of their ranks' choices), so that a row
    # is a hit or a miss for the whole table at once.
    by_name = {t.name: t for t in tables}
    if budget:
        sizes: dict[str, int] = {}
        for r in range(world_size):
            mine = [n for n in names if r in placed[n]]
            items = [
                (by_name[n], row_bytes(by_name[n], _cols(by_name[n], kinds[n], world_size))) for n in mine
            ]
            for n, k in zip(mine, _water_fill(items, budget, whole, f"rank {r}"), strict=True):
                sizes[n] = min(sizes.get(n, k), k)
    else:
        sizes = provisional
    shards, loads, shard_loads = [], np.zeros((world_size, len(LOADS))), {}
    for t in tables:
        cols = _cols(t, kinds[t.name], world_size)
        for r in placed[t.name]:
            shards.append(ShardPlan(t.name, r, cols, sizes[t.name], t.hit_share(sizes[t.name])))
            shard_loads[t.name, r] = cost(t, cols, sizes[t.name])
            loads[r] += shard_loads[t.name, r]
    ratios = {t.name: sizes[t.name] / t.rows for t in tables}
    return CachePlan(world_size, kinds, shards, loads, replace(cache, table_ratios=ratios), shard_loads)


def _score(loads: np.ndarray, norm: np.ndarray) -> tuple[float, float]:
    """The largest normalised load, then the sum of squares (evener loads)."""
    n = loads / norm
    return float(n.max()), float((n**2).sum())


def _improve(placed: dict[str, list[int]], costs: dict[str, np.ndarray], loads: np.ndarray, norm) -> None:
    """Local search after the greedy placement: move one table, or swap two, between ranks while that
    lowers the largest normalised load (ties: the sum of squares, i.e. evener loads)."""

    names = list(costs)
    for _ in range(1000):
        best, best_move = _score(loads, norm), None
        for i, a in enumerate(names):
            ra = placed[a][0]
            for r in range(len(loads)):  # move a to r
                if r == ra:
                    continue
                trial = loads.copy()
                trial[ra] -= costs[a]
                trial[r] += costs[a]
                if (sc := _score(trial, norm)) < best:
                    best, best_move = sc, ((a, r),)
            for b in names[i + 1 :]:  # swap a and b
                rb = placed[b][0]
                if rb == ra:
                    continue
                trial = loads.copy()
                delta = costs[b] - costs[a]
                trial[ra] += delta
                trial[rb] -= delta
                if (sc := _score(trial, norm)) < best:
                    best, best_move = sc, ((a, rb), (b, ra))
        if best_move is None:
            return
        for name, r in best_move:
            loads[placed[name][0]] -= costs[name]
            loads[r] += costs[name]
            placed[name] = [r]


def _cols(t: TableStats, kind: str, world_size: int) -> int:
    return t.dim // world_size if kind == "column_wise" else t.dim


def _water_fill(items: list[tuple[TableStats, int]], budget: float, whole, where: str) -> list[int]:
    """Cache rows per table that save the most lookups within ``budget`` bytes: every row whose count
    is at least one threshold (bisection), the next tier shared out pro rata; whole tables first."""
    fixed = sum(t.rows * b for t, b in items if whole(t))
    if fixed > budget:
        raise ValueError(
            f"cache.device_budget_gb: {where} needs {fixed / GB:.3f} GB for the tables kept wholly on the "
            f"device (<= cache.full_table_rows rows) but has {budget / GB:.3f} GB"
        )
    cached = [(t, b) for t, b in items if not whole(t)]
    left = budget - fixed - sum(b for _, b in cached)  # at least one row per table
    if left < 0:
        raise ValueError(f"cache.device_budget_gb: {where} cannot hold one row of each cached table")

    def used(threshold: float) -> list[int]:
        return [max(1, t.rows_at_least(threshold)) for t, _ in cached]

    def spent(ks: list[int]) -> float:
        return sum((k - 1) * b for k, (_, b) in zip(ks, cached, strict=True))

    top = (
        max((float(t.counts[0]) if t.counts is not None and t.rows else 1.0) for t, _ in cached)
        if cached
        else 1
    )
    lo, hi = 0.0, top + 1  # spent(used(hi)) <= left always; find the smallest threshold that fits
    for _ in range(100):
        mid = (lo + hi) / 2
        if spent(used(mid)) <= left:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-9 * max(1.0, hi):
            break
    ks = used(hi)
    nxt = used(lo)  # the next tier, which does not fit whole: shared out pro rata
    extra = sum((n - k) * b for n, k, (_, b) in zip(nxt, ks, cached, strict=True))
    if extra > 0:
        share = min(1.0, (left - spent(ks)) / extra)
        ks = [k + int(math.floor((n - k) * share)) for n, k in zip(nxt, ks, strict=True)]
    it = iter(ks)
    return [t.rows if whole(t) else next(it) for t, _ in items]
