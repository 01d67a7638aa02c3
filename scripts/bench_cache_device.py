"""One embedding step of the 26 Criteo Kaggle tables on a device (CUDA when present), cached at
``--ratio`` against every table held whole on the device (``policy=none``).

    PYTHONPATH=. python scripts/bench_cache_device.py [--device cuda --dim 64 --batch 2048 --steps 200]

Drives the cache core (``dlrm_cache.cache.group.TableGroup``) directly, so it needs only torch and
numpy: no torchrec, no fbgemm (neither can travel to a lent GPU machine). A step = plan (host
bookkeeping, loads), gather + pool (forward), the row gradients of a fixed upstream gradient and the
fused row-wise Adagrad update (backward); the same for both runs. Ids: Zipf(1.05) over the Kaggle
cardinalities times ``--scale``, handed to the cache ``--lookahead`` batches ahead. The plans come
from the C++ planner where the machine's compiler builds it, as in training (``--planner``; ``auto``
falls back to the Python planner with a warning). ``--bookkeeping both``: the threaded and the inline
bookkeeping side by side. ``--require-speed 0.9 --require-overlap 0.8`` (``scripts/gpu_check.sh``):
exit non-zero unless the cached step (threaded) reaches 0.9x the all-on-device throughput and 80% of
the loads' copy time runs under compute (CUDA events).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from dlrm_cache.cache import native
from dlrm_cache.cache.group import GroupSettings, TableGroup
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.cache.table import TableSpec
from dlrm_cache.criteo import CAT_COLUMNS, KAGGLE_CARDINALITIES
from dlrm_cache.data.zipf import ZipfSampler


def run(
    policy: str, args, trace: list[np.ndarray], device: torch.device, threaded: bool
) -> tuple[float, dict]:
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
    g = TableGroup(tables, GroupSettings(caps, policy, opt, device, warmup_ratio=0.7, planner=planner))
    offsets = g.layout.feature_row_offset.numpy()[:, None]
    bags = torch.arange(args.batch * len(tables) + 1, dtype=torch.int64)
    lookups = torch.full((len(tables),), args.batch, dtype=torch.int64)

    def prepare(ids: np.ndarray):
        global_ids = torch.from_numpy(np.ascontiguousarray((ids + offsets).T).reshape(-1))  # sample-major
        p = g.prepare(global_ids, bags, args.batch, lookups)
        g.register_future(p)
        return p

    grad = torch.randn(args.batch, len(tables) * args.dim, device=device)
    # The bookkeeping (prepare, plan) in order on a thread of its own where training puts it
    # (cache.bookkeeping), the step's compute on this one: the plan of step t + 1 runs during step t.
    worker = ThreadPoolExecutor(1) if threaded else None

    def submit(fn, *a) -> Future:
        if worker is not None:
            return worker.submit(fn, *a)
        done: Future = Future()
        done.set_result(fn(*a))
        return done

    def plan_next(step: int) -> Future:  # read on this thread, as the collection does
        batch, floor, held = ahead.popleft(), g.pin_floor(step), g.inflight_host_rows()
        return submit(lambda: g.plan(batch.result(), step, floor, held))

    ahead = deque(submit(prepare, ids) for ids in trace[: args.lookahead])
    t0, compute, loads = 0.0, [], None
    planned = plan_next(1)
    for step, _ in enumerate(trace, start=1):
        if step == args.warm + 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
                loads = g.record_load_timings()
            t0 = time.perf_counter()
        if step - 1 + args.lookahead < len(trace):
            ahead.append(submit(prepare, trace[step - 1 + args.lookahead]))
        plan = planned.result()
        g.begin_step(plan)
        started = _event(device) if loads is not None else None
        g.pool(plan, plan.rows)
        if step < len(trace):
            planned = plan_next(step + 1)  # prefetch: while this step computes
        g.apply_gradients(plan, grad)
        if started is not None:
            compute.append((started, _event(device)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / (len(trace) - args.warm)
    stats = {
        "loaded": int(g.stats.loaded.sum()),
        "touched": int(g.stats.touched.sum()),
        "book": g.stats.bookkeeping_s,
    }
    if loads:
        stats["load_ms"], stats["overlap_ms"] = _overlap(loads, compute)
    if worker is not None:
        worker.shutdown()
    g.close()
    return seconds, stats


def _event(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def _overlap(loads: list, compute: list) -> tuple[float, float]:
    """Total time of the copy stream's loads and how much of it ran while a step computed (ms), from
    CUDA events (all on one clock: milliseconds since the first compute event)."""
    base = compute[0][0]
    spans = sorted((base.elapsed_time(a), base.elapsed_time(b)) for a, b in compute)
    total = covered = 0.0
    for a, b in loads:
        lo, hi = base.elapsed_time(a), base.elapsed_time(b)
        total += hi - lo
        covered += sum(max(0.0, min(hi, e) - max(lo, s)) for s, e in spans)
    return total, covered


def main() -> int:
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
    ap.add_argument(
        "--bookkeeping",
        default="auto",
        choices=("auto", "inline", "thread", "both"),
        help="cache.bookkeeping: auto (a thread on CUDA), inline, thread, or both side by side",
    )
    ap.add_argument(
        "--require-speed", type=float, help="fail unless cached (threaded) >= this x every table whole"
    )
    ap.add_argument(
        "--require-overlap",
        type=float,
        help="CUDA: fail unless this share of the loads' copy time runs during compute (threaded)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}, torch {torch.__version__}, dim {args.dim}, batch {args.batch}, "
        f"scale {args.scale}, ratio {args.ratio}, {args.steps} timed steps"
    )
    rng = np.random.default_rng(1)
    samplers = [ZipfSampler(max(1, round(n * args.scale)), 1.05) for n in KAGGLE_CARDINALITIES]
    trace = [np.stack([s.sample(rng, args.batch) for s in samplers]) for _ in range(args.warm + args.steps)]
    modes = {"auto": [device.type == "cuda"], "inline": [False], "thread": [True], "both": [True, False]}
    runs = [("none", device.type == "cuda"), *(("lookahead", t) for t in modes[args.bookkeeping])]
    results = {}
    for policy, threaded in runs:
        results[(policy, threaded)] = run(policy, args, trace, device, threaded)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results[runs[0]][0]
    for (policy, threaded), (secs, s) in results.items():
        hit = 1 - s["loaded"] / max(s["touched"], 1)
        label = f"{policy} ({'thread' if threaded else 'inline'})"
        rate = args.batch / secs
        print(
            f"{label:20s} {secs * 1e3:8.2f} ms/step {rate:12,.0f} samples/s  {base / secs:5.2f}x none",
            end="  ",
        )
        book = s["book"] / (args.warm + args.steps) * 1e3
        print(f"unique hit rate {hit:.3f}, bookkeeping {book:.2f} ms/step", end="")
        if (
            "load_ms" in s
        ):  # CUDA: the loads' copies on the copy stream, and how much of them ran during compute
            s["overlap"] = s["overlap_ms"] / s["load_ms"] if s["load_ms"] else 1.0
            print(
                f", loads {s['load_ms'] / args.steps:.3f} ms/step, {s['overlap']:.0%} of it during compute",
                end="",
            )
        print()
    cached = next(k for k in runs[1:] if k[1] == runs[1][1])  # the threaded run where there is one
    failed = False
    if args.require_speed is not None:
        speed = base / results[cached][0]
        ok = speed >= args.require_speed
        failed |= not ok
        print(f"requirement speed: {'PASS' if ok else 'FAIL'} cached {speed:.2f}x every table whole "
              f"(>= {args.require_speed:.2f}x)")  # fmt: skip
    if args.require_overlap is not None:
        share = results[cached][1].get("overlap")
        ok = share is not None and share >= args.require_overlap
        failed |= not ok
        shown = "not measured (CUDA only)" if share is None else f"{share:.0%}"
        print(f"requirement overlap: {'PASS' if ok else 'FAIL'} loads' copy time during compute {shown} "
              f"(>= {args.require_overlap:.0%})")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
