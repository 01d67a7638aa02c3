"""The hot rows of the hybrid sharding: rows ``[0, H_t)`` of each table, replicated on every rank.

``dlrm-preprocess`` numbers ids by frequency, so a table's hot rows are its first ``H_t``. Every rank
keeps the same copy (one resident ``TableGroup``: weight and optimizer state on the device) and serves
its own samples' hot lookups from it; nothing of the lookup crosses the network. In backward each rank
adds its samples' gradients into one dense ``(sum H_t, D)`` buffer (plus, for Adam, a column counting
the lookups of each row), the buffer is all-reduced, and every rank applies the same fused update to
the rows the global batch touched, from the same bytes: the replicas stay bit-identical.

Why a dense all-reduce rather than only the touched rows: the planner makes a row hot only when its
expected lookups per global batch pay for its share of the all-reduce, so at its split most hot rows
are touched every step, and the sparse alternative (each rank's touched ids and rows, all-gathered)
would send ids besides the rows, every rank's copy of a row every other rank also touched, and one
more round trip for the sizes; ``comm_model.sparse_sync_bytes`` gives its figure beside the dense one.

Adam is lazy (``torch.optim.SparseAdam``): a row the global batch did not touch keeps its moments, so
the touched rows must be known exactly, hence the count column. SGD and row-wise Adagrad leave a row
with a zero gradient unchanged, so they need none.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from dlrm_cache.cache.group import TableGroup
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
        self.groups = [TableGroup(configs, rows, "none", optimizer, device, seed=seed, shards=shards)]
        self._offsets = dict(zip(self.names, self.groups[0].row_offsets, strict=False))

    @property
    def dim(self) -> int:
        return self.groups[0].dim

    def row_offset(self, table: str) -> int:
        """Where ``table``'s hot rows start in the replicated block."""
        return self._offsets[table]

    def pooled(self, ids: torch.Tensor, offsets: torch.Tensor, bags: int) -> torch.Tensor:
        """Sum-pooled ``(bags, D)`` hot embeddings: ``ids`` (rows of the block) in bag order, ``offsets``
        their ``bags + 1`` bag offsets; backward all-reduces the gradients and updates the rows."""
        trigger = torch.empty(0, requires_grad=True)
        return _HotLookup.apply(trigger, self, ids, offsets, bags)

    @torch.no_grad()
    def update(self, ids: torch.Tensor, offsets: torch.Tensor, grad_bags: torch.Tensor) -> None:
        """The synchronous fused update: every rank's gradients summed, divided by the number of ranks
        (each rank's loss is the mean over its share of the global batch), applied to the touched rows."""
        g = self.groups[0]
        width = self.dim + (1 if self.optimizer.kind == "adam" else 0)
        buffer = torch.zeros(g.row_offsets[-1], width, device=self.device)
        lengths = offsets[1:] - offsets[:-1]
        bag_of_id = torch.repeat_interleave(
            torch.arange(len(lengths), device=self.device), lengths, output_size=len(ids)
        )
        per_id = grad_bags.index_select(0, bag_of_id)
        buffer[:, : self.dim].index_add_(0, ids, per_id)
        if width > self.dim:
            buffer[:, self.dim].index_add_(0, ids, torch.ones(len(ids), device=self.device))
        world = 1
        if dist.is_initialized() and dist.get_world_size(self.process_group) > 1:
            dist.all_reduce(buffer, group=self.process_group)
            world = dist.get_world_size(self.process_group)
        self.optimizer_step += 1
        touched = (
            torch.nonzero(buffer[:, self.dim] > 0).squeeze(1)
            if width > self.dim
            else torch.nonzero(buffer[:, : self.dim].abs().sum(dim=1) > 0).squeeze(1)
        )
        if not touched.numel():
            return
        grad = buffer.index_select(0, touched)[:, : self.dim]
        if world > 1:
            grad /= world
        rows = g.cache.index_select(0, touched)
        self.optimizer.update(rows, grad, self.optimizer_step)
        g.cache.index_copy_(0, touched, rows)

    def set_learning_rate(self, lr: float) -> None:
        self.optimizer = replace(self.optimizer, lr=lr)
        for g in self.groups:
            g.optimizer = self.optimizer

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
    def forward(ctx, trigger, hot: HotRows, ids, offsets, bags):
        ctx.hot, ctx.ids, ctx.offsets = hot, ids, offsets
        weight = hot.groups[0].cache[:, : hot.dim]
        if weight.stride(0) != hot.dim:  # optimizer state beside the weight
            weight = weight.contiguous()
        return F.embedding_bag(ids, weight, offsets, mode="sum", include_last_offset=True).view(bags, hot.dim)

    @staticmethod
    def backward(ctx, grad):
        ctx.hot.update(ctx.ids, ctx.offsets, grad.contiguous())
        return None, None, None, None, None
