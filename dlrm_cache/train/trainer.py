"""``dlrm-train``'s work: train a DLRM / DCN over the cached embeddings, evaluate, checkpoint.

One process, or several under ``torchrun`` (then, or with ``trainer.sharded=true``, the tables are
sharded by TorchRec's ``DistributedModelParallel`` with the cache as their kernel, placed by the
planner; see ``dlrm_cache.distributed``). A step:

    cache.enqueue(global batch t + lookahead)  # the cache sees the future ids
    logits = model(dense, sparse)              # cache: plan (prefetched), gather, pool
    cache.prefetch()                           # plan + load batch t+1 in the background
    loss.backward()                            # the sparse update is fused here
    dense_optimizer.step(); lr schedule

Outputs go to ``run_dir`` (written by rank 0; every rank writes its tables' checkpoint files):
``metrics.jsonl``, ``summary.json``, ``curves.png`` (loss and val AUC against steps), ``tensorboard/``
(``train.tensorboard``), ``checkpoint/``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torchmetrics
from torch.nn.parallel import DistributedDataParallel
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from tqdm import tqdm

from dlrm_cache.cache import CachedEmbeddingBagCollection, SparseOptimizer
from dlrm_cache.config import CacheConfig, TrainRunConfig
from dlrm_cache.criteo import CAT_COLUMNS, table_name
from dlrm_cache.data.loader import ParquetBatches, load_metadata
from dlrm_cache.data.preprocess import synthetic_dataset
from dlrm_cache.distributed import checkpoint as ckpt
from dlrm_cache.distributed.comm_counter import CommCounter
from dlrm_cache.distributed.comm_model import StepBytes, sharded_bytes
from dlrm_cache.distributed.hot_rows import HotRows
from dlrm_cache.distributed.hybrid import HybridEmbeddingBagCollection, HybridLayout
from dlrm_cache.distributed.hybrid_plan import HybridPlan, plan_hybrid
from dlrm_cache.distributed.planner import CachePlan, TableStats, fit_to_batch, load_table_stats, plan_cache
from dlrm_cache.distributed.rank import Rank, current_rank
from dlrm_cache.distributed.runtime import (
    SPARSE_ARCH,
    ShardedCache,
    init_process_group,
    shard_hybrid_model,
    shard_model,
)
from dlrm_cache.distributed.sharder import CachedEmbeddingBagCollectionSharder
from dlrm_cache.train.curves import plot_curves
from dlrm_cache.train.errors import TrainingError
from dlrm_cache.train.model import dlrm_model, table_configs
from dlrm_cache.train.tensorboard_log import TensorBoardLog

log = logging.getLogger(__name__)


def default_dataset(cfg: TrainRunConfig) -> Path:
    """The built-in default: synthetic Criteo data, generated and preprocessed once."""
    d = cfg.data
    return synthetic_dataset(Path(d.synthetic_dir), d.synthetic_rows, d.synthetic_cardinality_scale, cfg.seed)


def _tables(cfg: TrainRunConfig, meta: dict) -> list[EmbeddingBagConfig]:
    return table_configs(cfg.model.embedding_dim, meta["vocab_sizes"])


def _sparse_optimizer(cfg: TrainRunConfig) -> SparseOptimizer:
    o = cfg.optim
    return SparseOptimizer(o.sparse, lr=o.sparse_lr, eps=o.eps, beta1=o.beta1, beta2=o.beta2)


def _dlrm(cfg: TrainRunConfig, ebc: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)  # dense init, the same on every rank
    return dlrm_model(cfg.model, ebc, device)


def plan_tables(
    cfg: TrainRunConfig, root: Path, world_size: int, sharded: bool = True
) -> tuple[CachePlan | HybridPlan, StepBytes]:
    """The planner's placement and cache sizes from the dataset's frequency statistics, and the bytes
    the cost model expects a step to send (unsharded: placement on one rank, whatever the sharding)."""
    stats = _table_stats(cfg, root)
    t = cfg.trainer
    if t.sharding == "hybrid" and sharded:
        plan = plan_hybrid(
            stats, world_size, cfg.train.batch_size, cfg.cache, _sparse_optimizer(cfg), t.network, t.hot_rows
        )
        return plan, plan.predicted
    plan = plan_cache(
        stats,
        world_size,
        _fit_to_batch(cfg, stats),
        _sparse_optimizer(cfg),
        t.sharding if sharded else "table_wise",
    )
    return plan, StepBytes(sharded_bytes(stats, plan.sharding, cfg.train.batch_size, world_size))


def _fit_to_batch(cfg: TrainRunConfig, stats: list[TableStats]) -> CacheConfig:
    """``cfg.cache`` with the caches ``cache.ratio`` leaves smaller than a step needs raised to fit
    (``planner.fit_to_batch``; sized by ``cache.device_budget_gb``, the planner decides instead)."""
    if cfg.cache.device_budget_gb or cfg.cache.policy == "none":
        return cfg.cache
    fitted, raised = fit_to_batch(cfg.cache, stats, cfg.train.batch_size)
    if raised and current_rank().rank == 0:
        log.info(
            "cache.ratio=%g leaves %d table(s) smaller than a step needs (the distinct rows of two batches "
            "of %d): raised to fit, %s; cache.table_ratios.<table> keeps a size you choose",
            cfg.cache.ratio, len(raised), cfg.train.batch_size,
            ", ".join(f"{t} {a:,} -> {b:,} rows" for t, (a, b) in raised.items()),
        )  # fmt: skip
    return fitted


def fitted_cache(cfg: TrainRunConfig, root: Path) -> CacheConfig:
    """The unsharded run's cache settings, fitted to its batch from the dataset's statistics."""
    if cfg.cache.device_budget_gb or cfg.cache.policy == "none":
        return cfg.cache
    return _fit_to_batch(cfg, _table_stats(cfg, root))


def _table_stats(cfg: TrainRunConfig, root: Path) -> list[TableStats]:
    tables = {table_name(f): f for f in CAT_COLUMNS}
    return load_table_stats(root, tables, {t: cfg.model.embedding_dim for t in tables})


def build_model(
    cfg: TrainRunConfig, meta: dict, device: torch.device, cache: CacheConfig | None = None
) -> tuple[torch.nn.Module, CachedEmbeddingBagCollection]:
    """The unsharded model, with ``cache`` (default ``cfg.cache``) as its cache settings."""
    cache = cache or cfg.cache
    ebc = CachedEmbeddingBagCollection(
        _tables(cfg, meta), cache, _sparse_optimizer(cfg), device, seed=cfg.seed
    )
    return _dlrm(cfg, ebc, device), ebc


def build_sharded_model(
    cfg: TrainRunConfig, meta: dict, device: torch.device, plan: CachePlan | HybridPlan
) -> tuple[torch.nn.Module, ShardedCache]:
    """The model sharded over the process group by ``plan`` (collective: every rank calls it)."""
    optimizer = _sparse_optimizer(cfg)
    if isinstance(plan, HybridPlan):
        configs = _tables(cfg, meta)
        hot = HotRows(configs, plan.hot_rows, optimizer, device, seed=cfg.seed, group=dist.new_group())
        at = {name: hot.row_offset(name) for name in hot.names}
        layout = HybridLayout(configs, plan.hot_rows, plan.owners, at)
        ebc = HybridEmbeddingBagCollection(configs, layout, hot)
        sharder = CachedEmbeddingBagCollectionSharder(
            plan.cache, optimizer, seed=cfg.seed, cold_tables=layout.cold_tables
        )
        return shard_hybrid_model(_dlrm(cfg, ebc, device), plan, sharder, device)
    ebc = EmbeddingBagCollection(_tables(cfg, meta), device=torch.device("meta"))
    sharder = CachedEmbeddingBagCollectionSharder(plan.cache, optimizer, seed=cfg.seed)
    return shard_model(_dlrm(cfg, ebc, device), plan, sharder, device)


def lr_factor(step: int, cfg: TrainRunConfig) -> float:
    """The DLRM reference schedule: linear warm-up, constant, then polynomial (power 2) decay."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.decay_steps and step >= o.decay_start:
        return max(0.0, 1 - (step - o.decay_start) / o.decay_steps) ** 2
    return 1.0


