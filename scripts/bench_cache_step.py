"""CPU cost of one training step of the 26-table cached collection against the same step with every
table held whole (``policy=none``), and the bookkeeping cost as the cache doubles; with ``--fbgemm``,
also against TorchRec's FBGEMM kernel (``SplitTableBatchedEmbeddingBagsCodegen`` on the CPU, row-wise
Adagrad fused into its backward: what TorchRec's sharded tables run).

    .venv/bin/python scripts/bench_cache_step.py [--scale 1.0 --dim 64 --batch 2048 --steps 200]
    .venv/bin/python scripts/bench_cache_step.py --fbgemm --scale 0.5 --plot docs/img/step_time.png

A step is forward + backward + fused row-wise Adagrad update of the embedding collection alone (no
MLPs), on a Zipf(1.05) id trace over the Criteo Kaggle cardinalities times ``--scale``, driven as the
trainer drives it: each step enqueues the batch ``--lookahead`` steps ahead, then runs forward,
prefetches the next batch, and runs backward.

The cached collection and the ``policy=none`` one are timed in alternating blocks of ``--block``
steps (each continuing its own run), so that both see the same machine: on a shared VM the speed
drifts by tens of percent within minutes, which made back-to-back runs of each incomparable. Peak
memory is two copies of the tables (``none`` and one cached collection at a time), three with
``--fbgemm`` (hence ``--scale 0.5`` on a 24 GB machine).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

import torch
from cache_trace import kaggle_tables, to_kjt, zipf_trace

from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig


class Driver:
    """One collection driven through the trace as the trainer drives it, a block of steps at a time."""

    def __init__(self, ebc: CachedEmbeddingBagCollection, kjts: list, lookahead: int):
        self.ebc, self.kjts, self.lookahead = ebc, kjts, lookahead
        self.i = 0
        self.weights: torch.Tensor | None = None
        for k in kjts[:lookahead]:
            ebc.enqueue(k)

    def run(self, steps: int) -> float:
        """Seconds taken by the next ``steps`` steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            if self.i + self.lookahead < len(self.kjts):
                self.ebc.enqueue(self.kjts[self.i + self.lookahead])
            out = self.ebc(self.kjts[self.i]).values()
            if self.weights is None:
                self.weights = torch.randn(out.shape)
            self.ebc.prefetch()
            (out * self.weights).sum().backward()
            self.i += 1
        return time.perf_counter() - t0


