"""The cache as TorchRec's ``CUSTOMIZED_KERNEL``: kernel, lookup, shardings, sharded module, sharder.

TorchRec 1.8 has one slot for a third-party embedding kernel, ``EmbeddingComputeKernel.CUSTOMIZED_KERNEL``;
the pieces below fill it without modifying TorchRec (the pattern of NVIDIA's dynamicemb):

- ``CachedEmbeddingKernel``: one ``CachedEmbeddingBagCollection`` over the shards of one TorchRec table
  group on this rank (whole tables for table-wise, column slices for column-wise).
- ``CachedPooledEmbeddingsLookup``: builds that kernel, and hands it the next batch in ``prefetch``
  (TorchRec's prefetch pipeline calls it after input distribution).
- ``CachedTwSharding`` / ``CachedCwSharding``: TorchRec's table- and column-wise shardings, with that lookup.
- ``ShardedCachedEmbeddingBagCollection`` and ``CachedEmbeddingBagCollectionSharder``: put it all behind
  ``DistributedModelParallel``. The cache's settings travel in TorchRec's ``fused_params``.

After table- and column-wise input distribution a kernel sees the original ids of the whole global
batch (rank 0's samples first), which is exactly the global batch the data loader yields at world size
1: ``enqueue_global`` hands a kernel future batches read that way, ``cache.lookahead`` batches ahead,
far beyond the one batch TorchRec's pipeline runs ahead. Each forward checks that its batch is the
one enqueued (ids included), so a wrong feed fails loudly instead of training on wrong rows (ids on a
device are compared there, without a host sync, and a wrong one raises at the next log, checkpoint
or evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from torchrec.distributed.embedding_kernel import BaseEmbedding
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup
from torchrec.distributed.embedding_types import (
    EmbeddingComputeKernel,
    GroupedEmbeddingConfig,
    ShardedEmbeddingTable,
)
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.sharding.cw_sharding import CwPooledEmbeddingSharding
from torchrec.distributed.sharding.tw_sharding import TwPooledEmbeddingSharding
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_cache.cache.collection import CachedEmbeddingBagCollection, feature_index
from dlrm_cache.cache.host import TableShard
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig

FUSED_PARAM_KEY = "dlrm_cache"  # the CacheSpec's key in TorchRec's fused_params
CUSTOM = EmbeddingComputeKernel.CUSTOMIZED_KERNEL
SUPPORTED_SHARDING = (ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value)


class CacheSpec:
    """The cache's settings, carried through TorchRec's ``fused_params`` (which groups tables by them,
    so they must be hashable: equality and hash come from their full text)."""

    def __init__(
        self,
        cache: CacheConfig,
        optimizer: SparseOptimizer,
        seed: int = 0,
        collections: dict[str, CollectionMaker] | None = None,
    ):
        """``collections``: for the tables (by name) whose cache is not a ``CachedEmbeddingBagCollection``
        over their shards, what builds it (``CollectionMaker``; its text is part of the spec's)."""
        self.cache, self.optimizer, self.seed = cache, optimizer, seed
        self.collections = dict(collections or {})
        made = sorted((k, repr(v)) for k, v in self.collections.items())
        self._key = repr((asdict(cache), optimizer, seed, made))

    def cache_for(self, tables) -> CacheConfig:
        """The cache settings of a kernel over ``tables`` (names): the table ratios of those alone."""
        names = set(tables)
        ratios = {k: v for k, v in self.cache.table_ratios.items() if k in names}
        return replace(self.cache, table_ratios=ratios)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheSpec) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"CacheSpec({self._key})"


# Builds the cache of one table that is not a plain table shard: (TorchRec's shard of the table on this
# rank, the spec, the device) -> (the collection, where each of its tables sits in its full table, the
# kernel's feature names).
CollectionMaker = Callable[
    [ShardedEmbeddingTable, CacheSpec, torch.device | None],
    tuple[CachedEmbeddingBagCollection, dict[str, TableShard], list[str]],
]


