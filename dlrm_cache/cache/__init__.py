"""The frequency-aware software cache: full tables on the host, hot rows on the device.

The core (``group``, ``host``, ``optim``, ``policy``, ``future``) is plain PyTorch and imports neither
torchrec nor fbgemm, so it runs wherever torch does; ``collection`` puts TorchRec's interface on it.
"""

from typing import TYPE_CHECKING

__all__ = ["CachedEmbeddingBagCollection", "SparseOptimizer", "table_capacity"]

if TYPE_CHECKING:
    from dlrm_cache.cache.collection import CachedEmbeddingBagCollection, table_capacity
    from dlrm_cache.cache.optim import SparseOptimizer


def __getattr__(name: str):
    """Import lazily, so that importing the core does not import torchrec."""
    if name in ("CachedEmbeddingBagCollection", "table_capacity"):
        from dlrm_cache.cache import collection

        return getattr(collection, name)
    if name == "SparseOptimizer":
        from dlrm_cache.cache.optim import SparseOptimizer

        return SparseOptimizer
    raise AttributeError(name)
