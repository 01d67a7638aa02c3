"""The hot rows of the hybrid sharding: rows ``[0, H_t)`` of each table, replicated on every rank.

``dlrm-preprocess`` numbers ids by frequency, so a table's hot rows are its first ``H_t``. Every rank
keeps the same copy (one resident ``TableGroup``: weight and optimizer state on the device) and serves
its own samples' hot lookups from it; nothing of the lookup crosses the network. In backward the ranks
all-reduce the gradients of the rows the global batch touched, and every rank applies the same fused
update to them from the same bytes: the replicas stay bit-identical, and lazy Adam
(``torch.optim.SparseAdam``: an untouched row keeps its moments) is exact.

Which rows the global batch touched is known on the host before the step: every rank sees the global
batches ahead (the lookahead), and ``HybridCache.enqueue`` hands their touched hot rows here
(``enqueue``; sorted). No collective agrees on them and no host sync finds them; the gradient sent is
``D`` floats a touched row, never more than a dense all-reduce of all ``sum H_t`` rows and much less when
a step leaves hot rows untouched (``comm_model.hot_sync_bytes`` and ``dense_sync_bytes``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from dlrm_cache.cache.group import GroupSettings, TableGroup
from dlrm_cache.cache.host import TableShard
from dlrm_cache.cache.optim import SparseOptimizer


class HotRows:
    """Replicated rows ``[0, hot_rows[t])`` of ``tables`` (full-size configs, one embedding dim).

    Also what a checkpoint reads and writes like a cache collection (``groups``, ``flush``,
    ``optimizer``, ``optimizer_step``, ``restored``; ``shards``: where its rows sit in the full
    tables); ``replicated``: every rank holds the same, rank 0 writes it."""

    replicated = True

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        hot_rows: dict[str, int],
        optimizer: SparseOptimizer,
        device: torch.device,
        seed: int = 0,
        group: dist.ProcessGroup | None = None,
    ):
        hot = [t for t in tables if hot_rows.get(t.name, 0) > 0]
        self.names = [t.name for t in hot]
        self.optimizer = optimizer
        self.device = device
        self.process_group = group
        self.optimizer_step = 0
        self._touched: deque[torch.Tensor] = deque()  # per future global batch: its hot rows (sorted)
        self.groups: list[TableGroup] = []
        self.shards: dict[str, TableShard] = {}
        self._offsets: dict[str, int] = {}
        if not hot:
            return
        configs = [
            EmbeddingBagConfig(
                num_embeddings=hot_rows[t.name],
                embedding_dim=t.embedding_dim,
                name=t.name,
                feature_names=list(t.feature_names),
                pooling=PoolingType.SUM,
                init_fn=t.init_fn,
            )
            for t in hot
        ]
        shards = [TableShard(0, 0, t.num_embeddings, t.embedding_dim) for t in hot]
        self.shards = dict(zip(self.names, shards, strict=True))
        rows = [c.num_embeddings for c in configs]
        settings = GroupSettings(rows, "none", optimizer, device, seed=seed, shards=shards)
        self.groups = [TableGroup(configs, settings)]
        self._offsets = dict(zip(self.names, self.groups[0].layout.row_offsets, strict=False))

    @property
    def dim(self) -> int:
        return self.groups[0].dim

    def row_offset(self, table: str) -> int:
        """Where ``table``'s hot rows start in the replicated block."""
        return self._offsets[table]

    def enqueue(self, touched: torch.Tensor) -> None:
        """The hot rows (of the replicated block, sorted, on the host) that a future global batch
        touches: one call per training batch, in training order."""
        self._touched.append(touched)

    def next_touched(self) -> torch.Tensor:
        """The hot rows the global batch of the training step about to run touches (``enqueue``)."""
        if not self._touched:
            raise RuntimeError(
                "a training step of the hot rows without its global batch: hand every training batch to "
                "the cache's enqueue() before its step (the trainer's lookahead does)"
            )
        return self._touched.popleft()

    def pooled(self, ids: torch.Tensor, offsets: torch.Tensor, bags: int,
               touched: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:  # fmt: skip
        """Sum-pooled ``(bags, D)`` hot embeddings: ``ids`` (rows of the block) in bag order, ``offsets``
        their ``bags + 1`` bag offsets; for training, ``touched``: the rows the global batch touches
        and where each of ``ids`` sits among them (on the device), and backward all-reduces those
        rows' gradients and updates them."""
        trigger = torch.empty(0, requires_grad=touched is not None)
        return _HotLookup.apply(trigger, self, ids, offsets, bags, touched)

    @torch.no_grad()
    def update(self, ids: torch.Tensor, offsets: torch.Tensor, grad_bags: torch.Tensor,
               touched: tuple[torch.Tensor, torch.Tensor]) -> None:  # fmt: skip
        """The synchronous fused update of the rows the global batch touched (``touched``: those rows
        and each id's place among them): their gradients, summed over ranks and divided by the number
        of ranks (each rank's loss is the mean over its share of the global batch)."""
        g = self.groups[0]
        rows, position = touched
        self.optimizer_step += 1
        if not len(rows):
            return
        lengths = offsets[1:] - offsets[:-1]
        bag_of_id = torch.repeat_interleave(
            torch.arange(len(lengths), device=self.device), lengths, output_size=len(ids)
        )
        grad = torch.zeros(len(rows), self.dim, device=self.device)
        grad.index_add_(0, position, grad_bags.index_select(0, bag_of_id))
        world = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(grad, group=self.process_group)
            grad /= world
        values = g.cache.index_select(0, rows)
        self.optimizer.update(values, grad, self.optimizer_step)
        g.cache.index_copy_(0, rows, values)

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer = replace(self.optimizer, lr=lr)
        for g in self.groups:
            g.set_learning_rate(lr)

    def flush(self) -> None:
        """Nothing to write back: the rows live on the device only."""

    def restored(self, optimizer_step: int) -> None:
        """After a checkpoint wrote the rows in place: continue from ``optimizer_step`` updates."""
        self.optimizer_step = optimizer_step

    def close(self) -> None:
        for g in self.groups:
            g.close()


class _HotLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, trigger, hot: HotRows, ids, offsets, bags, touched):
        ctx.hot, ctx.ids, ctx.offsets, ctx.touched = hot, ids, offsets, touched
        weight = hot.groups[0].cache[:, : hot.dim]
        if weight.stride(0) != hot.dim:  # optimizer state beside the weight
            weight = weight.contiguous()
        return F.embedding_bag(ids, weight, offsets, mode="sum", include_last_offset=True).view(bags, hot.dim)

    @staticmethod
    def backward(ctx, grad):
        ctx.hot.update(ctx.ids, ctx.offsets, grad.contiguous(), ctx.touched)
        return None, None, None, None, None, None
