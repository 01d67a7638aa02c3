"""TorchRec's ``CacheStatistics`` from a table's frequency curve (``table_stats.TableStats``), for
users of TorchRec's own planner and its ``FUSED_UVM_CACHING`` kernel
(``ParameterConstraints(cache_params=CacheParams(stats=...))``)."""

from __future__ import annotations

from torchrec.distributed.types import CacheStatistics

from dlrm_cache.distributed.table_stats import TableStats


class FrequencyCacheStatistics(CacheStatistics):
    """The curve's figures, under the names TorchRec's planner reads."""

    def __init__(self, table: TableStats, batch_size: int):
        self.table, self.batch_size = table, batch_size

    @property
    def expected_lookups(self) -> float:
        """Expected distinct rows in a global batch."""
        return self.table.expected_distinct(self.batch_size * self.table.lookups)

    def expected_miss_rate(self, clf: float) -> float:
        return 1.0 - self.table.hit_share(int(round(clf * self.table.rows)))

    @property
    def cacheability(self) -> float:
        return self.table.cacheability()
