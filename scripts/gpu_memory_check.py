"""Part of scripts/gpu_check.sh: warm-up and flush of a ~3 GB fully dirty cache on CUDA take at most a
chunk (``host.CHUNK_BYTES``) or two of extra device memory and pinned staging. Plain PyTorch: the cache
core only. Prints one line of figures, exits non-zero past the bound.

    python scripts/gpu_memory_check.py [--rows 16000000] [--dim 64]
"""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import torch

from dlrm_cache.cache.group import GroupSettings, TableGroup
from dlrm_cache.cache.host import CHUNK_BYTES
from dlrm_cache.cache.optim import SparseOptimizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16_000_000)  # 4 GB of host rows, a 3 GB cache
    ap.add_argument("--dim", type=int, default=64)
    args = ap.parse_args()
    device = torch.device("cuda")
    table = SimpleNamespace(name="t", num_embeddings=args.rows, embedding_dim=args.dim, feature_names=["f"],
                            pooling="SUM", init_fn=None)  # fmt: skip
    slots = args.rows * 3 // 4
    settings = GroupSettings([slots], "lookahead", SparseOptimizer(), device, warmup_ratio=1.0)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    g = TableGroup([table], settings)
    torch.cuda.synchronize(device)
    cache_bytes = (slots + 1) * args.dim * 4  # the slots and the scratch row
    warm_up = torch.cuda.max_memory_allocated(device) - base - cache_bytes
    g.state.dirty[:] = g.state.slot_to_row >= 0  # every cached row written since
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    g.flush()
    torch.cuda.synchronize(device)
    flush = torch.cuda.max_memory_allocated(device) - before
    pinned = g.mover.transfers.staged_bytes()
    mb = 2**20
    print(f"cache {cache_bytes / mb:,.0f} MB: extra device memory warm-up {warm_up / mb:,.1f} MB, "
          f"flush {flush / mb:,.1f} MB; pinned staging {pinned / mb:,.1f} MB "
          f"(bound: {2 * CHUNK_BYTES / mb:,.0f} MB each)")  # fmt: skip
    g.close()
    return 0 if max(warm_up, flush, pinned) <= 2 * CHUNK_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