class FbgemmDriver:
    """FBGEMM's table-batched embedding (CPU, row-wise Adagrad fused into backward) on the same trace."""

    def __init__(self, tables, kjts: list, lr: float):
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice,
            SplitTableBatchedEmbeddingBagsCodegen,
        )

        specs = [
            (t.num_embeddings, t.embedding_dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for t in tables
        ]
        self.tbe = SplitTableBatchedEmbeddingBagsCodegen(
            specs, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=lr, eps=1e-8,
            pooling_mode=PoolingMode.SUM,
        )  # fmt: skip
        # the KJT's values are feature-major with one id per bag: FBGEMM's indices and offsets as they are
        self.inputs = [(k.values(), torch.arange(len(k.values()) + 1)) for k in kjts]
        self.i = 0
        self.weights: torch.Tensor | None = None

    def run(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            out = self.tbe(*self.inputs[self.i])
            if self.weights is None:
                self.weights = torch.randn(out.shape)
            (out * self.weights).sum().backward()
            self.i += 1
        return time.perf_counter() - t0


def plot(path: str, bars: dict[str, float], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.36, 0.17, 0.58, 0.72))
    names = list(bars)
    ax.barh(names, [bars[n] for n in names], color=["C7" if "FBGEMM" in n else "C0" for n in names])
    for i, n in enumerate(names):
        ax.text(bars[n], i, f" {bars[n]:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(bars.values()) * 1.12)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step: forward + backward + fused update")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=200, help="timed steps per cached collection")
    ap.add_argument("--block", type=int, default=20, help="steps per block of the alternation")
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--lookahead", type=int, default=256)
    ap.add_argument("--ratios", default="0.015,0.03")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    ap.add_argument("--fbgemm", action="store_true", help="time FBGEMM's CPU kernel too, in the same blocks")
    ap.add_argument("--plot", help="a PNG of the ms per step of every collection timed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    blocks = -(-args.steps // args.block)
    tables = kaggle_tables(args.dim, args.scale)
    # none runs its warm-up once, then as many timed steps as all the cached runs together
    n_none = args.warm + blocks * args.block * (len(ratios) + args.fbgemm)
    trace = zipf_trace(tables, n_none + args.lookahead, args.batch, 1.05, seed=1)
    kjts = [to_kjt(ids, tables) for ids in trace]
    opt = SparseOptimizer("adagrad", lr=0.01)
    rows = sum(t.num_embeddings for t in tables)
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {rows:,} rows", end=", ")
    print(f"dim {args.dim}, batch {args.batch}, {blocks} blocks of {args.block} steps per collection")
    none = Driver(CachedEmbeddingBagCollection(tables, CacheConfig(policy="none"), opt), kjts, args.lookahead)
    none.run(args.warm)
    bars = {}
    if args.fbgemm:
        fbgemm = FbgemmDriver(tables, kjts, lr=0.01)
        fbgemm.run(args.warm)
        # from here on both run the same steps of the trace
        pairs = [(none.run(args.block), fbgemm.run(args.block)) for _ in range(blocks)]
        base, step = (sum(p[k] for p in pairs) / (blocks * args.block) for k in (0, 1))
        q1, per_block, q3 = statistics.quantiles([f / n for n, f in pairs], n=4)
        print(
            f"FBGEMM TBE (CPU, row-wise Adagrad) {step * 1e3:6.2f} ms/step, none {base * 1e3:6.2f} ms/step",
            end="",
        )
        print(f" = {step / base:.3f}x (blocks: median {per_block:.3f}x, IQR {q1:.3f}-{q3:.3f})")
        bars["TorchRec's FBGEMM kernel (CPU)"] = step * 1e3
        bars["ours, tables whole (policy=none)"] = base * 1e3
        del fbgemm
        gc.collect()
    for ratio in ratios:
        cfg = CacheConfig(policy="lookahead", ratio=ratio, lookahead=args.lookahead)
        cached = Driver(CachedEmbeddingBagCollection(tables, cfg, opt), kjts, args.lookahead)
        cached.run(args.warm)
        before = cached.ebc.stats()
        pairs = [(none.run(args.block), cached.run(args.block)) for _ in range(blocks)]
        s = cached.ebc.stats()
        base, step = (sum(p[k] for p in pairs) / (blocks * args.block) for k in (0, 1))
        q1, per_block, q3 = statistics.quantiles([c / n for n, c in pairs], n=4)
        timed = blocks * args.block
        loaded = (s["rows_loaded"] - before["rows_loaded"]) / timed
        book = (s["bookkeeping_s"] - before["bookkeeping_s"]) / timed
        print(f"lookahead ratio={ratio:<6} {step * 1e3:6.2f} ms/step, none {base * 1e3:6.2f} ms/step", end="")
        print(f" = {step / base:.3f}x (blocks: median {per_block:.3f}x, IQR {q1:.3f}-{q3:.3f})", end="; ")
        print(f"bookkeeping {book * 1e3:.2f} ms/step, {loaded:,.0f} rows loaded/step", end=", ")
        print(f"{book / max(loaded, 1) * 1e6:.2f} us/loaded row")
        bars[f"ours, lookahead cache {ratio:.1%}"] = step * 1e3
        bars.setdefault("ours, tables whole (policy=none)", base * 1e3)
        cached.ebc.close()
        del cached
        gc.collect()

    if args.plot:
        rows_m = rows / 1e6
        plot(
            args.plot,
            bars,
            f"{rows_m:.1f}M rows x dim {args.dim}, batch {args.batch}, {os.cpu_count()} CPU cores",
        )


if __name__ == "__main__":
    main()
