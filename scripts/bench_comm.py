"""Bytes per training step of TorchRec's table-wise sharding, of ours, and of the hybrid split: modeled
for 2-64 ranks, measured on gloo processes; and step time on 2 processes.

    .venv/bin/python scripts/bench_comm.py [--dim 64] [--rows 200000 --scale 0.01 --steps 30]
        [--data PREPROCESSED_DIR] [--plot docs/img/comm_vs_hot_rows.png] [--skip-measured]

Modeled: the Kaggle cardinalities with Zipf 1.05 counts (a row's expected share of its table's
lookups), and ``--data``'s own frequency curves if given; global batches 2,048 and 16,384; TorchRec's
table-wise sharding moves the same tensors as ours (its input and output distribution, whatever the
kernel), which the measured rows show. Measured: ``dlrm-train`` on a generated dataset under torchrun
(2 and 4 gloo processes), ``summary.json``'s ``comm`` figures, next to TorchRec's stock table-wise
``EmbeddingBagCollection`` (FBGEMM kernel) on the same batches, counted the same way.
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
from contextlib import closing
from pathlib import Path

import numpy as np

from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig, NetworkConfig
from dlrm_cache.criteo import KAGGLE_CARDINALITIES
from dlrm_cache.distributed import comm_model
from dlrm_cache.distributed.hybrid_plan import network, plan_hybrid
from dlrm_cache.distributed.table_stats import TableStats

RANKS, BATCHES = (2, 4, 8, 64), (2048, 16384)
TRAIN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def zipf_tables(dim: int, s: float = 1.05) -> list[TableStats]:
    return [
        TableStats(f"t_cat_{i}", n, dim, 1, 1e9 / np.arange(1, n + 1, dtype=np.float64) ** s)
        for i, n in enumerate(KAGGLE_CARDINALITIES)
    ]


def network_us(b: comm_model.StepBytes, net: comm_model.Network, w: int) -> float:
    """Microseconds a rank spends sending its share of the step's network bytes."""
    return comm_model.StepBytes(b.all_to_all, b.all_reduce).seconds(net, w) * 1e6


