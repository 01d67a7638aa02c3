"""The sharded model at run time: process group, ``DistributedModelParallel`` with the cache sharder and
the planner's plan, and ``ShardedCache``, the trainer's handle on this rank's caches."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_cache.cache.collection import merge_stats
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig
from dlrm_cache.distributed.hot_rows import HotRows
from dlrm_cache.distributed.hybrid import HybridEmbeddingBagCollection, HybridLayout
from dlrm_cache.distributed.hybrid_plan import HybridPlan
from dlrm_cache.distributed.planner import CachePlan
from dlrm_cache.distributed.rank import Rank, current_rank
from dlrm_cache.distributed.sharder import CachedEmbeddingBagCollectionSharder, CachedEmbeddingKernel

SPARSE_ARCH = "sparse_arch"  # TorchRec's DLRM / DLRM_DCN: the child that holds the tables ...
EBC_FQN = f"{SPARSE_ARCH}.embedding_bag_collection"  # ... in this module
COLD_FQN = f"{EBC_FQN}.cold"  # a HybridEmbeddingBagCollection's cold tables


def init_process_group(device: torch.device, rank: Rank, timeout_min: float = 10.0) -> None:
    """gloo on CPU, NCCL on CUDA; a single process outside torchrun gets a group of one (in-memory
    store). A collective waiting longer than ``timeout_min`` minutes fails instead of hanging."""
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(minutes=timeout_min)
    if rank.world_size == 1 and "MASTER_ADDR" not in os.environ:
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timeout)
        return
    if device.type == "cuda":  # device_id: NCCL's communicator made now, eagerly, on this rank's GPU
        dist.init_process_group("nccl", rank=rank.rank, world_size=rank.world_size, timeout=timeout,
                                device_id=device)  # fmt: skip
        return
    dist.init_process_group("gloo", rank=rank.rank, world_size=rank.world_size, timeout=timeout)


class ShardedCache:
    """This rank's cache kernels, with the interface the trainer uses on an unsharded
    ``CachedEmbeddingBagCollection``."""

    host_ids = False  # the model takes a batch's ids on the device (TorchRec's input distribution)

    def __init__(self, kernels: list[CachedEmbeddingKernel], cache_config: CacheConfig):
        self.kernels = kernels
        self.cache_config = cache_config

    def enqueue(self, global_features: KeyedJaggedTensor) -> None:
        """A future global batch (``world_size=1`` loader order: rank 0's samples first)."""
        for k in self.kernels:
            k.enqueue_global(global_features)

    def prefetch(self) -> None:
        for k in self.kernels:
            k.cache.prefetch()

    def set_learning_rate(self, lr: float) -> None:
        for k in self.kernels:
            k.cache.set_learning_rate(lr)

    def flush(self) -> None:
        for k in self.kernels:
            k.cache.flush()

    def close(self) -> None:
        for k in self.kernels:
            k.cache.close()

    def collections(self):
        return [(k.cache, k.shards) for k in self.kernels]

    def stats(self) -> dict:
        """Every rank's cache counters together (a collective: every rank calls it)."""
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [k.cache.stats() for k in self.kernels])
        return merge_stats([s for rank_stats in gathered for s in rank_stats], self.cache_config)


class HybridCache(ShardedCache):
    """The hybrid sharding's caches (over the cold rows) and its replicated hot rows."""

    host_ids = True  # the model splits a batch on the host, then sends its parts to the device

    def __init__(self, kernels: list[CachedEmbeddingKernel], hybrid: HybridEmbeddingBagCollection,
                 cache_config: CacheConfig):  # fmt: skip
        super().__init__(kernels, cache_config)
        self.hybrid = hybrid

    def enqueue(self, global_features: KeyedJaggedTensor) -> None:
        """A future global batch: the hot rows it touches, and its cold features as each owner will
        receive them."""
        if self.hybrid.hot.groups:
            self.hybrid.hot.enqueue(self.hybrid.layout.touched_hot_rows(global_features))
        if self.kernels:
            cold = self.hybrid.layout.global_cold(global_features, dist.get_world_size())
            super().enqueue(cold)

    def set_learning_rate(self, lr: float) -> None:
        super().set_learning_rate(lr)
        self.hybrid.hot.set_learning_rate(lr)

    def close(self) -> None:
        super().close()
        self.hybrid.hot.close()

    def collections(self):
        """The cold caches, then the hot rows (written by rank 0 alone: they are the same on every rank)."""
        return [*super().collections(), (self.hybrid.hot, self.hybrid.hot.shards)]


def shard(
    plan: CachePlan | HybridPlan,
    configs: list[EmbeddingBagConfig],
    make_model: Callable[[torch.nn.Module], torch.nn.Module],
    optimizer: SparseOptimizer,
    seed: int,
    device: torch.device,
) -> tuple[DistributedModelParallel, ShardedCache]:
    """The model ``make_model`` builds over an embedding collection of ``configs``, its tables sharded
    over the process group by ``plan`` with the cache as their kernel (collective: every rank calls it).
    Table- and column-wise: TorchRec shards the collection itself; hybrid: the hot rows are replicated
    (``HotRows``) and TorchRec shards the cold tables, ``HybridEmbeddingBagCollection.cold``."""
    local = current_rank().local_world_size  # ranks per node: TorchRec's topology for several nodes
    if isinstance(plan, HybridPlan):
        hot_group = dist.new_group()
        # its communicator made now, not at the first all-reduce inside a backward pass while other
        # collectives are in flight (a known NCCL deadlock pattern)
        dist.all_reduce(torch.zeros(1, device=device), group=hot_group)
        hot = HotRows(configs, plan.hot_rows, optimizer, device, seed=seed, group=hot_group)
        at = {name: hot.row_offset(name) for name in hot.names}
        layout = HybridLayout(configs, plan.hot_rows, plan.owners, at)
        sharder = CachedEmbeddingBagCollectionSharder(
            plan.cache, optimizer, seed=seed, collections=layout.cold_collections
        )
        model = make_model(HybridEmbeddingBagCollection(configs, layout, hot))
        hybrid = model.get_submodule(EBC_FQN)
        module_plans = {}
        if hybrid.cold is not None:
            module_plans[COLD_FQN] = plan.torchrec_plan(hybrid.cold, sharder, local, device_type=device.type)
        dmp = _distributed(model, module_plans, sharder, device)
        hybrid = dmp.module.get_submodule(EBC_FQN)
        kernels = hybrid.cold.cached_kernels() if hybrid.cold is not None else []
        return dmp, HybridCache(kernels, hybrid, plan.cache)
    sharder = CachedEmbeddingBagCollectionSharder(plan.cache, optimizer, seed=seed)
    model = make_model(EmbeddingBagCollection(configs, device=torch.device("meta")))
    ebc = model.get_submodule(EBC_FQN)
    dmp = _distributed(
        model, {EBC_FQN: plan.torchrec_plan(ebc, sharder, local, device_type=device.type)}, sharder, device
    )
    return dmp, ShardedCache(dmp.module.get_submodule(EBC_FQN).cached_kernels(), plan.cache)


def _distributed(model, module_plans: dict, sharder, device: torch.device) -> DistributedModelParallel:
    """``DistributedModelParallel`` over the whole process group, the modules of ``module_plans``
    sharded by ``sharder``, the rest data-parallel."""
    env = ShardingEnv.from_process_group(dist.group.WORLD)
    return DistributedModelParallel(
        model, env=env, device=device, plan=ShardingPlan(module_plans), sharders=[sharder]
    )
