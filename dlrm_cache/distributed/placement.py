"""A run's plan from its config and its dataset: the tables' frequency curves, the caches fitted to
the batch, and where every table goes (``planner.CachePlan``, or ``hybrid_plan.HybridPlan`` for
``trainer.sharding=hybrid``). Either is a ``Plan``: what the trainer prints and shards by, with the
bytes the cost model expects a step to send.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig, TrainRunConfig
from dlrm_cache.criteo import CAT_COLUMNS, table_name
from dlrm_cache.distributed.comm_model import StepBytes, sharded_bytes
from dlrm_cache.distributed.hybrid_plan import plan_hybrid
from dlrm_cache.distributed.planner import plan_cache
from dlrm_cache.distributed.rank import current_rank
from dlrm_cache.distributed.table_stats import TableStats, fit_to_batch, load_table_stats

log = logging.getLogger(__name__)


class Plan(Protocol):
    world_size: int
    cache: CacheConfig  # the caches' settings, with the planned sizes
    predicted: StepBytes  # the bytes a step is expected to send, all ranks together

    def describe(self) -> str: ...


def table_stats(cfg: TrainRunConfig, root: Path) -> list[TableStats]:
    """The frequency curve of every table of the dataset at ``root``."""
    tables = {table_name(f): f for f in CAT_COLUMNS}
    return load_table_stats(root, tables, {t: cfg.model.embedding_dim for t in tables})


def plan_tables(cfg: TrainRunConfig, root: Path, world_size: int, sharded: bool = True) -> Plan:
    """The planner's placement and cache sizes from the dataset's frequency statistics (unsharded:
    placement on one rank, whatever the sharding)."""
    stats = table_stats(cfg, root)
    t, optimizer, batch = cfg.trainer, SparseOptimizer.from_config(cfg.optim), cfg.train.batch_size
    if t.sharding == "hybrid" and sharded:
        return plan_hybrid(stats, world_size, batch, cfg.cache, optimizer, t.network, t.hot_rows)
    plan = plan_cache(stats, world_size, _fit(cfg, stats), optimizer, t.sharding if sharded else "table_wise")
    return replace(plan, predicted=StepBytes(sharded_bytes(stats, plan.sharding, batch, world_size)))


def fitted_cache(cfg: TrainRunConfig, root: Path) -> CacheConfig:
    """The unsharded run's cache settings, fitted to its batch from the dataset's statistics."""
    if _sized_elsewhere(cfg):
        return cfg.cache
    return _fit(cfg, table_stats(cfg, root))


def _sized_elsewhere(cfg: TrainRunConfig) -> bool:
    """Caches sized by ``cache.device_budget_gb`` (the planner decides), or no cache at all."""
    return bool(cfg.cache.device_budget_gb) or cfg.cache.policy == "none"


def _fit(cfg: TrainRunConfig, stats: list[TableStats]) -> CacheConfig:
    """``cfg.cache`` with the caches ``cache.ratio`` leaves smaller than a step needs raised to fit
    (``table_stats.fit_to_batch``)."""
    if _sized_elsewhere(cfg):
        return cfg.cache
    fitted, raised = fit_to_batch(cfg.cache, stats, cfg.train.batch_size)
    if raised and current_rank().rank == 0:
        log.info(
            "cache.ratio=%g leaves %d table(s) smaller than a step needs (the distinct rows of two batches "
            "of %d): raised to fit, %s; cache.table_ratios.<table> keeps a size you choose",
            cfg.cache.ratio, len(raised), cfg.train.batch_size,
            ", ".join(f"{t} {a:,} -> {b:,} rows" for t, (a, b) in raised.items()),
        )  # fmt: skip
    return fitted