class CachedEmbeddingKernel(BaseEmbedding, FusedOptimizerModule):
    """The cache over this rank's shards of one TorchRec table group.

    The collection is held outside the module tree on purpose: its rows are not parameters or buffers
    (TorchRec and DDP must not copy, sync or checkpoint them); ``dlrm_cache.distributed.checkpoint``
    saves and loads them."""

    def __init__(self, config: GroupedEmbeddingConfig, device: torch.device | None):
        super().__init__()
        spec = (config.fused_params or {}).get(FUSED_PARAM_KEY)
        if not isinstance(spec, CacheSpec):
            raise ValueError(
                "a customized_kernel table without the cache's settings: shard with "
                "CachedEmbeddingBagCollectionSharder"
            )
        self._config = config
        self._fused_optimizer = EmptyFusedOptimizer()
        names = [t.name for t in config.embedding_tables]
        maker = next((spec.collections[n] for n in names if n in spec.collections), None)
        if maker is not None:
            if len(names) != 1:
                raise ValueError(f"tables {names} on one rank: give each its own rank")
            collection, self.shards, self.feature_names = maker(config.embedding_tables[0], spec, device)
            object.__setattr__(self, "cache", collection)  # not a submodule (class docstring)
            return
        if len(set(names)) != len(names):
            raise ValueError(f"two shards of one table on one rank ({names}): give each shard its own rank")
        tables = [
            EmbeddingBagConfig(
                num_embeddings=t.local_rows,
                embedding_dim=t.local_cols,
                name=t.name,
                feature_names=list(t.feature_names),
                pooling=config.pooling,
                init_fn=t.init_fn,
            )
            for t in config.embedding_tables
        ]
        self.shards = {
            t.name: TableShard(
                row_offset=t.local_metadata.shard_offsets[0] if t.local_metadata else 0,
                col_offset=t.local_metadata.shard_offsets[1] if t.local_metadata else 0,
                full_rows=t.num_embeddings,
                full_dim=t.embedding_dim,
            )
            for t in config.embedding_tables
        }
        collection = CachedEmbeddingBagCollection(
            tables, spec.cache_for(names), spec.optimizer, device=device, seed=spec.seed, shards=self.shards
        )
        object.__setattr__(self, "cache", collection)  # not a submodule (class docstring)
        self.feature_names = [f for t in tables for f in t.feature_names]

    @property
    def config(self) -> GroupedEmbeddingConfig:
        return self._config

    @property
    def fused_optimizer(self) -> EmptyFusedOptimizer:
        """The update is fused into backward (the cache's own optimizer): nothing for TorchRec to step."""
        return self._fused_optimizer

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        self.cache.train(self.training)
        return self.cache(features).values()

    def enqueue_global(self, features: KeyedJaggedTensor) -> None:
        """Hand over a future global batch (every rank's samples, rank 0's first, all features): this
        kernel keeps its own features, which is what table- and column-wise input distribution will
        deliver to it for that batch."""
        index = feature_index(features, self.feature_names)
        self.cache.enqueue(features.permute([index[f] for f in self.feature_names]))

    def prefetch_distributed(self, features: KeyedJaggedTensor) -> None:
        """The next batch, after input distribution (TorchRec's prefetch pipeline): enqueued unless
        ``enqueue_global`` already did, then planned and loaded in the background."""
        if not self.cache.is_enqueued(features):
            self.cache.enqueue(features)
        self.cache.prefetch()

    def named_parameters_by_table(self):
        """No TorchRec parameters: the rows live in the cache's host tier."""
        return iter(())

    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False):
        """Nothing: TorchRec skips this kernel's tables; ``dlrm_cache.distributed.checkpoint`` saves them."""
        return {} if destination is None else destination

    def flush(self) -> None:
        self.cache.flush()

    def purge(self) -> None:
        """Nothing to drop: the cache keeps no TorchRec-side buffers."""


class CachedPooledEmbeddingsLookup(GroupedPooledEmbeddingsLookup):
    def _create_embedding_kernel(self, config, device, pg, sharding_type, env) -> BaseEmbedding:
        if config.compute_kernel == CUSTOM:
            return CachedEmbeddingKernel(config, device)
        fused = {k: v for k, v in (config.fused_params or {}).items() if k != FUSED_PARAM_KEY}
        return super()._create_embedding_kernel(
            replace(config, fused_params=fused), device, pg, sharding_type, env
        )

    def prefetch(self, sparse_features: KeyedJaggedTensor, forward_stream=None) -> None:
        super().prefetch(sparse_features, forward_stream)  # TorchRec's own caching kernels
        for kernel, features in zip(
            self._emb_modules, sparse_features.split(self._feature_splits), strict=True
        ):
            if isinstance(kernel, CachedEmbeddingKernel):
                kernel.prefetch_distributed(features)