def _dense_optimizer(cfg: TrainRunConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.dense == "sgd":
        return torch.optim.SGD(params, lr=o.dense_lr)
    if o.dense == "adagrad":
        return torch.optim.Adagrad(params, lr=o.dense_lr, eps=o.eps)
    return torch.optim.Adam(params, lr=o.dense_lr, betas=(o.beta1, o.beta2), eps=o.eps)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: ParquetBatches, device: torch.device) -> dict:
    """AUROC, log loss and normalized entropy over a whole split, over all ranks (the cache serves
    misses from the host, writes nothing). Padding rows (label -1, evening out a last batch over ranks)
    are left out. NE is the log loss over the entropy of the split's click rate: 1.0 is what always
    predicting that rate scores, lower is better (the figure CTR teams report beside AUC)."""
    model.eval()
    sharded = dist.is_initialized()
    auroc = torchmetrics.classification.BinaryAUROC(sync_on_compute=sharded).to(device)
    loss_sum, n, clicks = torch.zeros((), dtype=torch.float64), 0, 0.0
    for batch in loader.batches(epoch=0):
        logits = model(batch.dense_features.to(device), _sparse_input(batch, device, sharded)).squeeze(1)
        labels = batch.labels.to(device)
        real = labels >= 0
        logits, labels = logits[real], labels[real]
        loss_sum += torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="sum"
        ).cpu()
        n += len(labels)
        clicks += float(labels.sum())
        auroc.update(torch.sigmoid(logits), labels.long())
    model.train()
    totals = torch.tensor([float(loss_sum), n, clicks], dtype=torch.float64, device=device)  # NCCL: device
    if sharded:
        dist.all_reduce(totals)
    if totals[1] == 0:  # an empty split (a tiny dataset): nothing to score
        log.warning("the %s split is empty: no AUC or log loss", loader.split)
        return {"auc": float("nan"), "logloss": float("nan"), "ne": float("nan"), "samples": 0}
    logloss = float(totals[0] / totals[1])
    ne = logloss / _entropy(float(totals[2] / totals[1]))
    return {"auc": float(auroc.compute()), "logloss": logloss, "ne": ne, "samples": int(totals[1])}


