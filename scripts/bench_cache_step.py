"""CPU cost of one training step of the 26-table cached collection against the same step with every
table held whole (``policy=none``), and the bookkeeping cost as the cache doubles.

    .venv/bin/python scripts/bench_cache_step.py [--scale 1.0 --dim 64 --batch 2048 --steps 200]

A step is forward + backward + fused row-wise Adagrad update of the embedding collection alone (no
MLPs), on a Zipf(1.05) id trace over the Criteo Kaggle cardinalities times ``--scale``, driven as the
trainer drives it (ids enqueued ``--lookahead`` batches ahead, next batch prefetched during the step).
The collections are built one at a time, so peak memory is one copy of the tables.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time

import torch
from cache_trace import kaggle_tables, to_kjt, zipf_trace

from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig


def time_steps(ebc, kjts, warm: int, lookahead: int) -> float:
    """Seconds per step over kjts[warm:], after `warm` untimed steps."""
    weights = None
    for k in kjts[:lookahead]:
        ebc.enqueue(k)
    t0 = 0.0
    for i, kjt in enumerate(kjts):
        if i == warm:
            t0 = time.perf_counter()
        if i + lookahead < len(kjts):
            ebc.enqueue(kjts[i + lookahead])
        out = ebc(kjt).values()
        if weights is None:
            weights = torch.randn(out.shape)
        ebc.prefetch()
        (out * weights).sum().backward()
    return (time.perf_counter() - t0) / (len(kjts) - warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--lookahead", type=int, default=256)
    ap.add_argument("--ratios", default="0.015,0.03")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tables = kaggle_tables(args.dim, args.scale)
    kjts = [
        to_kjt(ids, tables) for ids in zipf_trace(tables, args.warm + args.steps, args.batch, 1.05, seed=1)
    ]
    opt = SparseOptimizer("adagrad", lr=0.01)
    rows = sum(t.num_embeddings for t in tables)
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {rows:,} rows", end=", ")
    print(f"dim {args.dim}, batch {args.batch}, {args.steps} timed steps")
    ebc = CachedEmbeddingBagCollection(tables, CacheConfig(policy="none"), opt)
    base = time_steps(ebc, kjts, args.warm, args.lookahead)
    print(f"policy=none          {base * 1e3:8.2f} ms/step")
    del ebc
    gc.collect()
    for ratio in [float(r) for r in args.ratios.split(",")]:
        ebc = CachedEmbeddingBagCollection(
            tables, CacheConfig(policy="lookahead", ratio=ratio, lookahead=args.lookahead), opt
        )
        before = ebc.stats()
        step = time_steps(ebc, kjts, args.warm, args.lookahead)
        s = ebc.stats()
        steps = args.warm + args.steps
        loaded = (s["rows_loaded"] - before["rows_loaded"]) / steps
        book = s["bookkeeping_s"] / steps
        print(f"lookahead ratio={ratio:<6} {step * 1e3:8.2f} ms/step = {step / base:.3f}x none", end="; ")
        print(f"bookkeeping {book * 1e3:.2f} ms/step, {loaded:,.0f} rows loaded/step", end=", ")
        print(f"{book / max(loaded, 1) * 1e6:.2f} us/loaded row")
        del ebc
        gc.collect()


if __name__ == "__main__":
    main()
