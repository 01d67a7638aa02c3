"""Rows loaded per step by each cache policy, against Belady's MIN (the offline physical limit).

    .venv/bin/python scripts/bench_cache_hitrate.py [--steps 1000 --batch 2048 --ratio 0.015]
    .venv/bin/python scripts/bench_cache_hitrate.py --multi-hot pareto --scale 0.005 --steps 200

Trace: Zipf ids over the Criteo Kaggle cardinalities (one id per sample and feature, ids ranked by
frequency), ``--steps`` batches of ``--batch`` samples; with ``--multi-hot uniform|pareto``, over
Criteo 1TB's (capped at 40M rows, as MLPerf hashes them), each value expanded to its bag of MLPerf's
sizes (214 ids a sample) as ``dlrm-preprocess`` expands it, ids ranked by the expanded counts.
Every table above ``--full-table-rows`` rows gets a cache of ``--ratio`` of its rows, warmed up to
``--warmup`` with its hottest rows; the smaller tables live wholly on the device and are left out of
the counts. Each policy runs the real cache
(``CachedEmbeddingBagCollection``, dim 1, SGD) as the trainer drives it: ids enqueued ``--lookahead``
batches ahead, the next batch prefetched while the current one computes. Belady's MIN runs on the
same trace, capacities and warm-up, evicting the cached row whose next use is farthest (never a row
of the current batch), with the whole future known.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from cache_trace import kaggle_tables, multi_hot_trace, terabyte_tables, to_kjt, zipf_trace

from dlrm_cache.cache.collection import CachedEmbeddingBagCollection, table_capacity
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import MULTI_HOT_MLPERF, CacheConfig
from dlrm_cache.data.multi_hot import MultiHot


def belady_loads(
    trace: list[np.ndarray], t: int, rows: int, capacity: int, warm: int, pinned: int = 1
) -> int:
    """Loads of Belady's MIN for table ``t`` with batched accesses (a batch's rows must all be cached);
    ``pinned=2``: the rows of the batch before stay too, as in a cache that loads a batch while the one
    before it computes."""
    steps = [np.unique(ids[t]) for ids in trace]
    # next_use[s][i]: the next step after s that needs steps[s][i] (len(steps) if none).
    flat_ids = np.concatenate(steps)
    flat_step = np.concatenate([np.full(len(u), s) for s, u in enumerate(steps)])
    order = np.lexsort((flat_step, flat_ids))
    nxt = np.full(len(flat_ids), len(steps))
    same = flat_ids[order][1:] == flat_ids[order][:-1]
    nxt[order[:-1][same]] = flat_step[order][1:][same]
    bounds = np.cumsum([0] + [len(u) for u in steps])
    slot_of = np.full(rows, -1, dtype=np.int64)
    slot_row = np.full(capacity, -1, dtype=np.int64)
    slot_next = np.full(capacity, -1, dtype=np.int64)  # -1: empty
    slot_of[:warm] = np.arange(warm)
    slot_row[:warm] = np.arange(warm)
    first_use = np.full(rows, len(steps))  # next use of the warm rows before step 0
    np.minimum.at(first_use, flat_ids[::-1], flat_step[::-1])
    slot_next[:warm] = first_use[:warm]
    filled, loads = warm, 0
    before = np.empty(0, dtype=np.int64)  # the batch before's rows (pinned=2)
    for s, u in enumerate(steps):
        u_next = nxt[bounds[s] : bounds[s + 1]]
        slots = slot_of[u]
        hit = slots >= 0
        slot_next[slots[hit]] = u_next[hit]
        miss = np.nonzero(~hit)[0]
        if len(miss):
            loads += len(miss)  # every miss crosses host -> device, admitted or not
            miss = miss[np.argsort(u_next[miss], kind="stable")]  # nearest next use first
            take = min(len(miss), capacity - filled)
            new = np.arange(filled, filled + take)
            filled += take
            rest = miss[take:]
            if len(rest):
                key = slot_next.copy()
                key[slots[hit]] = -2  # rows of this batch stay
                if pinned > 1:
                    held = slot_of[before]
                    key[held[held >= 0]] = -2
                k = min(len(rest), capacity - int((key == -2).sum()))
                victims = np.argpartition(-key, k - 1)[:k] if k > 0 else np.empty(0, dtype=np.int64)
                victims = victims[np.argsort(-key[victims], kind="stable")]
                # Admit a miss only over a victim needed later than it (Belady with bypass).
                keep = u_next[rest[: len(victims)]] < key[victims]
                victims, admitted = victims[keep], rest[: len(victims)][keep]
                slot_of[slot_row[victims]] = -1
                new = np.concatenate([new, victims])
                miss = np.concatenate([miss[:take], admitted])
            else:
                miss = miss[:take]
            slot_of[u[miss]] = new
            slot_row[new] = u[miss]
            slot_next[new] = u_next[miss]
        before = u
    return loads


def fitted(tables, trace, ratio: float, full_table_rows: int) -> dict[str, float]:
    """Per table, the ratio that holds twice the most distinct rows a batch of ``trace`` needs, where
    ``ratio`` gives less: the sizes ``dlrm-train`` raises caches to (a step holds its batch's rows and
    the prefetched next one's)."""
    out = {}
    for t, table in enumerate(tables):
        cfg = CacheConfig(ratio=ratio, full_table_rows=full_table_rows)
        need = 2 * max(len(np.unique(step[t])) for step in trace)
        if table_capacity(table, cfg) < min(need, table.num_embeddings):
            out[table.name] = min(1.0, need / table.num_embeddings)
    return out


def run_policy(policy: str, tables, trace, args, table_ratios) -> tuple[int, float]:
    cfg = CacheConfig(
        policy=policy, ratio=args.ratio, lookahead=args.lookahead, warmup_ratio=args.warmup,
        full_table_rows=args.full_table_rows, table_ratios=table_ratios,
    )  # fmt: skip
    ebc = CachedEmbeddingBagCollection(tables, cfg, SparseOptimizer("sgd", lr=0.01))
    kjts = [to_kjt(ids, tables) for ids in trace]
    t0 = time.perf_counter()
    for k in kjts[: args.lookahead]:
        ebc.enqueue(k)
    for i, kjt in enumerate(kjts):
        if i + args.lookahead < len(kjts):
            ebc.enqueue(kjts[i + args.lookahead])
        out = ebc(kjt).values()
        ebc.prefetch()
        out.sum().backward()
    stats = ebc.stats()
    loaded = sum(s["rows_loaded"] for s in stats["tables"].values() if s["capacity"] < s["rows"])
    # rows_loaded counts every miss, also those served from the host when a batch overflows a cache
    return loaded, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=0.015)
    ap.add_argument("--warmup", type=float, default=0.7)
    ap.add_argument("--lookahead", type=int, default=256)
    ap.add_argument("--zipf", type=float, default=1.05)
    ap.add_argument("--full-table-rows", type=int, default=10_000)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every cardinality")
    ap.add_argument("--policies", default="lru,lfu,freq,lookahead")
    ap.add_argument("--multi-hot", choices=("uniform", "pareto"), help="MLPerf's bags over the 1TB tables")
    ap.add_argument("--fit", action="store_true", help="caches raised to hold two batches, as dlrm-train")
    ap.add_argument("--plot", help="a PNG of each policy's rows loaded per step over Belady's")
    args = ap.parse_args()
    if args.multi_hot:
        tables = terabyte_tables(dim=1, scale=args.scale)
        multi = MultiHot(MULTI_HOT_MLPERF, args.multi_hot, seed=0)
        trace = multi_hot_trace(tables, args.steps, args.batch, args.zipf, 0, multi)
    else:
        tables = kaggle_tables(dim=1, scale=args.scale)
        trace = zipf_trace(tables, args.steps, args.batch, args.zipf, seed=0)
    table_ratios = fitted(tables, trace, args.ratio, args.full_table_rows) if args.fit else {}
    cfg = CacheConfig(ratio=args.ratio, full_table_rows=args.full_table_rows, table_ratios=table_ratios)
    t0 = time.perf_counter()
    belady = pinned = 0
    for t, table in enumerate(tables):
        cap = table_capacity(table, cfg)
        if cap < table.num_embeddings:
            belady += belady_loads(trace, t, table.num_embeddings, cap, int(args.warmup * cap))
            pinned += belady_loads(trace, t, table.num_embeddings, cap, int(args.warmup * cap), pinned=2)
    print(f"{args.steps} steps x {args.batch} samples, ratio {args.ratio}, warm-up {args.warmup}", end=", ")
    print(f"lookahead {args.lookahead}", end="")
    print(f", raised to hold two batches: {', '.join(sorted(table_ratios))}" if table_ratios else "")
    print(f"{'policy':10s} {'rows loaded/step':>17s} {'x Belady':>9s} {'x pinned':>9s} {'seconds':>8s}")
    seconds = time.perf_counter() - t0
    print(f"{'belady':10s} {belady / args.steps:17.1f} {1.0:9.3f} {belady / pinned:9.3f} {seconds:8.1f}")
    print(f"{'pinned':10s} {pinned / args.steps:17.1f} {pinned / belady:9.3f} {1.0:9.3f}", end="")
    print("  (Belady's MIN with the batch before pinned too)")
    over = {}
    for policy in args.policies.split(","):
        loaded, secs = run_policy(policy, tables, trace, args, table_ratios)
        ratios = f"{loaded / belady:9.3f} {loaded / pinned:9.3f}"
        print(f"{policy:10s} {loaded / args.steps:17.1f} {ratios} {secs:8.1f}", flush=True)
        over[policy] = loaded / belady
    if args.plot:
        plot(
            args.plot, over, f"{args.steps} steps of {args.batch}, cache {args.ratio:.1%} of each large table"
        )


def plot(path: str, over: dict[str, float], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 2.8))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.16, 0.18, 0.8, 0.7))
    names = list(over)
    ax.barh(names, [over[n] for n in names], color=["C2" if n == "lookahead" else "C0" for n in names])
    for i, n in enumerate(names):
        ax.text(over[n], i, f" {over[n]:.3f}x", va="center", fontsize=8)
    ax.axvline(1.0, color="k", lw=1, label="Belady's MIN (offline optimum) = 1")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0.9, max(over.values()) * 1.08)
    ax.invert_yaxis()
    ax.set_xlabel("rows loaded per step, over Belady's MIN")
    ax.set_title(title, fontsize=9)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
