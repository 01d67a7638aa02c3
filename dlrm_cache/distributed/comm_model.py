"""The expected bytes a training step sends, from the tables' frequency curves, and the hybrid split
that minimises their time.

Per step of a global batch of ``G`` samples over ``W`` ranks (``B = G / W`` each), every figure all ranks
together, ``s`` ids per bag (``TableStats.ids_per_bag``: 1 for Criteo's layout), ``D`` the embedding dim:

- **All-to-all** (TorchRec's input and output distribution): to a table's owner, each other rank sends
  its bags' lengths (int32) and ids (int64); the owner returns one pooled row per bag (float32,
  ``D / W`` columns from each owner under column-wise sharding) and gets its gradient back. Table-wise:
  ``(W - 1) B (4 + 8 s + 8 D)`` per table; plus one exchange of split sizes per step and sharding type
  (TorchRec distributes each type's input on its own), ``24 W (W - 1)``.
  Hybrid: only the cold bags travel (a bag is cold when one of its ids is, the ids taken as
  independent); rank ``r``'s cold features share one stride, the largest count of cold bags any owner
  has among its samples (expected from a normal approximation of each owner's count: the mean and
  spread of a sum of independent lookups), and the cold ids only.
- **All-reduce** of the hot rows' gradients (``hot_rows``), as a ring all-reduce sends it, ``2 (W - 1)``
  times its size: the gradients of the rows the global batch touched (known on the host from the
  lookahead: nothing is sent to agree on them), ``D`` floats each; a row with lookup probability ``p``
  is touched with probability ``1 - (1 - p)^G``.
- **Host <-> device**: the cache's misses, a row (weight and state) each, from the hit share of the rows
  a cold part's cache holds (its hottest).

Time is bytes over bandwidth per rank (``Network``): a rank sends ``1 / W`` of each total.
``choose_hot_rows`` searches one threshold on a row's expected lookups per global batch for all tables
(a row is hot when it is looked up at least that often): for a fixed placement the bytes are separable
per row, a hot row costing the same all-reduce bytes wherever it sits and saving its expected cold
lookups, so the best split at any size of the hot set is such a threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dlrm_cache.distributed.table_stats import TableStats

LENGTH_BYTES, ID_BYTES, FLOAT_BYTES = 4, 8, 4  # KJT lengths (int32), ids (int64), pooled rows (float32)
SPLITS_BYTES = 3 * 8  # per rank pair per step: the split sizes of lengths and ids, and the stride


@dataclass(frozen=True)
class Network:
    """Bandwidths per rank, bytes/s."""

    all_to_all: float
    all_reduce: float
    host_to_device: float


@dataclass
class StepBytes:
    """Expected bytes per step, all ranks together."""

    all_to_all: float = 0.0
    all_reduce: float = 0.0
    host_to_device: float = 0.0

    @property
    def network(self) -> float:
        return self.all_to_all + self.all_reduce

    def seconds(self, net: Network, world_size: int) -> float:
        """The step's modeled communication time: each rank's share of the bytes over its bandwidths."""
        return (
            self.all_to_all / net.all_to_all
            + self.all_reduce / net.all_reduce
            + self.host_to_device / net.host_to_device
        ) / world_size


def splits_bytes(world_size: int) -> float:
    return SPLITS_BYTES * world_size * (world_size - 1)


def sharded_bytes(
    tables: list[TableStats], kinds: dict[str, str], global_batch: int, world_size: int
) -> float:
    """All-to-all bytes per step of table-wise / column-wise sharding (every bag travels)."""
    w, b = world_size, global_batch / world_size
    if w == 1:
        return 0.0
    total = splits_bytes(w) * len({kinds.get(t.name, "table_wise") for t in tables})  # an input dist each
    for t in tables:
        ids = (w - 1) * b * (t.features * LENGTH_BYTES + t.lookups * ID_BYTES)
        if kinds.get(t.name) == "column_wise":
            ids *= w  # every rank's bags go to every column shard
        total += ids + 2 * (w - 1) * b * t.features * t.dim * FLOAT_BYTES
    return total


def cold_share(t: TableStats, hot: int) -> float:
    """Share of the table's lookups that miss its ``hot`` hottest rows."""
    return 1.0 - t.hit_share(hot)