class _CachedLookups:
    """A TorchRec pooled sharding whose lookups are ``CachedPooledEmbeddingsLookup`` (what TorchRec's
    own ``create_lookup`` builds, from the same inherited fields)."""

    def create_lookup(self, device=None, fused_params=None, feature_processor=None):
        return CachedPooledEmbeddingsLookup(
            grouped_configs=self._grouped_embedding_configs,
            pg=self._pg,
            device=device if device is not None else self._device,
            feature_processor=feature_processor,
            env=self._env,
        )


class CachedTwSharding(_CachedLookups, TwPooledEmbeddingSharding):
    pass


class CachedCwSharding(_CachedLookups, CwPooledEmbeddingSharding):
    pass


class ShardedCachedEmbeddingBagCollection(ShardedEmbeddingBagCollection):
    @classmethod
    def create_embedding_bag_sharding(
        cls, sharding_infos, env, device=None, permute_embeddings=False, qcomm_codecs_registry=None
    ):
        sharding_type = sharding_infos[0].param_sharding.sharding_type
        custom = [
            i.embedding_config.name for i in sharding_infos if i.param_sharding.compute_kernel == CUSTOM.value
        ]
        if custom and sharding_type not in SUPPORTED_SHARDING:
            raise ValueError(
                f"tables {custom}: the cache kernel supports {', '.join(SUPPORTED_SHARDING)} sharding, "
                f"not {sharding_type}"
            )
        if sharding_type == ShardingType.TABLE_WISE.value:
            return CachedTwSharding(sharding_infos, env, device, qcomm_codecs_registry=qcomm_codecs_registry)
        if sharding_type == ShardingType.COLUMN_WISE.value:
            return CachedCwSharding(
                sharding_infos,
                env,
                device,
                permute_embeddings=permute_embeddings,
                qcomm_codecs_registry=qcomm_codecs_registry,
            )
        return super().create_embedding_bag_sharding(
            sharding_infos, env, device, permute_embeddings, qcomm_codecs_registry
        )

    def reset_parameters(self) -> None:
        """TorchRec's, for the tables of other kernels: the cache initialises its own rows (and a rank
        has no placeholder for cache tables it does not hold)."""
        configs = self._embedding_bag_configs
        self._embedding_bag_configs = [
            c for c in configs if self.module_sharding_plan[c.name].compute_kernel != CUSTOM.value
        ]
        try:
            super().reset_parameters()
        finally:
            self._embedding_bag_configs = configs

    def cached_kernels(self) -> list[CachedEmbeddingKernel]:
        return [
            m for lookup in self._lookups for m in lookup.modules() if isinstance(m, CachedEmbeddingKernel)
        ]


class CachedEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """Shards an ``EmbeddingBagCollection`` (on the ``meta`` device: the cache makes the rows) with the
    cache as the kernel of every table the plan marks ``customized_kernel``."""

    def __init__(
        self,
        cache: CacheConfig,
        optimizer: SparseOptimizer,
        seed: int = 0,
        fused_params: dict[str, Any] | None = None,
        qcomm_codecs_registry=None,
        collections: dict[str, CollectionMaker] | None = None,
    ):
        spec = CacheSpec(cache, optimizer, seed, collections)
        super().__init__(
            fused_params={**(fused_params or {}), FUSED_PARAM_KEY: spec},
            qcomm_codecs_registry=qcomm_codecs_registry,
        )

    def shard(self, module, params, env, device=None, module_fqn=None) -> ShardedCachedEmbeddingBagCollection:
        return ShardedCachedEmbeddingBagCollection(
            module=module,
            table_name_to_parameter_sharding=params,
            env=env,
            fused_params=self.fused_params,
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            module_fqn=module_fqn,
        )

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return [CUSTOM.value, *super().compute_kernels(sharding_type, compute_device_type)]
