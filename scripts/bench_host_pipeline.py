"""The host side of a training step alone: everything a GPU step waits for, with no device compute.

    .venv/bin/python scripts/bench_host_pipeline.py [--batch 16384 --dim 128 --ratio 0.015]
    .venv/bin/python scripts/bench_host_pipeline.py --multi-hot uniform --plot docs/img/host_pipeline.png

Data: generated rows of Criteo 1TB's profile (``--scale`` of its cardinalities, hashed as MLPerf caps
them, the cap scaled alike), preprocessed by ``dlrm-preprocess`` into Parquet, one-hot or with MLPerf's
bags (``--multi-hot uniform|pareto``: 214 ids a sample). The phases of a batch, timed one after the
other on one thread:

- ``load``: the loader's own work (``ParquetBatches``: Parquet row groups to a ``Batch``);
- ``prepare``: the ids made ready for the cache (global ids, unique, inverse, bags: ``prepare_batch``)
  and registered as future uses (``register_future``);
- ``plan``: lookups, evictions and next uses (``TableGroup.plan``), with the rows it loads copied out of
  the host tier (on the CPU, into their slots; on a GPU, into the pinned buffer they travel in);
- ``stage``: the step's index tensors (slots, inverse, offsets) copied into transfer buffers, as
  ``CudaRows.stage`` pins them for the device.

What a GPU then does with them is device work and not counted: ``gather`` (the step's rows out of the
cache: an ``index_select`` on the device) is timed too, and shown apart, because here the CPU is the
device. The per-phase times are taken on one thread (``torch.set_num_threads(1)``, pyarrow's pool of
one). Then the whole pipeline, each run in a process of its own pinned to its cores
(``sched_setaffinity``), ``--repeats`` times in alternation:

- ``sequential, 1 core``: the four phases one after the other on one thread;
- ``threads``: as training on a GPU runs it - the loader's own thread reads, a preparing thread
  (``cache.prepare_threads``) makes each enqueued batch's ids ready, the bookkeeping thread
  (``cache.bookkeeping=thread``) registers, plans and stages each step ahead, and the training thread
  starts each step - on 1 core and on 2 (torch's intra-op threads and pyarrow's pool as many as the
  cores).

The scaling is the 2-core rate over the faster of the two 1-core ones. Every process keeps the memory
pyarrow decodes into, as ``dlrm-train`` does (``arrow_memory.keep_decoded_memory``: the script starts
itself again with it set, since it must be set before pyarrow loads). The cache: ``--ratio`` of each
table above 10,000 rows (the rest whole), the lookahead policy, ``--lookahead`` batches ahead, row-wise
Adagrad state beside the rows, on the CPU; caches that ``--ratio`` leaves too small for a step raised to
fit, as ``dlrm-train`` raises them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import pyarrow as pa
import torch

from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import MULTI_HOT_MLPERF, CacheConfig, PreprocessOptions
from dlrm_cache.data.arrow_memory import keep_decoded_memory
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.loader import ParquetBatches, load_metadata
from dlrm_cache.distributed.table_stats import fit_to_batch, load_table_stats
from dlrm_cache.train.model import table_configs

PHASES = ("load", "prepare", "plan", "stage")
INDEX_TENSORS = ("slots", "inverse", "offsets")


class Pipeline:
    """The cache's host work over one collection: ``prepare`` a batch ahead, ``plan`` and ``stage`` a
    step; the step itself (gather, pool, gradients) is not run."""

    def __init__(self, root: Path, args, threaded: bool = False):
        """``threaded``: the collection's own threads prepare (``cache.prepare_threads``) and plan
        (``cache.bookkeeping=thread``) the batches handed to ``enqueue``."""
        meta = load_metadata(root)
        tables = table_configs(args.dim, meta["vocab_sizes"])
        cache = CacheConfig(
            ratio=args.ratio,
            lookahead=args.lookahead,
            planner="auto",
            bookkeeping="thread" if threaded else "inline",
        )
        # caches too small for a step raised to hold two batches, as dlrm-train raises them
        stats = load_table_stats(
            root, {t.name: t.feature_names[0] for t in tables}, {t.name: args.dim for t in tables}
        )
        cache, _ = fit_to_batch(cache, stats, args.batch)
        self.ebc = CachedEmbeddingBagCollection(tables, cache, SparseOptimizer("adagrad", lr=0.01))
        self.ahead: deque = deque()
        self.step = 0
        self.buffers: dict[str, torch.Tensor] = {}  # transfer buffers, reused (grown as needed)
        self._staged: tuple | None = None  # threaded: (the head's plans, their staging), on their way

    def prepare(self, batch) -> None:
        prepared = self.ebc.prepare_batch(batch.sparse_features)
        for g, p in zip(self.ebc.groups, prepared, strict=True):
            g.register_future(p)
        self.ahead.append(prepared)

    def plan(self) -> list:
        self.step += 1
        prepared = self.ahead.popleft()
        return [
            g.plan(p, self.step, g.pin_floor(self.step), g.inflight_host_rows())
            for g, p in zip(self.ebc.groups, prepared, strict=True)
        ]

    def stage(self, plans: list) -> None:
        """The step's index tensors into transfer buffers (what ``CudaRows.stage`` pins)."""
        for i, plan in enumerate(plans):
            for name in INDEX_TENSORS:
                t = getattr(plan, name, None)
                t = getattr(plan.batch, name) if t is None and name != "slots" else t
                if t is None:
                    continue
                buf = self.buffers.get(f"{i}.{name}")
                if buf is None or len(buf) < len(t):
                    buf = self.buffers[f"{i}.{name}"] = torch.empty(2 * len(t), dtype=t.dtype)
                buf[: len(t)].copy_(t)

    def enqueue(self, batch) -> None:
        """Threaded: hand a future batch to the collection (prepared and registered on its threads)."""
        self.ebc.enqueue(batch.sparse_features)

    def next_plans(self) -> list:
        """Threaded: the plans of the queue's head, made and staged on the bookkeeping thread (ahead,
        while the step before computed, as ``prefetch`` does; there, as ``CudaRows`` stages them)."""
        if self._staged is None:
            self.plan_ahead()
        plans, staged = self._staged
        self._staged = None
        self.ebc._queue.popleft()
        self.ebc._planned = None
        staged.result()
        return plans.result()

    def plan_ahead(self) -> None:
        """Threaded: the next plan starts on the bookkeeping thread (``prefetch``), staged right after."""
        ebc = self.ebc
        if ebc._queue and self._staged is None:
            ebc._planned = planned = ebc._submit_plan(ebc._queue[0][1])
            self._staged = (planned, ebc._submit(lambda: self.stage(planned.result())))

    def gather(self, plans: list) -> None:
        """Device work: the step's rows out of the cache (here the CPU is the device)."""
        for g, plan in zip(self.ebc.groups, plans, strict=True):
            g.begin_step(plan)

    def start_step(self, plans: list) -> None:
        """What starting the step leaves to the host of a GPU: the plan is the batch in flight (its
        rows' gather is the device's work, left out of the pipeline runs)."""
        for g, plan in zip(self.ebc.groups, plans, strict=True):
            g._inflight = plan

    def close(self) -> None:
        self.ebc.close()