def expected_max(means: np.ndarray, sds: np.ndarray) -> float:
    """E[max_i X_i] for independent normal X_i (numerically, on a grid)."""
    if len(means) == 1 or not np.any(sds > 0):
        return float(means.max())
    lo = float((means - 6 * sds).min())
    hi = float((means + 6 * sds).max())
    x = np.linspace(lo, hi, 2001)
    z = (x[:, None] - means[None, :]) / np.where(sds > 0, sds, 1e-12)[None, :]
    cdf = np.prod(0.5 * (1 + _erf(z / math.sqrt(2))), axis=1)
    # E[M] = lo + integral of (1 - F(x)) over [lo, hi]
    return float(lo + np.trapezoid(1 - cdf, x))


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz and Stegun 7.1.26 (error below 1.5e-7)."""
    s = np.sign(x)
    a = np.abs(x)
    t = 1 / (1 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1 - poly * np.exp(-a * a))


def hot_sync_bytes(
    tables: list[TableStats], hot: dict[str, int], global_batch: int, world_size: int
) -> float:
    """The hot rows' synchronisation: the touched rows' gradients."""
    if world_size == 1:
        return 0.0
    touched = sum(t.expected_touched(hot.get(t.name, 0), global_batch * t.lookups) for t in tables)
    return 2 * (world_size - 1) * touched * tables[0].dim * FLOAT_BYTES


def dense_sync_bytes(tables: list[TableStats], hot: dict[str, int], world_size: int) -> float:
    """What a dense all-reduce of every hot row's gradient would send instead."""
    rows = sum(hot.get(t.name, 0) for t in tables)
    return 2 * (world_size - 1) * rows * tables[0].dim * FLOAT_BYTES


def hybrid_bytes(
    tables: list[TableStats], hot: dict[str, int], owners: dict[str, int], global_batch: int, world_size: int
) -> StepBytes:
    """Network bytes per step of the hybrid split ``hot`` (rows per table) with cold parts on ``owners``
    (table -> rank)."""
    w, b = world_size, global_batch / world_size
    if w == 1:
        return StepBytes(0.0, 0.0)
    reduce = hot_sync_bytes(tables, hot, global_batch, w)
    by_owner: dict[int, list[TableStats]] = {}
    for t in tables:
        if t.name in owners and hot.get(t.name, 0) < t.rows:
            by_owner.setdefault(owners[t.name], []).append(t)
    if not by_owner:
        return StepBytes(0.0, reduce)
    dim = tables[0].dim
    means, sds, cold_ids = [], [], 0.0
    for ts in by_owner.values():
        cold = np.array([cold_share(t, hot.get(t.name, 0)) for t in ts])  # of the ids
        q = np.array([t.bag_share(c) for t, c in zip(ts, cold, strict=True)])  # of the bags
        f = np.array([t.features for t in ts], dtype=np.float64)
        means.append(b * float((f * q).sum()))
        sds.append(math.sqrt(b * float((f * q * (1 - q)).sum())))
        # an owner's cold ids come from the other w - 1 ranks
        cold_ids += (w - 1) * b * float((np.array([t.lookups for t in ts]) * cold).sum())
    stride = max(1.0, expected_max(np.array(means), np.array(sds)))
    n_owners = len(by_owner)
    remote_features = sum(n_owners - (1 if r in by_owner else 0) for r in range(w))
    a2a = splits_bytes(w) + remote_features * stride * (LENGTH_BYTES + 2 * dim * FLOAT_BYTES)
    a2a += cold_ids * ID_BYTES
    return StepBytes(a2a, reduce)


