"""One embedding step of the 26 Criteo Kaggle tables on a device (CUDA when present), cached at
``--ratio`` against every table held whole on the device (``policy=none``).

    PYTHONPATH=. python scripts/bench_cache_device.py [--device cuda --dim 64 --batch 2048 --steps 200]

Drives the cache core (``dlrm_cache.cache.group.TableGroup``) directly, so it needs only torch and
numpy: no torchrec, no fbgemm (neither can travel to a lent GPU machine). A step = plan (host
bookkeeping, loads), gather + pool (forward), the row gradients of a fixed upstream gradient and the
fused row-wise Adagrad update (backward); the same for both runs. Ids: Zipf(1.05) over the Kaggle
cardinalities times ``--scale``, handed to the cache ``--lookahead`` batches ahead. The plans come
from the C++ planner where the machine's compiler builds it, as in training (``--planner``; ``auto``
falls back to the Python planner with a warning). Target (issue): cached throughput >= 0.9x the
all-on-device throughput.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import deque

import numpy as np
import torch

from dlrm_cache.cache import native
from dlrm_cache.cache.group import TableGroup
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.cache.table import TableSpec
from dlrm_cache.criteo import CAT_COLUMNS, KAGGLE_CARDINALITIES
from dlrm_cache.data.zipf import ZipfSampler


def run(policy: str, args, trace: list[np.ndarray], device: torch.device) -> tuple[float, dict]:
    tables = [
        TableSpec(f"t_{f}", max(1, round(n * args.scale)), args.dim, [f])
        for f, n in zip(CAT_COLUMNS, KAGGLE_CARDINALITIES, strict=True)
    ]
    caps = [
        t.num_embeddings
        if policy == "none" or t.num_embeddings <= 10_000
        else max(1, round(args.ratio * t.num_embeddings))
        for t in tables
    ]
    opt = SparseOptimizer("adagrad", lr=0.01)
    planner = native.resolve(args.planner)
    g = TableGroup(tables, caps, policy, opt, device, warmup_ratio=0.7, planner=planner)
    offsets = g.feature_row_offset.numpy()[:, None]
    bags = torch.arange(args.batch * len(tables) + 1, dtype=torch.int64)
    lookups = torch.full((len(tables),), args.batch, dtype=torch.int64)

    def prepare(ids: np.ndarray):
        global_ids = torch.from_numpy(np.ascontiguousarray((ids + offsets).T).reshape(-1))  # sample-major
        p = g.prepare(global_ids, bags, args.batch, lookups)
        g.register_future(p)
        return p

    grad = torch.randn(args.batch, len(tables) * args.dim, device=device)
    ahead = deque(prepare(ids) for ids in trace[: args.lookahead])
    t0 = 0.0
    for step, _ in enumerate(trace, start=1):
        if step == args.warm + 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        if step - 1 + args.lookahead < len(trace):
            ahead.append(prepare(trace[step - 1 + args.lookahead]))
        plan = g.plan(ahead.popleft(), step, g.pin_floor(step))
        g.begin_step(plan)
        g.pool(plan, plan.rows)
        g.apply_gradients(plan, grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / (len(trace) - args.warm)
    stats = {
        "loaded": int(g.stats.loaded.sum()),
        "touched": int(g.stats.touched.sum()),
        "book": g.stats.bookkeeping_s,
    }
    g.close()
    return seconds, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--ratio", type=float, default=0.015)
    ap.add_argument("--lookahead", type=int, default=256)
    ap.add_argument(
        "--planner", default="auto", help="cache.planner: auto (C++ where it builds), native, python"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, dim {args.dim}, batch {args.batch}, scale {args.scale}")
    rng = np.random.default_rng(1)
    samplers = [ZipfSampler(max(1, round(n * args.scale)), 1.05) for n in KAGGLE_CARDINALITIES]
    trace = [np.stack([s.sample(rng, args.batch) for s in samplers]) for _ in range(args.warm + args.steps)]
    results = {}
    for policy in ("none", "lookahead"):
        results[policy] = run(policy, args, trace, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results["none"][0]
    for policy, (secs, s) in results.items():
        hit = 1 - s["loaded"] / max(s["touched"], 1)
        print(
            f"{policy:10s} {secs * 1e3:8.2f} ms/step {1 / secs:8.1f} it/s  {base / secs:5.2f}x none", end="  "
        )
        print(
            f"unique hit rate {hit:.3f}, bookkeeping {s['book'] / (args.warm + args.steps) * 1e3:.2f} ms/step"
        )


if __name__ == "__main__":
    main()
