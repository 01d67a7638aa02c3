"""Tables larger than RAM: training speed, disk bytes per missed row, peak memory, and checkpoint save
and load, for a host tier at several multiples of this machine's RAM.

    .venv/bin/python scripts/bench_host_tier.py --dir /big/disk [--sizes 0.5 1.2 2.0 --dim 256]

Each case runs in a child process of its own (so that its peak memory is its own): 8 tables of
``--dim`` (row-wise Adagrad: ``dim + 1`` floats a row) adding up to ``size`` x RAM, cached at
``--ratio``, trained as the trainer drives the cache (ids enqueued ``--lookahead`` batches ahead,
forward, prefetch, backward) under a linear head, first on near-unique ids (uniform over each table:
almost every lookup a miss), then on Zipf(1.05) ids. The smallest size also runs with the tables in
RAM (``cache.host=memory``). Then the checkpoint: the tables streamed into ``--dir`` and loaded back.
Memory is sampled every 20 ms: the resident set (VmRSS, which counts the mapped table's pages the
process touched) and its anonymous part (RssAnon: what the process itself allocated).

Disk room: a mapped host tier needs its tables' size in ``cache.mmap_dir``; a checkpoint needs its
tables' size in the run dir, twice while a new one is written beside the previous one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

GIB = 1 << 30
TABLES = 8


def _status(key: str) -> int:
    """A /proc/self/status figure, in bytes."""
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024


class PeakMemory:
    """Peak VmRSS and RssAnon while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.rss = self.anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            self.rss, self.anon = max(self.rss, _status("VmRSS")), max(self.anon, _status("RssAnon"))
            if self._stop.wait(0.02):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def figures(self) -> dict:
        return {"peak_rss_gb": self.rss / GIB, "peak_anon_gb": self.anon / GIB}


