"""The frequency-aware software cache: full tables on the host, hot rows on the device.

Plain PyTorch (TorchRec's data types only; no torch.distributed, no TorchRec sharding).
"""

from dlrm_cache.cache.collection import CachedEmbeddingBagCollection, table_capacity
from dlrm_cache.cache.optim import SparseOptimizer

__all__ = ["CachedEmbeddingBagCollection", "SparseOptimizer", "table_capacity"]
