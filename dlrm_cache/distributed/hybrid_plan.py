"""The hybrid plan: how many rows of each table every rank replicates (``comm_model``), which rank owns
each table's cold rows, and the caches of those cold rows (``planner.plan_cache``; sized by
``cache.ratio``, never below what a step's cold lookups need: ``planner.fit_to_batch``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import GB, CacheConfig, NetworkConfig
from dlrm_cache.distributed import comm_model
from dlrm_cache.distributed.planner import CachePlan, plan_cache
from dlrm_cache.distributed.table_stats import TableStats, fit_to_batch

GB_PER_S = 1e9


def network(cfg: NetworkConfig) -> comm_model.Network:
    return comm_model.Network(
        cfg.all_to_all_gb_per_s * GB_PER_S,
        cfg.all_reduce_gb_per_s * GB_PER_S,
        cfg.host_to_device_gb_per_s * GB_PER_S,
    )


@dataclass
class HybridPlan:
    world_size: int
    global_batch: int
    hot_rows: dict[str, int]
    owners: dict[str, int]  # table -> rank holding its cold rows
    cold: CachePlan | None  # the cold parts' caches (tables named as the real ones); None: all hot
    cache: CacheConfig  # the cold parts' cache settings (their planned table_ratios)
    predicted: comm_model.StepBytes
    table_wise: comm_model.StepBytes  # what table-wise sharding of the same tables would send
    seconds: float
    table_wise_seconds: float
    hot_bytes_per_rank: float
    dense_sync_bytes: float  # what a dense all-reduce of every hot row would send instead
    rows: dict[str, int]
    cold_shares: dict[str, float]  # share of each table's lookups that are cold

    def describe(self) -> str:
        lines = [f"hybrid plan over {self.world_size} rank(s), global batch {self.global_batch}:"]
        lines.append(f"  {'table':<12}{'rows':>11}{'hot rows':>11}{'cold share':>12}{'cold rank':>11}")
        by_name = {s.table: s for s in (self.cold.shards if self.cold else [])}
        for name, h in self.hot_rows.items():
            owner = self.owners.get(name)
            rows = by_name[name].cache_rows if name in by_name else None
            lines.append(
                f"  {name:<12}{self.rows[name]:>11}{h:>11}{self.cold_shares[name]:>12.3f}"
                f"{'-' if owner is None else owner:>11}"
                + (f"   cache {rows} rows" if rows is not None else "")
            )
        p, t = self.predicted, self.table_wise
        lines.append(
            f"  predicted per step: all-to-all {p.all_to_all / 1e6:.3f} MB, hot-row all-reduce "
            f"{p.all_reduce / 1e6:.3f} MB (dense: {self.dense_sync_bytes / 1e6:.3f} MB), "
            f"host<->device {p.host_to_device / 1e6:.3f} MB; "
            f"replicated rows {self.hot_bytes_per_rank / GB:.4f} GB a rank"
        )
        lines.append(
            f"  network bytes {p.network / 1e6:.3f} MB vs table-wise {t.network / 1e6:.3f} MB "
            f"({p.network / t.network if t.network else 0:.3f}x); "
            f"modeled time {self.seconds * 1e3:.3f} ms vs {self.table_wise_seconds * 1e3:.3f} ms"
        )
        return "\n".join(lines)

    def torchrec_plan(self, cold_ebc, sharder, local_size: int | None = None, device_type: str = "cpu"):
        """The plan of the cold tables' ``EmbeddingBagCollection``: each on its owner."""
        from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise

        from dlrm_cache.distributed.hybrid import COLD_FEATURE

        per_table = {
            COLD_FEATURE.format(r): table_wise(rank=r, compute_kernel="customized_kernel")
            for r in sorted(set(self.owners.values()))
            if any(c.name == COLD_FEATURE.format(r) for c in cold_ebc.embedding_bag_configs())
        }
        return construct_module_sharding_plan(
            cold_ebc, per_table, sharder=sharder, local_size=local_size or self.world_size,
            world_size=self.world_size,
            device_type=device_type,
        )  # fmt: skip


def plan_hybrid(
    tables: list[TableStats],
    world_size: int,
    global_batch: int,
    cache: CacheConfig,
    optimizer: SparseOptimizer,
    net: NetworkConfig,
    fixed: dict[str, int] | None = None,
) -> HybridPlan:
    """``fixed``: rows per table given by the user (``trainer.hot_rows``), checked against the tables."""
    fixed = dict(fixed or {})
    by_name = {t.name: t for t in tables}
    for name, h in fixed.items():
        if name not in by_name:
            raise ValueError(f"trainer.hot_rows.{name}={h}: no table {name!r} (tables: {', '.join(by_name)})")
        if not 0 <= h <= by_name[name].rows:
            raise ValueError(f"trainer.hot_rows.{name}={h}: the table has {by_name[name].rows} rows")
    dims = {t.dim for t in tables}
    if len(dims) != 1:
        raise ValueError(f"hybrid sharding takes one embedding dim for all tables, not {sorted(dims)}")
    dim = dims.pop()
    row_bytes = 4 * (dim + optimizer.state_width(dim))
    if cache.device_budget_gb:
        budget = cache.device_budget_gb * GB
    else:  # the device memory a cache of cache.ratio would take anyway (or what the user fixed, if more)
        fixed_rows = sum(fixed.values())
        budget = max(cache.ratio * sum(t.rows for t in tables), fixed_rows) * row_bytes
    net_ = network(net)

    def cold_cache_rows(t: TableStats, hot: int) -> int:
        cold_rows = t.rows - hot
        return cache.capacity(t.name, cold_rows) if cold_rows > 0 else 0

    choice = comm_model.choose_hot_rows(
        tables, world_size, global_batch, net_, row_bytes, budget, fixed, cold_cache_rows
    )
    hot = choice.hot_rows
    hot_bytes = sum(hot.values()) * row_bytes
    cold_stats = [
        TableStats(
            t.name,
            t.rows - hot[t.name],
            t.dim,
            t.features,
            None if t.counts is None else t.counts[hot[t.name] :],
            ids_per_bag=t.ids_per_bag,
        )
        for t in tables
        if hot[t.name] < t.rows
    ]
    cold = None
    if cold_stats:
        left = replace(cache, device_budget_gb=(budget - hot_bytes) / GB if cache.device_budget_gb else 0.0)
        left = replace(left, table_ratios={k: v for k, v in cache.table_ratios.items() if k in choice.owners})
        if not cache.device_budget_gb:  # sized by cache.ratio: never below what a step's cold lookups need
            cold_lookups = {
                t.name: global_batch * t.lookups * comm_model.cold_share(t, hot[t.name]) for t in tables
            }
            left, _ = fit_to_batch(left, cold_stats, cold_lookups)
        cold = plan_cache(cold_stats, world_size, left, optimizer, "table_wise", placement=choice.owners)
    kinds = {t.name: "table_wise" for t in tables}
    tw = comm_model.StepBytes(comm_model.sharded_bytes(tables, kinds, global_batch, world_size))
    return HybridPlan(
        world_size, global_batch, hot, choice.owners, cold, cold.cache if cold else cache, choice.predicted,
        tw, choice.seconds, tw.seconds(net_, world_size), hot_bytes,
        comm_model.dense_sync_bytes(tables, hot, world_size),
        {t.name: t.rows for t in tables}, {t.name: comm_model.cold_share(t, hot[t.name]) for t in tables},
    )  # fmt: skip
