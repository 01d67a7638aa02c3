"""The model's embedding tables at run time, however they are placed: what the training loop calls.

``EmbeddingRuntime`` is one interface over two implementations, built by ``embedding_runtime`` from the
config and the dataset:

- ``LocalEmbeddings``: one process, the tables in one ``CachedEmbeddingBagCollection``.
- ``ShardedEmbeddings``: the tables sharded over the process group by the planner's plan, table-wise,
  column-wise or hybrid (``distributed.runtime.shard``), TorchRec's ``DistributedModelParallel``
  around the model; the collectives a step sends are counted.

Either gives the loop the model to call, the ids as the model takes them, the cache's lookahead queue
(``enqueue`` / ``prefetch``), the sparse learning rate, the caches' statistics, what a checkpoint
saves of the tables, and a step's mean loss over all ranks.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torchrec.datasets.utils import Batch

from dlrm_cache.cache import CachedEmbeddingBagCollection, SparseOptimizer
from dlrm_cache.config import CacheConfig, TrainRunConfig
from dlrm_cache.data.loader import ParquetBatches
from dlrm_cache.distributed.checkpoint import Collections
from dlrm_cache.distributed.comm_counter import CommCounter
from dlrm_cache.distributed.placement import Plan, fitted_cache
from dlrm_cache.distributed.runtime import ShardedCache, shard
from dlrm_cache.train.model import dlrm_model, table_configs


class EmbeddingRuntime:
    """What the training loop needs of the tables (see the module docstring)."""

    model: torch.nn.Module  # what a step calls: (dense, sparse) -> logits
    module: torch.nn.Module  # the DLRM itself (whose dense part a checkpoint saves)
    cache: CachedEmbeddingBagCollection | ShardedCache
    sharded: bool
    global_loader: ParquetBatches | None  # the global batches whose ids the cache sees ahead (None: own)

    def sparse_input(self, batch: Batch):
        """The batch's ids as the model takes them."""
        raise NotImplementedError

    def enqueue(self, global_batch: Batch) -> None:
        """A future global batch: the cache sees its ids ``cache.lookahead`` batches ahead."""
        self.cache.enqueue(global_batch.sparse_features)

    def prefetch(self) -> None:
        """Plan and load the next batch while this one computes."""
        self.cache.prefetch()

    def set_learning_rate(self, lr: float) -> None:
        self.cache.set_learning_rate(lr)

    def stats(self) -> dict:
        """The caches' counters (sharded: a collective, all ranks together)."""
        return self.cache.stats()

    def checkpoint_state(self) -> Collections:
        """The caches and where their tables sit in the full tables, for ``checkpoint.save`` / load."""
        raise NotImplementedError

    def counting(self) -> AbstractContextManager:
        """Around a training step: counts the bytes its collectives send (sharded)."""
        return nullcontext()

    def mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The global batch's mean loss, as one process would see it."""
        return loss.detach().double()

    def agree(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank (a collective, sharded)."""
        return ok

    def comm_summary(self, steps: int) -> dict | None:
        """Bytes per training step, measured and modeled (sharded); None in one process."""
        return None

    def close(self) -> None:
        self.cache.close()


class LocalEmbeddings(EmbeddingRuntime):
    sharded = False
    global_loader = None

    def __init__(self, model: torch.nn.Module, cache: CachedEmbeddingBagCollection):
        self.model = self.module = model
        self.cache = cache

    def sparse_input(self, batch: Batch):
        return batch.sparse_features  # the cache takes ids on the host

    def checkpoint_state(self) -> Collections:
        return [(self.cache, {})]


class ShardedEmbeddings(EmbeddingRuntime):
    sharded = True

    def __init__(self, model, cache: ShardedCache, plan: Plan, global_loader: ParquetBatches,
                 device: torch.device):  # fmt: skip
        self.model, self.module, self.cache = model, model.module, cache
        self.plan, self.global_loader, self.device = plan, global_loader, device
        self.world_size = dist.get_world_size()
        self.counter = CommCounter()
        self.counter.install()
        ddp = next((m for m in model.modules() if isinstance(m, DistributedDataParallel)), None)
        if ddp is not None:  # the dense part, replicated: its gradients' all-reduce is counted too
            self.counter.hook_ddp(ddp)

    def sparse_input(self, batch: Batch):
        """On the device: TorchRec's input distribution builds its splits where the ids are, and NCCL
        takes device tensors only. Hybrid: on the host, where the model splits the batch without a
        host sync (``HybridEmbeddingBagCollection.forward``)."""
        if self.cache.host_ids:
            return batch.sparse_features
        return batch.sparse_features.to(self.device, non_blocking=True)

    def checkpoint_state(self) -> Collections:
        return self.cache.collections()

    def counting(self) -> AbstractContextManager:
        return self.counter.step()

    def mean_loss(self, loss: torch.Tensor) -> torch.Tensor:
        reported = loss.detach().double()  # on the device: NCCL reduces nothing else
        dist.all_reduce(reported)
        return reported / self.world_size

    def agree(self, ok: bool) -> bool:
        flag = torch.tensor([int(ok)], device=self.device)  # NCCL reduces device tensors only
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def comm_summary(self, steps: int) -> dict:
        totals, per, predicted = self.counter.totals(), max(1, steps), self.plan.predicted
        return {
            "all_to_all_bytes_per_step": totals["all_to_all"] / per,
            "all_reduce_bytes_per_step": totals["all_reduce"] / per,
            "dense_all_reduce_bytes_per_step": totals["dense_all_reduce"] / per,
            "predicted_bytes_per_step": predicted.network,
            "predicted_all_to_all_bytes_per_step": predicted.all_to_all,
            "predicted_all_reduce_bytes_per_step": predicted.all_reduce,
            "steps_counted": steps,
        }

    def close(self) -> None:
        super().close()
        self.counter.uninstall()


def embedding_runtime(
    cfg: TrainRunConfig, root: Path, meta: dict, device: torch.device, plan: Plan | None, sharded: bool
) -> EmbeddingRuntime:
    """The run's tables: ``sharded`` over the process group by ``plan``, or in one process (sized by
    ``plan`` where one was made, for ``cache.device_budget_gb``; else fitted to the batch)."""
    if not sharded:
        cache = plan.cache if plan else fitted_cache(cfg, root)
        return LocalEmbeddings(*build_model(cfg, meta, device, cache))
    tables = table_configs(cfg.model.embedding_dim, meta["vocab_sizes"])
    optimizer = SparseOptimizer.from_config(cfg.optim)
    model, cache = shard(plan, tables, lambda ebc: _dlrm(cfg, ebc, device), optimizer, cfg.seed, device)
    # TorchRec's table- and column-wise input distribution hands every shard the ids of the whole
    # global batch, rank 0's samples first: the global batches as one process reads them.
    batches = ParquetBatches(root, "train", cfg.train.batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed)
    return ShardedEmbeddings(model, cache, plan, batches, device)


def build_model(
    cfg: TrainRunConfig, meta: dict, device: torch.device, cache: CacheConfig | None = None
) -> tuple[torch.nn.Module, CachedEmbeddingBagCollection]:
    """The unsharded model over the tables of a dataset (its ``meta``), with ``cache`` (default
    ``cfg.cache``) as its cache settings."""
    tables = table_configs(cfg.model.embedding_dim, meta["vocab_sizes"])
    optimizer = SparseOptimizer.from_config(cfg.optim)
    ebc = CachedEmbeddingBagCollection(tables, cache or cfg.cache, optimizer, device, seed=cfg.seed)
    return _dlrm(cfg, ebc, device), ebc


def _dlrm(cfg: TrainRunConfig, ebc: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # dense init, the same on every rank
    return dlrm_model(cfg.model, ebc, device)
