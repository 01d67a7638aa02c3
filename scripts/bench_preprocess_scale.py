"""dlrm-preprocess out of core against in memory on a generated Criteo 1TB-profile dataset: peak
resident memory of the whole command (all its processes), time, and the outputs compared byte for byte.

    .venv/bin/python scripts/bench_preprocess_scale.py [--rows 8000000 --zipf 0.6 --memory-gb 1
        --chunk-mb 16 --min-count 3 --dir /work/bench_tmp/pp_scale --repeats 2]
    .venv/bin/python scripts/bench_preprocess_scale.py --rows 2000000,4000000,8000000,16000000 \
        --repeats 1 --plot docs/img/preprocess_memory.png
    .venv/bin/python scripts/bench_preprocess_scale.py --rows 16000000 --workers 1,2 --repeats 2

``--workers``: out of core only, at each ``preprocess.workers`` in alternation: the time of each phase
(parse, rank, ids passes, write; from the progress bars), rows per second, the Criteo 1TB time
extrapolated from it (4,373,472,329 rows), and the scaling from the first count to the others.

The default input (8M rows, Zipf 0.6 over the 1TB cardinalities) has ~39M distinct values: about 4
GB of counters in memory, 4x the 1 GB budget.

Runs alternate (in memory, out of core, in memory, ...) on the same input. Peak memory is the
command's resident memory, all its processes together, sampled every 20 ms from /proc.
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


def _tree_rss(root: int) -> int:
    """Resident bytes of process ``root`` and all its descendants, now (from /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
        rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run_measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int, float, dict[str, dict]]:
    """Run ``cmd``; its peak resident memory, all its processes together (sampled every 20 ms), its
    wall time, and the seconds and peak GiB of each phase its progress bars name (``dlrm-preprocess
    parse`` ...)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    phases: dict[str, dict] = {}
    current = ["start"]
    err: list[bytes] = []

    def watch() -> None:  # the phase named by the latest progress line, and when it began
        began, line = time.perf_counter(), b""
        for byte in iter(lambda: proc.stderr.read(1), b""):
            err.append(byte)
            if byte not in b"\r\n":
                line += byte
                continue
            found = re.search(rb"(?:dlrm-preprocess |^)(parse|rank|ids \d+/\d+|write)\b", line)
            if found and found[1].decode() != current[0]:
                now = time.perf_counter()
                phases.setdefault(current[0], {"s": 0.0, "peak_gib": 0.0})["s"] += now - began
                current[0], began = found[1].decode(), now
            line = b""
        phases.setdefault(current[0], {"s": 0.0, "peak_gib": 0.0})["s"] += time.perf_counter() - began

    reader = threading.Thread(target=watch)
    reader.start()
    peak = 0
    while proc.poll() is None:
        now = _tree_rss(proc.pid)
        peak = max(peak, now)
        phase = phases.setdefault(current[0], {"s": 0.0, "peak_gib": 0.0})
        phase["peak_gib"] = max(phase["peak_gib"], now / 2**30)
        time.sleep(0.02)
    reader.join()
    out = proc.stdout.read().decode()
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, b"".join(err).decode(errors="replace"))
    rounded = {k: {"s": round(v["s"], 2), "peak_gib": round(v["peak_gib"], 3)} for k, v in phases.items()}
    return done, peak, time.perf_counter() - t, rounded


IN_MEMORY_GB = 1000  # a budget no counter reaches here: the in-memory path


def preprocess(
    src: Path, out: Path, memory_gb: float, min_count: int, chunk_mb: int, workers: int = 0
) -> dict:
    cmd = [sys.executable, "-m", "dlrm_cache.cli.preprocess",
           f"input={src}/day_*", f"output_dir={out}", "overwrite=true", "dataset=criteo_1tb",
           f"preprocess.min_count={min_count}", f"preprocess.memory_gb={memory_gb}",
           f"preprocess.chunk_mb={chunk_mb}", f"preprocess.workers={workers}",
           "preprocess.progress=true"]  # fmt: skip
    proc, peak, seconds, phases = run_measured(cmd)
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    spilled = [line for line in proc.stderr.splitlines() if "out of core" in line]
    return {"memory_gb": memory_gb, "workers": workers, "peak_rss_gb": peak / 2**30, "seconds": seconds,
            "phases": phases, "out_of_core": spilled[0].split(": ", 1)[-1] if spilled else None}  # fmt: skip


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "metadata.json"}  # fmt: skip


TERABYTE_ROWS = 4_373_472_329  # Criteo 1TB's 24 days


def generated(rows: int, args: argparse.Namespace) -> tuple[Path, dict]:
    """The input of ``rows`` rows (generated once) and what describes the run."""
    folder = args.dir / f"rows{rows}"
    src = folder / "days"
    if not src.exists():
        subprocess.run([sys.executable, "-m", "dlrm_cache.cli.synth", f"rows={rows}", f"out={src}",
                        "cardinalities=terabyte", f"days={args.days}", f"zipf={args.zipf}", "progress=false"],
                       check=True)  # fmt: skip
    size = sum(f.stat().st_size for f in src.iterdir())
    head = {
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "zipf": args.zipf,
        "input_gb": size / 2**30,
        "min_count": args.min_count,
    }
    print(json.dumps(head))
    return src, head


def measure_workers(rows: int, args: argparse.Namespace) -> dict:
    """Out of core at each worker count, in alternation: phases, rows/s, the 1TB time, the scaling."""
    src, head = generated(rows, args)
    counts = [int(w) for w in args.workers.split(",")]
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    for i in range(args.repeats):
        for w in counts:
            r = preprocess(
                src, args.dir / f"rows{rows}" / f"w{w}", args.memory_gb, args.min_count, args.chunk_mb, w
            )
            runs[w].append(r)
            print(json.dumps({"run": i, **r}), flush=True)
    best = {w: min(runs[w], key=lambda r: r["seconds"]) for w in counts}
    summary = {
        **head,
        "memory_gb": args.memory_gb,
        "seconds": {w: b["seconds"] for w, b in best.items()},
        "phases": {w: b["phases"] for w, b in best.items()},
        "rows_per_s": {w: rows / b["seconds"] for w, b in best.items()},
        "terabyte_hours": {w: TERABYTE_ROWS / (rows / b["seconds"]) / 3600 for w, b in best.items()},
        "speedup_over_first": {w: best[counts[0]]["seconds"] / b["seconds"] for w, b in best.items()},
        "peak_rss_gb": {w: max(r["peak_rss_gb"] for r in runs[w]) for w in counts},
    }
    print(json.dumps(summary), flush=True)
    for w in counts:
        shutil.rmtree(args.dir / f"rows{rows}" / f"w{w}")
    return summary


def measure(rows: int, args: argparse.Namespace) -> dict:
    """One input size: the runs in alternation, then whether the outputs match."""
    src, head = generated(rows, args)
    folder = args.dir / f"rows{rows}"
    runs = {"in_memory": [], "out_of_core": []}
    for i in range(args.repeats):
        for kind, gb in (("in_memory", IN_MEMORY_GB), ("out_of_core", args.memory_gb)):
            r = preprocess(src, folder / kind, gb, args.min_count, args.chunk_mb)
            runs[kind].append(r)
            print(json.dumps({"run": i, "kind": kind, **r}), flush=True)
    same = files(folder / "in_memory") == files(folder / "out_of_core")
    meta = json.loads((folder / "in_memory" / "metadata.json").read_text())
    best = {k: min(r["seconds"] for r in v) for k, v in runs.items()}
    summary = {
        **head,
        "identical_outputs": same,
        "kept_values": sum(meta["vocab_sizes"].values()),
        "out_of_core_over_in_memory_time": best["out_of_core"] / best["in_memory"],
        "peak_rss_gb": {k: max(r["peak_rss_gb"] for r in v) for k, v in runs.items()},
        "seconds": best,
    }
    print(json.dumps(summary), flush=True)
    for kind in runs:
        shutil.rmtree(folder / kind)
    return summary


def plot(path: str, sizes: list[dict], budget_gb: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.11, 0.14, 0.85, 0.76))
    x = [s["input_gb"] for s in sizes]
    for kind, label in (("in_memory", "in memory"), ("out_of_core", f"out of core, memory_gb={budget_gb:g}")):
        ax.plot(x, [s["peak_rss_gb"][kind] for s in sizes], marker="o", label=label)
    ax.axhline(budget_gb, color="k", ls=":", lw=1, label="the budget (memory_gb, GiB)")
    ax.set_xlabel("input, GiB of TSV (Criteo 1TB profile, Zipf 0.6, 24 days)")
    ax.set_ylabel("peak resident memory, GiB (all processes)")
    ax.set_title("dlrm-preprocess peak memory against input size", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="8000000", help="input sizes, comma-separated")
    p.add_argument("--zipf", type=float, default=0.6)
    p.add_argument("--chunk-mb", type=int, default=16)
    p.add_argument("--days", type=int, default=24)
    p.add_argument("--memory-gb", type=float, default=1.0)
    p.add_argument("--min-count", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", type=Path, default=Path("/work/bench_tmp/pp_scale"))
    p.add_argument("--plot", help="a PNG of peak memory against input size")
    p.add_argument("--workers", help="worker counts, comma-separated: out of core only, timed by phase")
    args = p.parse_args()
    if args.workers:
        for n in args.rows.split(","):
            measure_workers(int(n), args)
        return
    sizes = [measure(int(n), args) for n in args.rows.split(",")]
    if args.plot:
        plot(args.plot, sizes, args.memory_gb)


if __name__ == "__main__":
    main()
