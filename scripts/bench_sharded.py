"""The sharded path on CPU: one unsharded process, the sharded path in one process, and 2 gloo processes
under torchrun, on the same data; samples/s and where a step's time goes.

    .venv/bin/python scripts/bench_sharded.py [--rows 400000 --scale 0.1 --batch 4096 --steps 60]

The phases of a sharded step are timed by wrapping the sharded module's own stages (each one waited
for on the spot, which on CPU/gloo overlaps nothing anyway): input dist (the ids' all-to-all), lookup
(the cache kernels' forward, including any wait for the background plan), output dist (the pooled
embeddings' all-to-all), backward (dense and the gradients' all-to-all, with the fused sparse update),
and the rest (dense forward, loss, dense optimizer). Cache bookkeeping runs on its own thread: its busy
time is reported beside. Rates are global samples/s (all ranks together).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from dlrm_cache.config import (
    CacheConfig,
    DataConfig,
    TrainerConfig,
    TrainLoopConfig,
    TrainRunConfig,
)
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.loader import ParquetBatches, load_metadata

PHASES = ("input_dist", "lookup", "output_dist", "backward", "rest")


class _Ready:
    """An awaitable that is already done (stands in for TorchRec's, after a timed wait)."""

    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


def _timed(times: dict, phase: str, fn, force_wait: int = 0):
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        for _ in range(force_wait):
            out = out.wait()
        times[phase] += time.perf_counter() - t0
        for _ in range(force_wait):
            out = _Ready(out)
        return out

    return run


def worker(args) -> None:
    from dlrm_cache.distributed.placement import plan_tables
    from dlrm_cache.distributed.rank import current_rank
    from dlrm_cache.distributed.runtime import EBC_FQN, init_process_group
    from dlrm_cache.train.embeddings import embedding_runtime
    from dlrm_cache.train.train_state import dense_optimizer

    rank = current_rank()
    sharded = args.mode != "unsharded"
    root = Path(args.data)
    cfg = TrainRunConfig(
        data=DataConfig(path=str(root)),
        cache=CacheConfig(ratio=0.015),
        train=TrainLoopConfig(batch_size=args.batch),
        trainer=TrainerConfig(sharded=sharded),
    )
    meta = load_metadata(root)
    device = torch.device("cpu")
    times: dict[str, float] = defaultdict(float)
    if sharded:
        init_process_group(device, rank)
        runtime = embedding_runtime(cfg, root, meta, device, plan_tables(cfg, root, rank.world_size), True)
        model, cache = runtime.model, runtime.cache
        sm = model.module.get_submodule(EBC_FQN)
        sm.input_dist = _timed(times, "input_dist", sm.input_dist, force_wait=2)
        for lookup in sm._lookups:
            lookup.forward = _timed(times, "lookup", lookup.forward)
        for od in sm._output_dists:
            od.forward = _timed(times, "output_dist", od.forward, force_wait=1)
    else:
        runtime = embedding_runtime(cfg, root, meta, device, None, False)
        model, cache = runtime.model, runtime.cache
    opt = dense_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    local = ParquetBatches(root, "train", args.batch, rank=rank.rank, world_size=rank.world_size)
    future = ParquetBatches(root, "train", args.batch)
    batches = list(zip(local.batches(0), future.batches(0), strict=True))[: args.warmup + args.steps]
    for _, g in batches[: cfg.cache.lookahead]:
        cache.enqueue(g.sparse_features)
    t_start = bookkeeping0 = None
    for i, (b, _) in enumerate(batches):
        if i == args.warmup:
            times.clear()
            bookkeeping0 = cache.stats()["bookkeeping_s"]
            t_start = time.perf_counter()
        if i + cfg.cache.lookahead < len(batches):
            cache.enqueue(batches[i + cfg.cache.lookahead][1].sparse_features)
        logits = model(b.dense_features, b.sparse_features).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, b.labels)
        cache.prefetch()
        opt.zero_grad()
        t0 = time.perf_counter()
        loss.backward()
        times["backward"] += time.perf_counter() - t0
        opt.step()
    total = time.perf_counter() - t_start
    bookkeeping = cache.stats()["bookkeeping_s"] - bookkeeping0
    times["rest"] = total - sum(times[p] for p in PHASES if p != "rest")
    result = {
        "mode": args.mode,
        "world_size": rank.world_size,
        "samples_per_s": args.steps * args.batch / total,
        "ms_per_step": {p: 1000 * times[p] / args.steps for p in PHASES},
        "bookkeeping_ms_per_step": 1000 * bookkeeping / args.steps,
    }
    if sharded:
        import torch.distributed as dist

        gathered: list = [None] * rank.world_size
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
        result["per_rank_ms"] = [g["ms_per_step"] for g in gathered]
    if rank.rank == 0:
        Path(args.out).write_text(json.dumps(result))
    runtime.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--scale", type=float, default=0.1, help="cardinality scale of the generated data")
    ap.add_argument("--batch", type=int, default=4096, help="global batch")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mode", choices=["unsharded", "sharded"], help=argparse.SUPPRESS)  # worker
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        worker(args)
        return
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        root = synthetic_dataset(tmp, args.rows, args.scale, progress=False)
        common = [
            f"--data={root}",
            f"--batch={args.batch}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
        ]
        script = [str(Path(__file__).resolve())]
        runs = [
            ("1 process, unsharded", [sys.executable, *script, "--mode=unsharded"]),
            ("1 process, sharded", [sys.executable, *script, "--mode=sharded"]),
            ("2 processes (torchrun)", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2", *script, "--mode=sharded"]),
        ]  # fmt: skip
        print(f"data: {args.rows:,} rows, cardinality scale {args.scale}; global batch {args.batch}, "
              f"{args.steps} timed steps after {args.warmup}; cache lookahead 1.5%")  # fmt: skip
        print(f"{'run':<26}{'samples/s':>11}" + "".join(f"{p:>13}" for p in PHASES) + f"{'bookkeeping':>13}")
        for name, cmd in runs:
            out = tmp / "result.json"
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            subprocess.run([*cmd, *common, f"--out={out}"], check=True, env=env, capture_output=True)
            r = json.loads(out.read_text())
            ms = r["ms_per_step"]
            print(f"{name:<26}{r['samples_per_s']:>11,.0f}" + "".join(f"{ms[p]:>10.1f} ms" for p in PHASES)
                  + f"{r['bookkeeping_ms_per_step']:>10.1f} ms")  # fmt: skip
            for rank, per in enumerate(r.get("per_rank_ms", [])[1:], start=1):
                print(f"{'  rank ' + str(rank):<26}{'':>11}" + "".join(f"{per[p]:>10.1f} ms" for p in PHASES))


if __name__ == "__main__":
    main()
