"""One rank of the hybrid sharding's module-level check (run by tests/test_hybrid.py under torchrun).

Multi-hot bags (0 to 3 ids, empty bags too), sum and mean pooling, every rank against the one-process
oracle (a ``policy=none`` ``CachedEmbeddingBagCollection`` over the whole global batch): per step the
pooled rows of this rank's samples, at the end every row of every table; and the replicated hot rows
bit-identical on all ranks. Usage: ``torchrun --nproc_per_node=N tests/hybrid_worker.py OPTIMIZER``.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_cache.cache import CachedEmbeddingBagCollection
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig, NetworkConfig
from dlrm_cache.distributed.hybrid_plan import plan_hybrid
from dlrm_cache.distributed.table_stats import TableStats

ROWS = [50, 300, 2000, 8]
HOT = {"t0": 10, "t1": 40, "t2": 0, "t3": 8}  # t2 all cold, t3 all hot
POOLING = [PoolingType.SUM, PoolingType.MEAN, PoolingType.SUM, PoolingType.MEAN]
DIM, PER_RANK, STEPS, LOOKAHEAD = 4, 6, 8, 2


def batches(world_size: int) -> list[KeyedJaggedTensor]:
    g = torch.Generator().manual_seed(7)
    out = []
    batch = PER_RANK * world_size
    for _ in range(STEPS):
        lengths = torch.randint(0, 4, (len(ROWS), batch), generator=g)
        values = torch.cat(
            [
                (r * torch.rand(int(n), generator=g) ** 3).long()
                for r, n in zip(ROWS, lengths.sum(1), strict=True)
            ]
        )  # ranked ids: small ones (hot) more often
        out.append(KeyedJaggedTensor(keys=[f"f{i}" for i in range(len(ROWS))], values=values,
                                     lengths=lengths.reshape(-1).int()))  # fmt: skip
    return out


def share(kjt: KeyedJaggedTensor, rank: int, world_size: int) -> KeyedJaggedTensor:
    from dlrm_cache.distributed.hybrid import _shares

    return _shares(kjt, world_size)[rank]


def main() -> None:
    kind = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    opt = SparseOptimizer(kind, lr=0.05 if kind != "adam" else 0.01)
    configs = [
        EmbeddingBagConfig(
            num_embeddings=r, embedding_dim=DIM, name=f"t{i}", feature_names=[f"f{i}"], pooling=p
        )
        for i, (r, p) in enumerate(zip(ROWS, POOLING, strict=True))
    ]
    oracle = CachedEmbeddingBagCollection(configs, CacheConfig(policy="none"), opt)
    stats = [TableStats(c.name, c.num_embeddings, DIM) for c in configs]
    cache = CacheConfig(ratio=0.1, full_table_rows=4, lookahead=LOOKAHEAD)
    plan = plan_hybrid(stats, world, PER_RANK * world, cache, opt, NetworkConfig(), fixed=HOT)
    from dlrm_cache.distributed.runtime import shard

    def wrapped(collection: nn.Module) -> nn.Module:  # where DLRM holds it
        model = nn.Module()
        model.sparse_arch = nn.Module()
        model.sparse_arch.embedding_bag_collection = collection
        return model

    dmp, cache_handle = shard(plan, configs, wrapped, opt, 0, torch.device("cpu"))
    hot = cache_handle.hybrid.hot
    ebc = dmp.module.sparse_arch.embedding_bag_collection
    data = batches(world)
    weights = torch.randn(PER_RANK * world, len(ROWS) * DIM, generator=torch.Generator().manual_seed(3))
    for b in data[:LOOKAHEAD]:
        cache_handle.enqueue(b)
    for step, b in enumerate(data):
        if step + LOOKAHEAD < len(data):
            cache_handle.enqueue(data[step + LOOKAHEAD])
        want = oracle(b).values()
        (want * weights).sum().div(len(weights)).backward()
        got = ebc(share(b, rank, world)).values()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(got, want.detach()[mine], atol=1e-6, rtol=1e-5, msg=f"step {step} pooled")
        (got * weights[mine]).sum().div(PER_RANK).backward()
    cache_handle.flush()
    full = {c.name: oracle.groups[[g.configs for g in oracle.groups].index(g.configs)].table_rows(t)
            for g in oracle.groups for t, c in enumerate(g.configs)}  # fmt: skip
    # replicas: every rank's hot rows, byte for byte
    block = hot.groups[0].cache.clone()
    gathered = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(gathered, block)
    assert all(torch.equal(g, block) for g in gathered), "hot replicas differ between ranks"
    for name in hot.names:
        t = hot.names.index(name)
        torch.testing.assert_close(hot.groups[0].table_rows(t), full[name][: HOT[name]], atol=1e-6, rtol=1e-5,
                                   msg=f"{name} hot rows")  # fmt: skip
    for k in cache_handle.kernels:
        for g in k.cache.groups:
            for t, c in enumerate(g.configs):
                h = k.shards[c.name].row_offset
                torch.testing.assert_close(g.table_rows(t), full[c.name][h:], atol=1e-6, rtol=1e-5,
                                           msg=f"{c.name} cold rows")  # fmt: skip
    cache_handle.close()
    dist.barrier()
    print(f"hybrid worker ok: rank {rank}, owners {plan.owners}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