def batches(root: Path, args):
    """The loader's batches, made on this thread (its own work, not its background thread's)."""
    loader = ParquetBatches(root, "train", args.batch)
    while True:
        yield from loader._read(0)


def threads(n: int) -> None:
    """Torch's intra-op threads (OpenMP: the C++ preparation and planner too) and pyarrow's decoding."""
    torch.set_num_threads(n)
    pa.set_cpu_count(n)


def phases(root: Path, args) -> dict[str, float]:
    """Seconds per batch of each phase, and of the gather, one after the other on one thread."""
    threads(1)
    pipe, spent, made = Pipeline(root, args), dict.fromkeys([*PHASES, "gather"], 0.0), batches(root, args)
    clock = time.perf_counter

    def timed(phase: str, fn, *a):
        t = clock()
        out = fn(*a)
        if counting:
            spent[phase] += clock() - t
        return out

    counting = False
    for _ in range(args.lookahead):
        pipe.prepare(next(made))
    for step in range(args.warm + args.steps):
        counting = step >= args.warm
        batch = timed("load", next, made)
        timed("prepare", pipe.prepare, batch)
        plans = timed("plan", pipe.plan)
        timed("stage", pipe.stage, plans)
        timed("gather", pipe.gather, plans)
    pipe.close()
    return {k: v / args.steps for k, v in spent.items()}


def sequential(root: Path, args) -> float:
    """Samples/s of load -> prepare -> plan -> stage, one after the other on one thread."""
    pipe, made = Pipeline(root, args), batches(root, args)
    for _ in range(args.lookahead):
        pipe.prepare(next(made))
    for step in range(args.warm + args.steps):
        if step == args.warm:
            t0 = time.perf_counter()
        pipe.prepare(next(made))
        plans = pipe.plan()
        pipe.stage(plans)
        pipe.start_step(plans)
    seconds = time.perf_counter() - t0
    pipe.close()
    return args.steps * args.batch / seconds


def threaded(root: Path, args) -> float:
    """Samples/s of the pipeline as training on a GPU runs it: the loader's thread reads, a preparing
    thread makes each enqueued batch's ids ready, the bookkeeping thread plans and stages each step
    ahead, and this thread (the training thread) starts each step."""
    pipe = Pipeline(root, args, threaded=True)
    loader = ParquetBatches(root, "train", args.batch)
    made = (b for epoch in itertools.count() for b in loader.batches(epoch))  # its background thread
    for _ in range(args.lookahead):
        pipe.enqueue(next(made))
    for step in range(args.warm + args.steps):
        if step == args.warm:
            t0 = time.perf_counter()
        pipe.enqueue(next(made))
        pipe.start_step(pipe.next_plans())
        pipe.plan_ahead()
    seconds = time.perf_counter() - t0
    pipe.close()
    return args.steps * args.batch / seconds


