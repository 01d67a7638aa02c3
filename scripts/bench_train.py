"""dlrm-train throughput on CPU: ``policy=none`` against ``lookahead`` at 1.5%, on the same data in
one run, and the loader alone (it must never be the bottleneck: >= 3x the training rate).

    .venv/bin/python scripts/bench_train.py [--rows 400000 --scale 0.1 --batch 2048]
    .venv/bin/python scripts/bench_train.py --multi-hot pareto --rows 200000 --scale 0.005 --repeats 2

``--multi-hot uniform|pareto``: Criteo 1TB's profile instead of Kaggle's, hashed to MLPerf's 40M cap
(scaled) and expanded to MLPerf's bags (214 ids a sample). ``--repeats``: the two runs alternate, so
that the machine's drift falls on both.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from dlrm_cache.config import (
    MULTI_HOT_MLPERF,
    CacheConfig,
    DataConfig,
    PreprocessOptions,
    TrainLoopConfig,
    TrainRunConfig,
)
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.loader import ParquetBatches
from dlrm_cache.train.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--scale", type=float, default=0.1, help="cardinality scale of the generated data")
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--multi-hot", choices=("uniform", "pareto"))
    ap.add_argument("--repeats", type=int, default=1, help="runs of each, alternating")
    args = ap.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        if args.multi_hot:
            options = PreprocessOptions(max_ind_range=round(40_000_000 * args.scale),
                                        multi_hot_sizes=list(MULTI_HOT_MLPERF),
                                        multi_hot_distribution=args.multi_hot)  # fmt: skip
            root = synthetic_dataset(tmp, args.rows, args.scale, progress=False, cardinalities="terabyte",
                                     options=options)  # fmt: skip
        else:
            root = synthetic_dataset(tmp, args.rows, args.scale, progress=False)
        loader = ParquetBatches(root, "train", args.batch)
        t0 = time.perf_counter()
        n = sum(len(b.labels) for b in loader.batches(0))
        loader_rate = n / (time.perf_counter() - t0)
        ids = sum(len(b.sparse_features.values()) for b in loader.batches(0)) / n
        print(f"data: {args.rows:,} rows, cardinality scale {args.scale}; train split {n:,} rows", end=", ")
        print(f"{ids:.0f} ids a row")
        print(f"loader alone          {loader_rate:>10,.0f} samples/s")
        base = TrainRunConfig(
            data=DataConfig(path=str(root)), train=TrainLoopConfig(batch_size=args.batch, log_every=1000)
        )
        runs = [("policy=none", CacheConfig(policy="none")), ("lookahead 1.5%", CacheConfig(ratio=0.015))]
        for i, (name, cache) in enumerate(runs * args.repeats):
            s = train(replace(base, cache=cache), tmp / f"{i}-{name.replace(' ', '_')}")
            rate = s["train_samples_per_s"]
            hit = s["cache"]["hit_rate_unique"]
            print(f"{name:20s}  {rate:>10,.0f} samples/s  loader/train {loader_rate / rate:5.1f}x", end="  ")
            print(f"test AUC {s['test_auc']:.4f}  unique hit rate {hit:.3f}")


if __name__ == "__main__":
    main()