def _entropy(rate: float) -> float:
    """Of a click rate, in nats (NaN for a split of one class, where NE is undefined)."""
    if rate <= 0 or rate >= 1:
        return float("nan")
    return -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))


def _sparse_input(batch, device: torch.device, sharded: bool):
    """The ids as the model takes them: on the host for the cache; on the device for TorchRec's input
    distribution when sharded (its all-to-all builds its splits where the ids are, and NCCL takes
    device tensors only)."""
    return batch.sparse_features.to(device, non_blocking=True) if sharded else batch.sparse_features


def _lookahead(local: Iterator, future: Iterator | None, cache, depth: int) -> Iterator:
    """Yield this rank's ``local`` batches while handing the cache the ids of the matching global
    batches (``future``; unsharded, the local batches are the global ones) ``depth`` batches ahead."""
    ahead: deque = deque()
    pairs = zip(local, future, strict=True) if future is not None else ((b, b) for b in local)
    for b, g in pairs:
        cache.enqueue(g.sparse_features)
        ahead.append(b)
        if len(ahead) > depth:
            yield ahead.popleft()
    yield from ahead


def _check_trainable(root: Path, meta: dict, batch_size: int) -> None:
    """Refuse, before any work, a dataset this run cannot train on."""
    if not any(meta.get("labeled", [True])):
        raise TrainingError(
            f"data.path={root}: the dataset has no labels (made from 39-field input); "
            "dlrm-train needs labelled data"
        )
    train_rows = meta["rows"]["train"]
    if train_rows < batch_size:
        raise TrainingError(
            f"data.path={root}: the train split has {train_rows} rows, fewer than one batch "
            f"(train.batch_size={batch_size}): no step would train"
        )


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """The keys (dotted) whose values differ between two nested configs, with both values."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} then, {b!r} now)")
    return out


def _keep_metrics_until(path: Path, step: int) -> None:
    """Drop the records a killed run wrote after its last checkpoint (they are trained again)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _record_step(line: str) -> float:
    """A metrics record's step; a line cut short by a kill counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError):
        return math.inf


def _comparable(cfg: TrainRunConfig) -> dict:
    """The config a resumed run must share with the run it continues (any number of ranks)."""
    d = asdict(cfg)
    d["train"] = {
        k: v for k, v in d["train"].items() if k not in ("resume", "max_steps", "epochs", "tensorboard")
    }
    placement = ("sharding", "sharded", "hot_rows", "network")
    d["trainer"] = {k: v for k, v in d["trainer"].items() if k not in placement}
    return d


def dense_state(model: torch.nn.Module) -> dict:
    """Everything but the embedding tables, under the unsharded model's names."""
    return {
        f"{name}.{k}": v
        for name, child in model.named_children()
        if name != SPARSE_ARCH
        for k, v in child.state_dict().items()
    }


