"""dlrm-preprocess against the floor (a bare pyarrow.csv read of the same file) and against TorchRec's
own tool (``BinaryCriteoUtils.tsv_to_npys`` + ``sparse_to_contiguous``), side by side on one input;
the pipeline in this process, and the command as users run it (its start-up included); then peak
memory for growing inputs at a fixed chunk size.

    .venv/bin/python scripts/bench_preprocess.py [--rows 500000,2000000] [--torchrec-rows 100000] [--repeat 3]

Each input size in ``--rows`` gets its own file and its own comparison: the pipeline has costs that do
not grow with the rows (the skew plot, ~0.5 s of matplotlib; the vocabulary, which grows with the
distinct values), and the bare read does not scale linearly either (``read_csv`` holds the whole table).
TorchRec's tool parses line by line in Python, so it runs once, on the first ``--torchrec-rows`` rows of
the first file (rows/s is what is compared). Peak memory is each run's VmHWM, in a fresh process.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from dlrm_cache.config import PreprocessOptions, PreprocessRunConfig, SynthConfig
from dlrm_cache.criteo import LABELED_COLUMNS
from dlrm_cache.data.preprocess import preprocess
from dlrm_cache.data.synthetic import generate


def bare_read(path: Path) -> float:
    t0 = time.perf_counter()
    pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=LABELED_COLUMNS),
        parse_options=pacsv.ParseOptions(delimiter="\t"),
    )
    return time.perf_counter() - t0


def pipeline(path: Path, out: Path, chunk_mb: int = 32) -> float:
    cfg = PreprocessRunConfig(
        input=[str(path)],
        output_dir=str(out),
        overwrite=True,
        preprocess=PreprocessOptions(chunk_mb=chunk_mb, progress=False),
    )
    t0 = time.perf_counter()
    preprocess(cfg)
    return time.perf_counter() - t0


def fresh(call: str) -> float:
    """Seconds of ``call`` (``bare_read(...)`` or ``pipeline(...)``) in a fresh process, timed after its
    module imports but with whatever it loads lazily (matplotlib, the C++ helpers) inside the time, as
    in a user's one run; in this process a second run would find all that loaded already."""
    code = f"import sys; sys.path.insert(0, 'scripts'); from bench_preprocess import *; print({call})"
    return float(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


def command(path: Path, out: Path) -> float:
    """The ``dlrm-preprocess`` command from start to exit: the pipeline plus the start-up users wait for."""
    exe = Path(sys.executable).with_name("dlrm-preprocess")
    args = [str(exe), f"input={path}", f"output_dir={out}", "overwrite=true", "preprocess.progress=false"]
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0


def torchrec_tool(path: Path, rows: int, tmp: Path) -> float:
    from torchrec.datasets.criteo import BinaryCriteoUtils

    head = tmp / "day_0"
    with open(path) as src, open(head, "w") as dst:
        for _ in range(rows):
            dst.write(src.readline())
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per column and file
        BinaryCriteoUtils.tsv_to_npys(
            str(head), str(tmp / "d.npy"), str(tmp / "day_0_sparse.npy"), str(tmp / "l.npy")
        )
        BinaryCriteoUtils.sparse_to_contiguous(
            [str(tmp / "day_0_sparse.npy")], str(tmp), frequency_threshold=0
        )
    return time.perf_counter() - t0


def peak_rss_mb(path: Path, out: Path, chunk_mb: int) -> float:
    """The pipeline's peak resident memory, in a fresh process: its VmHWM. (Not getrusage's ru_maxrss,
    which a child started from this process inherits: that read this process's own size.)"""
    code = (
        "import sys; sys.path.insert(0, 'scripts'); from bench_preprocess import pipeline; "
        f"from pathlib import Path; pipeline(Path({str(path)!r}), Path({str(out)!r}), {chunk_mb}); "
        "print(next(line for line in open('/proc/self/status') if line.startswith('VmHWM')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-2]) / 1024  # "VmHWM:   123456 kB"


def plot(path: str, timings: dict[int, dict[str, float]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.09, 0.14, 0.88, 0.76))
    tools = list(next(iter(timings.values())))
    width = 0.8 / len(tools)
    for j, tool in enumerate(tools):
        xs = [i + (j - (len(tools) - 1) / 2) * width for i in range(len(timings))]
        ys = [secs[tool] for secs in timings.values()]
        ax.bar(xs, ys, width, label=tool.replace(" (*)", " (extrapolated)"))
        for x, y in zip(xs, ys, strict=True):
            ax.text(x, y, f"{y:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(timings)), [f"{n:,} rows" for n in timings])
    ax.set_yscale("log")
    ax.set_ylim(top=max(max(secs.values()) for secs in timings.values()) * 4)  # room for the legend
    ax.set_ylabel("seconds (log scale)")
    ax.set_title("preprocessing Criteo-format TSV (full Kaggle cardinalities) into Parquet", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="500000,2000000", help="input sizes, comma-separated")
    ap.add_argument("--torchrec-rows", type=int, default=100_000)
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--plot", help="a PNG of the seconds of each tool per input size")
    args = ap.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    print(f"{platform.machine()}, {os.cpu_count()} cores, pyarrow {pa.__version__}")
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        theirs = None
        timings = {}
        for n_rows in sizes:
            src = tmp / "train.txt"
            generate(SynthConfig(rows=n_rows, out=str(src), progress=False))
            mb = src.stat().st_size / 1e6
            print(f"input: {n_rows:,} rows, {mb:.0f} MB (dlrm-synth, full Kaggle cardinalities)")
            if theirs is None:
                (tmp / "tr").mkdir()
                theirs = args.torchrec_rows / torchrec_tool(src, args.torchrec_rows, tmp / "tr")
            # The VM's speed drifts: the three are timed in turn, --repeat times, each in a fresh
            # process, and each keeps its median.
            runs = []
            for _ in range(args.repeat):
                read, run = (
                    fresh(f"bare_read(Path({str(src)!r}))"),
                    fresh(f"pipeline(Path({str(src)!r}), Path({str(tmp / 'out')!r}))"),
                )
                runs.append((read, run, command(src, tmp / "cli")))
            floor, ours, cli = (statistics.median(r[k] for r in runs) for k in range(3))
            secs = {
                "bare pyarrow.csv read": floor,
                "dlrm-preprocess (the pipeline)": ours,
                "dlrm-preprocess command, start to exit": cli,
                "torchrec tsv_to_npys + sparse_to_contiguous (*)": n_rows / theirs,
            }
            print(f"median of {args.repeat} runs each; (*) one run on the first {args.torchrec_rows:,} rows,")
            print("    its seconds here extrapolated from its rows/s")
            for name, s in secs.items():
                print(f"{name:60s} {s:7.2f} s {n_rows / s:>12,.0f} rows/s {s / floor:6.2f}x floor")
            print(f"pipeline: {ours / floor:.2f}x the floor, {n_rows / ours / theirs:.2f}x TorchRec's rows/s")
            timings[n_rows] = secs
            src.unlink()
        if args.plot:
            plot(args.plot, timings)
        if args.memory:
            # Peak memory is the chunks' (bounded by chunk_mb) plus the vocabulary (the id maps, which
            # grow with the distinct values seen, not with the rows): at full Kaggle cardinalities a
            # longer input still brings new values; at 1% of them the vocabulary is soon complete.
            print("peak RSS of dlrm-preprocess, chunk_mb=8:")
            for scale in (1.0, 0.01):
                for n in (sizes[0] // 4, sizes[0], 2 * sizes[0]):
                    path, out = tmp / f"m{n}.txt", tmp / f"mo{n}-{scale}"
                    generate(SynthConfig(rows=n, out=str(path), progress=False, cardinality_scale=scale))
                    peak = peak_rss_mb(path, out, 8)
                    vocab = sum(json.loads((out / "metadata.json").read_text())["vocab_sizes"].values())
                    print(f"  cardinality_scale={scale:<5} {n:>10,} rows: {peak:6.0f} MB", end=", ")
                    print(f"vocabulary {vocab:>10,} ids")
                    path.unlink()


if __name__ == "__main__":
    main()
