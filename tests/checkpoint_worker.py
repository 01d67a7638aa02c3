"""One rank of ``test_gpu_path.py``'s checkpoint test: every rank saves; rank ``FAILING`` cannot write
its pieces. Prints what this rank raised and how long it took. Usage:
``torchrun --nproc_per_node=N tests/checkpoint_worker.py RUN_DIR FAILING``."""

import datetime
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from dlrm_cache.cache import CachedEmbeddingBagCollection, SparseOptimizer
from dlrm_cache.config import CacheConfig
from dlrm_cache.distributed import checkpoint as ckpt


def main() -> None:
    run_dir, failing = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    table = EmbeddingBagConfig(num_embeddings=1000, embedding_dim=4, name=f"t{rank}", feature_names=["f"])
    ebc = CachedEmbeddingBagCollection([table], CacheConfig(ratio=0.1), SparseOptimizer())

    def agree(ok: bool) -> bool:
        flag = torch.tensor([int(ok)])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def meta() -> dict:
        return {"step": 1}

    ckpt.save(run_dir, rank, world, [(ebc, {})], meta, agree)  # a whole first checkpoint
    if rank == failing:

        def no_room(*args, **kwargs):
            raise OSError(
                28, "No space left on device", str(run_dir / "checkpoint.new" / f"rank{rank}.t.f32")
            )

        ckpt.write_embeddings = no_room
    start = time.monotonic()
    try:
        ckpt.save(run_dir, rank, world, [(ebc, {})], meta, agree)
        print(f"rank {rank}: saved")
    except OSError as e:
        print(f"rank {rank}: raised after {time.monotonic() - start:.1f} s: {e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