def place_cold(tables: list[TableStats], hot: dict[str, int], world_size: int) -> dict[str, int]:
    """Owners of the cold parts: largest expected cold lookups first, each to the rank with the fewest so
    far (what the stride of the cold features pays for is the busiest owner)."""
    load = [0.0] * world_size
    owners = {}
    cold = [t for t in tables if hot.get(t.name, 0) < t.rows]
    for t in sorted(cold, key=lambda t: (-t.lookups * cold_share(t, hot.get(t.name, 0)), t.name)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[t.name] = r
        load[r] += t.lookups * cold_share(t, hot.get(t.name, 0))
    return owners


def hot_rows_at(
    tables: list[TableStats], threshold: float, global_batch: int, fixed: dict[str, int]
) -> dict[str, int]:
    """Rows per table looked up at least ``threshold`` times per global batch (expected)."""
    out = {}
    for t in tables:
        if t.name in fixed:
            out[t.name] = fixed[t.name]
        elif not t.known:
            out[t.name] = t.rows if global_batch * t.lookups / t.rows >= threshold else 0
        else:
            per_count = global_batch * t.lookups / t.total  # expected lookups per batch per count
            out[t.name] = t.rows_at_least(threshold / per_count)
    return out


def candidate_thresholds(tables: list[TableStats], global_batch: int, limit: int = 600) -> np.ndarray:
    """Every distinct expected-lookups level of the tables' rows when there are few rows, else ``limit``
    log-spaced levels between the lowest and the highest; +inf (nothing hot) first."""
    levels = []
    for t in tables:
        if not t.known:
            levels.append(np.array([global_batch * t.lookups / t.rows]))
            continue
        per_count = global_batch * t.lookups / t.total
        positive = t.counts[: t.counted_rows()]
        few = len(positive) <= limit
        levels.append((np.unique(positive) if few else positive[[0, -1]]) * per_count)
    every = np.unique(np.concatenate(levels)) if levels else np.array([])
    if len(every) > limit or sum(t.rows for t in tables) > limit:
        grid = np.geomspace(every[0], every[-1], limit) if len(every) else every
        # each level also a hair lower: a row whose level rounds just under it (count * per_count
        # divided back) is still counted hot at its own level
        every = np.unique(np.concatenate([grid, grid * (1 - 1e-12), every if len(every) <= limit else []]))
    return np.concatenate([[np.inf], every[::-1]])


@dataclass
class HotChoice:
    hot_rows: dict[str, int]
    owners: dict[str, int]
    predicted: StepBytes
    seconds: float
    threshold: float


def evaluate(tables, hot, world_size, global_batch, row_bytes, net, cold_cache_rows) -> HotChoice:
    """The bytes and modeled time of one split (its cold parts placed by ``place_cold``)."""
    owners = place_cold(tables, hot, world_size)
    bytes_ = hybrid_bytes(tables, hot, owners, global_batch, world_size)
    bytes_.host_to_device = (
        sum(
            global_batch
            * t.lookups
            * (1 - t.hit_share(hot.get(t.name, 0) + cold_cache_rows(t, hot.get(t.name, 0))))
            for t in tables
        )
        * row_bytes
    )
    return HotChoice(hot, owners, bytes_, bytes_.seconds(net, world_size), math.nan)


def choose_hot_rows(
    tables: list[TableStats],
    world_size: int,
    global_batch: int,
    net: Network,
    row_bytes: int,
    hot_budget_bytes: float,
    fixed: dict[str, int],
    cold_cache_rows,
) -> HotChoice:
    """The split with the least modeled time whose hot rows fit ``hot_budget_bytes`` per rank
    (``math.inf``: no limit); tables in ``fixed`` keep their rows.
    ``cold_cache_rows(table, hot)``: the cache rows its cold part gets."""
    best = None
    for threshold in candidate_thresholds(tables, global_batch):
        hot = hot_rows_at(tables, threshold, global_batch, fixed)
        if sum(hot.values()) * row_bytes > hot_budget_bytes:
            continue
        choice = evaluate(tables, hot, world_size, global_batch, row_bytes, net, cold_cache_rows)
        choice.threshold = float(threshold)
        if best is None or choice.seconds < best.seconds - 1e-15:
            best = choice
    if best is None:
        need = sum(hot_rows_at(tables, math.inf, global_batch, fixed).values()) * row_bytes
        raise ValueError(
            f"cache.device_budget_gb: the rows every rank must replicate need {need / 2**30:.3f} GB, "
            f"more than the {hot_budget_bytes / 2**30:.3f} GB budget"
        )
    return best