def load_dense_state(model: torch.nn.Module, state: dict) -> None:
    for name, child in model.named_children():
        if name != SPARSE_ARCH:
            prefix = f"{name}."
            child.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})


def train(cfg: TrainRunConfig, run_dir: Path) -> dict:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the summary. Under ``torchrun`` every
    rank calls it, and all write into rank 0's ``run_dir``; the tables are then sharded (so they are
    with ``trainer.sharded=true``)."""
    rank = current_rank()
    sharded = rank.world_size > 1 or cfg.trainer.sharded
    device = torch.device(cfg.trainer.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("trainer.device=cuda but no CUDA device is available (use trainer=cpu)")
        if rank.local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"local rank {rank.local_rank} needs GPU {rank.local_rank}, but {torch.cuda.device_count()} "
                "are visible (CUDA_VISIBLE_DEVICES?): start at most one process per GPU"
            )
        device = torch.device("cuda", rank.local_rank)
        torch.cuda.set_device(device)
    if cfg.trainer.hot_rows and not (sharded and cfg.trainer.sharding == "hybrid"):
        raise TrainingError("trainer.hot_rows is read only by a sharded run with trainer.sharding=hybrid")
    early_plan = None  # bad hybrid settings are refused before any process group work
    if sharded and cfg.trainer.sharding == "hybrid" and cfg.data.path:
        early_plan = plan_tables(cfg, Path(cfg.data.path), rank.world_size)
    if sharded:
        init_process_group(device, rank, cfg.trainer.collective_timeout_min)
        # One run dir for all ranks: rank 0's (each rank's Hydra names its own, from its start time).
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    try:
        return _train(cfg, run_dir, rank, sharded, device, early_plan)
    finally:
        if sharded and dist.is_initialized():
            dist.destroy_process_group()


def _barrier(sharded: bool) -> None:
    if sharded:
        dist.barrier()


def _train(
    cfg: TrainRunConfig, run_dir: Path, rank: Rank, sharded: bool, device: torch.device, early_plan=None
) -> dict:
    lead = rank.rank == 0  # writes the outputs, prints
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.data.path:
        root = Path(cfg.data.path)
    else:  # made by rank 0; the others then find it made
        if lead:
            root = default_dataset(cfg)
        _barrier(sharded)
        if not lead:
            root = default_dataset(cfg)
    meta = load_metadata(root)
    bs = cfg.train.batch_size
    _check_trainable(root, meta, bs)
    pin = device.type == "cuda"
    shares = dict(rank=rank.rank, world_size=rank.world_size, pin_memory=pin)
    loaders = {
        "train": ParquetBatches(root, "train", bs, shuffle=cfg.data.shuffle, seed=cfg.seed, **shares),
        "val": ParquetBatches(root, "val", bs, drop_last=False, pad_shares=sharded, **shares),
        "test": ParquetBatches(root, "test", bs, drop_last=False, pad_shares=sharded, **shares),
    }
    # The cache's lookahead reads the global batches (TorchRec's table- and column-wise input
    # distribution hands every shard the ids of the whole global batch, rank 0's samples first).
    future = ParquetBatches(root, "train", bs, shuffle=cfg.data.shuffle, seed=cfg.seed) if sharded else None
    steps_per_epoch = len(loaders["train"])
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    step, metrics_path = 0, run_dir / "metrics.jsonl"
    found = ckpt.find_checkpoint(run_dir)
    state = ckpt.load_meta(found) if found else None
    if state and not cfg.train.resume:
        raise TrainingError(
            f"{run_dir} holds a checkpoint (step {state['step']}): pass train.resume=true to continue it, "
            "or choose another hydra.run.dir"
        )
    if cfg.train.resume and not found and lead:
        log.warning("train.resume=true: no checkpoint in %s; starting from step 0", run_dir)
    if state:
        differ = _differences(state["config"], _comparable(cfg))
        if differ:
            differ = ", ".join(differ)
            raise TrainingError(f"train.resume=true: {found} was written with other values: {differ}")
    plan = predicted = None
    if sharded or cfg.cache.device_budget_gb:
        plan, predicted = early_plan or plan_tables(cfg, root, rank.world_size, sharded)
        if lead:
            log.info("%s", plan.describe())
            if sharded and not isinstance(plan, HybridPlan):
                log.info("predicted all-to-all per step: %.3f MB", predicted.all_to_all / 1e6)
    counter = CommCounter() if sharded else None
    if sharded:
        model, cache = build_sharded_model(cfg, meta, device, plan)
        collections = cache.collections()
        counter.install()
        if isinstance(model._dmp_wrapped_module, DistributedDataParallel):
            counter.hook_ddp(model._dmp_wrapped_module)
    else:
        model, cache = build_model(cfg, meta, device, plan.cache if plan else fitted_cache(cfg, root))
        collections = [(cache, {})]
    unwrapped = model.module if sharded else model
    dense_opt = _dense_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    if state:
        load_dense_state(unwrapped, state["model"])
        dense_opt.load_state_dict(state["dense_optimizer"])
        ckpt.load_embeddings(found, state["world_size"], collections)
        torch.set_rng_state(state["rng"])
        step = state["step"]
        if lead:
            log.info("resuming %s at step %d (written by %d rank(s))", run_dir, step, state["world_size"])
            _keep_metrics_until(metrics_path, step)
    elif lead and metrics_path.exists():
        metrics_path.unlink()

    def checkpoint() -> None:
        def meta_state() -> dict:
            return {"model": dense_state(unwrapped), "dense_optimizer": dense_opt.state_dict(),
                    "rng": torch.get_rng_state(), "step": step, "config": _comparable(cfg),
                    "data_path": str(root.resolve())}  # fmt: skip

        ckpt.save(run_dir, rank.rank, rank.world_size, collections, meta_state, lambda: _barrier(sharded))

    base_lrs = (cfg.optim.dense_lr, cfg.optim.sparse_lr)
    bar = tqdm(total=total, initial=step, desc="dlrm-train", unit="step", disable=not lead)
    t_start, samples, first_step = time.perf_counter(), 0, step
    metrics = metrics_path.open("a") if lead else None
    board = None
    logged_step, loaded_before = step, 0  # rows_loaded per step between logged steps

    def log_record(record: dict) -> None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if board:
            board.write(record)

    try:
        board = TensorBoardLog(run_dir, step) if lead and cfg.train.tensorboard else None
        while step < total:
            epoch, skip = divmod(step, steps_per_epoch)
            stream = loaders["train"].batches(epoch, skip=skip)
            ahead = future.batches(epoch, skip=skip) if future else None
            for batch in _lookahead(stream, ahead, cache, cfg.cache.lookahead):
                factor = lr_factor(step, cfg)
                for group in dense_opt.param_groups:
                    group["lr"] = base_lrs[0] * factor
                cache.set_learning_rate(base_lrs[1] * factor)
                with counter.step() if counter else nullcontext():
                    logits = model(
                        batch.dense_features.to(device, non_blocking=True),
                        _sparse_input(batch, device, sharded),
                    ).squeeze(1)
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(
                        logits, batch.labels.to(device, non_blocking=True)
                    )
                    cache.prefetch()
                    dense_opt.zero_grad()
                    loss.backward()
                reported = loss.detach().double()  # on the device: NCCL reduces nothing else
                if sharded:  # the global batch's mean loss, as one process would see it
                    dist.all_reduce(reported)
                    reported /= rank.world_size
                loss_value = float(reported)
                if not math.isfinite(loss_value):
                    last = ckpt.find_checkpoint(run_dir)
                    kept = (
                        f"the last checkpoint, {last} (step {ckpt.load_meta(last)['step']}), is kept"
                        if last
                        else "no checkpoint was written (train.checkpoint_every=0 or not reached)"
                    )
                    raise TrainingError(f"loss is {loss_value} at step {step + 1}; {kept}")
                dense_opt.step()
                step += 1
                samples += len(batch.labels) * rank.world_size
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total:
                    stats = cache.stats()
                    rate = samples / (time.perf_counter() - t_start)
                    per_step = (stats["rows_loaded"] - loaded_before) / (step - logged_step)
                    logged_step, loaded_before = step, stats["rows_loaded"]
                    if metrics:
                        log_record({"step": step, "epoch": epoch, "loss": loss_value,
                                    "lr": base_lrs[0] * factor, "sparse_lr": base_lrs[1] * factor,
                                    "samples_per_s": rate,
                                    "cache": {**_cache_summary(stats),
                                              "rows_loaded_per_step": per_step}})  # fmt: skip
                    bar.set_postfix(
                        loss=f"{loss_value:.4f}", sps=f"{rate:,.0f}", hit=f"{stats['hit_rate_unique']:.3f}"
                    )
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    evaluated = evaluate(model, loaders["val"], device)
                    if metrics:
                        log_record({"step": step, "val": evaluated})
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    checkpoint()
                if step >= total:
                    break
        bar.close()
        train_seconds = time.perf_counter() - t_start
        train_stats = cache.stats()  # before evaluation: the training figures alone
        checkpoint()  # the trained model is safe before anything else can fail
        val = evaluate(model, loaders["val"], device)
        if metrics:  # the final evaluation, on the curves too
            log_record({"step": step, "val": val})
        test = evaluate(model, loaders["test"], device)
        eval_stats = cache.stats()["eval"]
        comm = _comm_summary(counter.totals(), step - first_step, predicted) if counter else None
    finally:
        if metrics:
            metrics.close()
        if board:
            board.close()
        cache.close()
        if counter:
            counter.uninstall()
    summary = {
        "val_auc": val["auc"], "val_logloss": val["logloss"], "val_ne": val["ne"],
        "test_auc": test["auc"], "test_logloss": test["logloss"], "test_ne": test["ne"],
        "train_samples_per_s": samples / train_seconds if train_seconds else 0.0,
        "steps": step, "world_size": rank.world_size, "sharded": sharded, "data_path": str(root),
        "run_dir": str(run_dir),
        "cache": {**_cache_summary(train_stats), "eval": eval_stats},
    }  # fmt: skip
    if comm:
        summary["comm"] = comm
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(metrics_path, run_dir / "curves.png")
    return summary


def _comm_summary(totals: dict, steps: int, predicted: StepBytes) -> dict:
    """Bytes per training step, all ranks together: measured (``CommCounter``) and modeled."""
    per = max(1, steps)
    return {
        "all_to_all_bytes_per_step": totals["all_to_all"] / per,
        "all_reduce_bytes_per_step": totals["all_reduce"] / per,
        "dense_all_reduce_bytes_per_step": totals["dense_all_reduce"] / per,
        "predicted_bytes_per_step": predicted.network,
        "predicted_all_to_all_bytes_per_step": predicted.all_to_all,
        "predicted_all_reduce_bytes_per_step": predicted.all_reduce,
        "steps_counted": steps,
    }


def _cache_summary(stats: dict) -> dict:
    keep = ("policy", "ratio", "hit_rate_unique", "rows_loaded", "rows_touched", "rows_from_host",
            "bytes_h2d", "bytes_d2h", "warmup_rows", "bookkeeping_s", "disk_read_bytes", "disk_write_bytes",
            "disk_read_bytes_per_row_loaded", "disk_write_bytes_per_row_written")  # fmt: skip
    tables = {
        n: {k: t[k] for k in ("capacity", "rows", "rows_loaded", "rows_touched")}
        for n, t in stats["tables"].items()
    }
    return {**{k: stats[k] for k in keep}, "tables": tables}