def run_case(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
    from dlrm_cache.cache.optim import SparseOptimizer
    from dlrm_cache.config import CacheConfig
    from dlrm_cache.data.zipf import ZipfSampler
    from dlrm_cache.distributed import checkpoint as ckpt

    opt = SparseOptimizer("adagrad", lr=0.01)
    row_bytes = (args.dim + opt.state_width(args.dim)) * 4
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = int(args.case_size * ram / row_bytes / TABLES)
    tables = [
        EmbeddingBagConfig(num_embeddings=rows, embedding_dim=args.dim, name=f"t{i}", feature_names=[f"f{i}"])
        for i in range(TABLES)
    ]
    work = Path(args.dir)
    cache = CacheConfig(ratio=args.ratio, lookahead=args.lookahead, host=args.case_host,
                        mmap_dir=str(work / "host"), warmup_ratio=0.7)  # fmt: skip
    out = {"size_x_ram": args.case_size, "host": args.case_host, "table_gb": rows * TABLES * row_bytes / 1e9}
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        ebc = CachedEmbeddingBagCollection(tables, cache, opt)
    out["init"] = {"s": time.perf_counter() - t0, **mem.figures()}
    head = torch.nn.Linear(TABLES * args.dim, 1)
    dense = torch.optim.SGD(head.parameters(), lr=0.01)
    rng = np.random.default_rng(0)
    zipf = ZipfSampler(rows, 1.05)
    for dist in ("uniform", "zipf"):
        n = args.warmup + args.steps

        def ids(dist=dist):
            if dist == "uniform":
                return torch.from_numpy(rng.integers(0, rows, TABLES * args.batch))
            return torch.from_numpy(zipf.sample(rng, TABLES * args.batch))

        batches = [
            KeyedJaggedTensor(
                keys=[t.feature_names[0] for t in tables],
                values=ids(),
                lengths=torch.ones(TABLES * args.batch, dtype=torch.int32),
            )  # fmt: skip
            for _ in range(n)
        ]
        labels = torch.randint(0, 2, (args.batch,), generator=torch.Generator().manual_seed(1)).float()
        for b in batches[: args.lookahead]:
            ebc.enqueue(b)
        before = None
        with PeakMemory() as mem:
            for i, b in enumerate(batches):
                if i == args.warmup:
                    before, t0 = ebc.stats(), time.perf_counter()
                if i + args.lookahead < n:
                    ebc.enqueue(batches[i + args.lookahead])
                logits = head(ebc(b).values()).squeeze(1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
                ebc.prefetch()
                dense.zero_grad()
                loss.backward()
                dense.step()
            seconds = time.perf_counter() - t0
            after = ebc.stats()
        grown = {k: after[k] - before[k] for k in ("rows_loaded", "rows_written", "disk_read_bytes",
                                                     "disk_write_bytes")}  # fmt: skip
        out[dist] = {
            "samples_per_s": args.steps * args.batch / seconds,
            "s_per_step": seconds / args.steps,
            "rows_loaded_per_step": grown["rows_loaded"] / args.steps,
            "disk_read_bytes_per_row_loaded": grown["disk_read_bytes"] / max(1, grown["rows_loaded"]),
            "disk_write_bytes_per_row_written": grown["disk_write_bytes"] / max(1, grown["rows_written"]),
            **mem.figures(),
        }
    if args.checkpoint:
        folder = work / "ckpt"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            ckpt.write_embeddings(folder, 0, [(ebc, {})])
        out["save"] = {"s": time.perf_counter() - t0, **mem.figures()}
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            ckpt.load_embeddings(folder, 1, [(ebc, {})])
        out["load"] = {"s": time.perf_counter() - t0, **mem.figures()}
        shutil.rmtree(folder)
    ebc.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="a folder on the disk to measure (host files, checkpoints)")
    p.add_argument("--sizes", type=float, nargs="+", default=[0.5, 1.2, 2.0], help="table sizes x RAM")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--lookahead", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-checkpoint-above", type=float, default=1.5,
                   help="sizes above this (x RAM) skip the checkpoint (as much disk again)")  # fmt: skip
    p.add_argument("--case-size", type=float, help=argparse.SUPPRESS)
    p.add_argument("--case-host", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case_size is not None:
        print(json.dumps(run_case(args)))
        return
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    cases = [(s, "mmap") for s in args.sizes]
    cases.insert(0, (min(args.sizes), "memory"))
    results = []
    for size, host in cases:
        passed = ("dir", "dim", "batch", "ratio", "lookahead", "steps", "warmup")
        cmd = [sys.executable, __file__, *(f"--{k}={getattr(args, k)}" for k in passed),
               f"--case-size={size}", f"--case-host={host}"]  # fmt: skip
        if size <= args.no_checkpoint_above:
            cmd.append("--checkpoint")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"case {size}x RAM, host={host} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"\n{platform.node()}, {os.cpu_count()} cores, {ram / GIB:.1f} GiB RAM, dim {args.dim}, "
          f"batch {args.batch}, ratio {args.ratio}, {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| size | host | table GB | init s | ids | samples/s | disk read B / missed row | disk write B / "
          "written row | peak RSS / anon GiB | save s (peak anon) | load s (peak anon) |")  # fmt: skip
    print("|" + " --- |" * 11)
    for r in results:
        for dist in ("uniform", "zipf"):
            d = r[dist]
            ck = [
                f"{r[k]['s']:.0f} ({r[k]['peak_anon_gb']:.2f})" if k in r else "-" for k in ("save", "load")
            ]
            print(f"| {r['size_x_ram']}x | {r['host']} | {r['table_gb']:.1f} | {r['init']['s']:.0f} | "
                  f"{dist} | {d['samples_per_s']:,.0f} | {d['disk_read_bytes_per_row_loaded']:,.0f} | "
                  f"{d['disk_write_bytes_per_row_written']:,.0f} | {d['peak_rss_gb']:.1f} / "
                  f"{d['peak_anon_gb']:.2f} | {ck[0]} | {ck[1]} |")  # fmt: skip


if __name__ == "__main__":
    main()
