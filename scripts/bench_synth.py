"""Throughput of dlrm-synth (target: >= 1M rows/minute on a 2-core machine).

    .venv/bin/python scripts/bench_synth.py [--rows 1000000]

Writes to a temporary folder, prints rows/s and rows/min for plain and gzip output at the full
Criteo Kaggle cardinalities. Figures go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from dlrm_cache.config import SynthConfig
from dlrm_cache.data.synthetic import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        for gz in (False, True):
            out = Path(tmp) / ("train.txt.gz" if gz else "train.txt")
            t0 = time.perf_counter()
            generate(SynthConfig(rows=args.rows, out=str(out), gzip=gz, progress=False))
            dt = time.perf_counter() - t0
            mb = out.stat().st_size / 1e6
            rate = args.rows / dt
            kind = "gzip " if gz else "plain"
            print(f"{kind}: {args.rows:,} rows in {dt:.2f} s = {rate:,.0f} rows/s", end=" ")
            print(f"= {rate * 60 / 1e6:.1f}M rows/min, {mb:.0f} MB")


if __name__ == "__main__":
    main()