def pipeline_rate(root: Path, args, mode: str, cores: int) -> float:
    """``sequential`` or ``threaded`` samples/s, in a process of its own pinned to ``cores`` cores."""
    same = ["--batch", args.batch, "--dim", args.dim, "--ratio", args.ratio, "--lookahead", args.lookahead]
    same += ["--steps", args.steps, "--warm", args.warm]
    cmd = [sys.executable, __file__, "--child", f"{mode}:{cores}:{root}", *map(str, same)]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])


def child(args) -> None:
    mode, cores, root = args.child.split(":", 2)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: int(cores)])  # before any thread starts
    threads(int(cores))
    print((sequential if mode == "sequential" else threaded)(Path(root), args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=600_000, help="generated rows")
    ap.add_argument("--scale", type=float, default=0.01, help="of Criteo 1TB's cardinalities and cap")
    ap.add_argument("--multi-hot", choices=("uniform", "pareto"))
    ap.add_argument("--batch", type=int, default=16_384)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.015)
    ap.add_argument("--lookahead", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--data", help="a folder to keep the generated data in (made once)")
    ap.add_argument("--plot", help="a PNG of samples/s per phase")
    ap.add_argument("--repeats", type=int, default=3, help="pipeline runs of each kind, in alternation")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # MODE:CORES:ROOT, one pipeline run
    args = ap.parse_args()
    if keep_decoded_memory():  # as dlrm-train; it must be set before pyarrow loads: start again
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.child:
        child(args)
        return
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", end=", ")
    print(f"{torch.get_num_threads()} intra-op threads")
    options = PreprocessOptions(
        max_ind_range=round(40_000_000 * args.scale),
        multi_hot_sizes=list(MULTI_HOT_MLPERF) if args.multi_hot else None,
        multi_hot_distribution=args.multi_hot or "uniform",
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data) if args.data else Path(tmp)
        root = synthetic_dataset(folder, args.rows, args.scale, progress=False, cardinalities="terabyte",
                                 options=options)  # fmt: skip
        ids = len(next(batches(root, args)).sparse_features.values()) / args.batch
        print(f"{args.rows:,} rows of Criteo 1TB's profile x {args.scale}, {ids:.0f} ids a sample", end=", ")
        print(f"batch {args.batch:,}, dim {args.dim}, cache {args.ratio:.1%}, lookahead {args.lookahead}")
        per_phase = phases(root, args)
        gather = per_phase.pop("gather")
        total = sum(per_phase.values())
        print(f"{'phase':8s} {'ms/batch':>9s} {'ns/id':>7s} {'samples/s alone':>16s}")
        for name, s in per_phase.items():
            print(f"{name:8s} {1e3 * s:9.2f} {1e9 * s / (ids * args.batch):7.1f} {args.batch / s:16,.0f}")
        per_id = 1e9 * total / (ids * args.batch)
        print(f"{'all':8s} {1e3 * total:9.2f} {per_id:7.1f} {args.batch / total:16,.0f}")
        gather_per_id = 1e9 * gather / (ids * args.batch)
        print(f"(device work, not counted: gather {1e3 * gather:.2f} ms/batch, {gather_per_id:.1f} ns/id)")
        kinds = {"sequential, 1 core": ("sequential", 1), "threads, 1 core": ("threaded", 1),
                 "threads, 2 cores": ("threaded", 2)}  # fmt: skip
        rates: dict[str, list[float]] = {k: [] for k in kinds}
        for _ in range(args.repeats):  # in alternation: this machine's speed drifts
            for k, (mode, cores) in kinds.items():
                rates[k].append(pipeline_rate(root, args, mode, cores))
        median = {k: statistics.median(v) for k, v in rates.items()}
        print(f"pipeline (median of {args.repeats}, samples/s):")
        for k, v in rates.items():
            print(f"  {k:20s} {median[k]:12,.0f}   ({', '.join(f'{r:,.0f}' for r in v)})")
        one = max(median["sequential, 1 core"], median["threads, 1 core"])
        print(f"  2 cores / the faster on 1: {median['threads, 2 cores'] / one:.2f}x")
    if args.plot:
        plot(
            args.plot, per_phase, args.batch, f"{ids:.0f} ids a sample, batch {args.batch:,}, dim {args.dim}"
        )


def plot(path: str, per_phase: dict[str, float], batch: int, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 2.6))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.14, 0.2, 0.82, 0.68))
    names = [*per_phase, "all"]
    rates = [batch / per_phase[n] for n in per_phase] + [batch / sum(per_phase.values())]
    ax.barh(names, rates, color=["C0"] * len(per_phase) + ["C2"])
    for i, r in enumerate(rates):
        ax.text(r, i, f" {r:,.0f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(rates) / 1.5, max(rates) * 4)  # room for the labels
    ax.invert_yaxis()
    ax.set_xlabel("samples/s of each phase alone (one thread)")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