def modeled(tables: list[TableStats], label: str, cache: CacheConfig, opt: SparseOptimizer) -> list[dict]:
    rows = []
    net = network(NetworkConfig())
    for w in RANKS:
        for g in BATCHES:
            plan = plan_hybrid(tables, w, g, cache, opt, NetworkConfig())
            tw = plan.table_wise.network
            hot = sum(plan.hot_rows.values())
            rows.append({
                "curves": label, "ranks": w, "global_batch": g, "table_wise_bytes": tw,
                "hybrid_bytes": plan.predicted.network, "hybrid_all_to_all": plan.predicted.all_to_all,
                "hybrid_all_reduce": plan.predicted.all_reduce, "dense_sync_bytes": plan.dense_sync_bytes,
                "ratio": plan.predicted.network / tw, "hot_rows": hot,
                "table_wise_us": network_us(plan.table_wise, net, w),
                "hybrid_us": network_us(plan.predicted, net, w),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(tables, cache, opt, path: Path, w: int = 8, g: int = 2048) -> None:
    """Modeled network bytes against a fixed share of every table's rows replicated, the chosen split
    marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    net = network(NetworkConfig())
    row_bytes = 4 * (tables[0].dim + opt.state_width(tables[0].dim))
    shares = np.concatenate([[0.0], np.geomspace(1e-6, 1.0, 60)])
    totals, hots = [], []
    for share in shares:
        hot = {t.name: int(share * t.rows) for t in tables}
        c = comm_model.evaluate(tables, hot, w, g, row_bytes, net, lambda t, h: 0)
        totals.append(c.predicted.network / 1e6)
        hots.append(sum(hot.values()))
    plan = plan_hybrid(tables, w, g, cache, opt, NetworkConfig())
    chosen = sum(plan.hot_rows.values())
    tw = plan.table_wise.network / 1e6
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.maximum(hots, 1), totals, label="a fixed share of every table's rows")
    ax.axhline(tw, color="grey", ls="--", label=f"table-wise ({tw:.2f} MB)")
    ax.scatter([max(chosen, 1)], [plan.predicted.network / 1e6], color="red", zorder=3,
               label=f"chosen split ({plan.predicted.network / 1e6:.2f} MB, {chosen:,} rows)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("replicated rows, all tables")
    ax.set_ylabel("modeled network MB per step")
    ax.set_title(f"Kaggle cardinalities, Zipf 1.05, dim {tables[0].dim}, {w} ranks, global batch {g:,}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def train(root: Path, ranks: int, sharding: str, args, run_dir: Path) -> dict:
    cmd = [*TRAIN, f"--nproc_per_node={ranks}", "-m", "dlrm_cache.cli.train", f"data.path={root}",
           f"hydra.run.dir={run_dir}", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
           f"model.embedding_dim={args.dim}", f"trainer.sharding={sharding}", "train.log_every=10",
           f"model.dense_arch_layer_sizes=[64,{args.dim}]", "optim.sparse=adagrad"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return json.loads((run_dir / "summary.json").read_text())


def torchrec_worker(root: str, steps: int, batch: int, dim: int) -> None:
    """One rank of TorchRec's stock table-wise EmbeddingBagCollection, its collective bytes counted."""
    import torch
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from dlrm_cache.criteo import CAT_COLUMNS, table_name
    from dlrm_cache.data.loader import ParquetBatches, load_metadata
    from dlrm_cache.distributed.comm_counter import CommCounter

    dist.init_process_group("gloo")
    rank, w = dist.get_rank(), dist.get_world_size()
    meta = load_metadata(Path(root))
    sizes = meta["vocab_sizes"]
    configs = [EmbeddingBagConfig(num_embeddings=sizes[f], embedding_dim=dim, name=table_name(f),
                                  feature_names=[f]) for f in CAT_COLUMNS]  # fmt: skip
    ebc = EmbeddingBagCollection(configs, device=torch.device("meta"))
    constraints = {c.name: ParameterConstraints(sharding_types=["table_wise"]) for c in configs}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=w, compute_device="cpu"), constraints=constraints
    )
    sharder = EmbeddingBagCollectionSharder()
    plan = planner.collective_plan(ebc, [sharder], dist.group.WORLD)
    model = DistributedModelParallel(ebc, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                     device=torch.device("cpu"), plan=plan, sharders=[sharder])  # fmt: skip
    counter = CommCounter()
    counter.install()
    loader = ParquetBatches(Path(root), "train", batch, rank=rank, world_size=w)
    done = 0
    with closing(loader.batches(epoch=0)) as stream:  # stops the loader's reading thread
        for b in stream:
            with counter.step():
                model(b.sparse_features).values().sum().backward()
            done += 1
            if done == steps:
                break
    totals = counter.totals()
    if rank == 0:
        print("TORCHREC " + json.dumps({k: v / done for k, v in totals.items()}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # At interpreter exit some runs of this stock module abort in a C++ thread's destructor
    # ("terminate called without an active exception"), after all work is done: leave at once.
    sys.stdout.flush()
    os._exit(0)


def torchrec_bytes(root: Path, ranks: int, args) -> dict:
    cmd = [*TRAIN, f"--nproc_per_node={ranks}", __file__, "--worker", str(root), str(args.steps),
           str(args.batch), str(args.dim)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("TORCHREC ")]
    if proc.returncode or not line:
        sys.exit(proc.stderr[-3000:])
    return json.loads(line[0][len("TORCHREC ") :])


def measured(args) -> list[dict]:
    from dlrm_cache.data.default_dataset import synthetic_dataset

    out = []
    with tempfile.TemporaryDirectory(prefix="bench_comm_") as tmp:
        root = synthetic_dataset(Path(tmp) / "data", args.rows, args.scale, seed=0, progress=False)
        for ranks in (2, 4):
            stock = torchrec_bytes(root, ranks, args)
            row = {"ranks": ranks, "torchrec_table_wise_all_to_all": stock["all_to_all"]}
            for sharding in ("table_wise", "hybrid"):
                s = train(root, ranks, sharding, args, Path(tmp) / f"{sharding}{ranks}")
                c = s["comm"]
                keys = ("all_to_all_bytes_per_step", "all_reduce_bytes_per_step", "predicted_bytes_per_step",
                        "dense_all_reduce_bytes_per_step")  # fmt: skip
                row[sharding] = {k: c[k] for k in keys}
            tw, hy = row["table_wise"], row["hybrid"]
            net = lambda c: c["all_to_all_bytes_per_step"] + c["all_reduce_bytes_per_step"]  # noqa: E731
            row["hybrid_over_table_wise"] = net(hy) / net(tw)
            row["hybrid_model_error"] = hy["predicted_bytes_per_step"] / net(hy) - 1
            out.append(row)
            print(json.dumps(row), flush=True)
        # step time on 2 processes, table-wise and hybrid in alternation
        rates = {"table_wise": [], "hybrid": []}
        for i in range(args.repeats):
            for sharding in rates:
                s = train(root, 2, sharding, args, Path(tmp) / f"time{sharding}{i}")
                rates[sharding].append(s["train_samples_per_s"])
        timing = {k: float(np.median(v)) for k, v in rates.items()}
        timing["hybrid_over_table_wise"] = timing["hybrid"] / timing["table_wise"]
        print(json.dumps({"samples_per_s_2_gloo": timing, "runs": rates}), flush=True)
        out.append({"samples_per_s_2_gloo": timing})
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        torchrec_worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--scale", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, help="a dlrm-preprocess output: model its own curves too")
    p.add_argument("--plot", type=Path, default=Path("docs/img/comm_vs_hot_rows.png"))
    p.add_argument("--skip-measured", action="store_true")
    args = p.parse_args()
    cache, opt = CacheConfig(), SparseOptimizer("adagrad")
    machine = f"{platform.node()} {os.cpu_count()} cores"
    print(
        json.dumps(
            {"machine": machine, "date": time.strftime("%Y-%m-%d"), "dim": args.dim, "optimizer": opt.kind}
        )
    )
    tables = zipf_tables(args.dim)
    modeled(tables, "kaggle zipf 1.05", cache, opt)
    if args.data:
        from dlrm_cache.criteo import CAT_COLUMNS, table_name
        from dlrm_cache.distributed.table_stats import load_table_stats

        names = {table_name(f): f for f in CAT_COLUMNS}
        modeled(
            load_table_stats(args.data, names, dict.fromkeys(names, args.dim)), str(args.data), cache, opt
        )
    plot(tables, cache, opt, args.plot)
    if not args.skip_measured:
        measured(args)


if __name__ == "__main__":
    main()
