"""``dlrm-train``'s work: train a DLRM / DCN over the cached embeddings, evaluate, checkpoint.

One process (multi-process training goes through the sharded cache, not built yet). A step:

    ebc.enqueue(batch t + lookahead)      # the cache sees the future ids
    logits = model(dense, sparse)         # cache: plan (prefetched), gather, pool
    ebc.prefetch()                        # plan + load batch t+1 in the background
    loss.backward()                       # the sparse update is fused here
    dense_optimizer.step(); lr schedule

Outputs go to ``run_dir``: ``metrics.jsonl``, ``summary.json``, ``checkpoint.pt``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
import torchmetrics
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from tqdm import tqdm

from dlrm_cache.cache import CachedEmbeddingBagCollection, SparseOptimizer
from dlrm_cache.config import PreprocessOptions, PreprocessRunConfig, SynthConfig, TrainRunConfig
from dlrm_cache.criteo import CAT_COLUMNS, INT_FEATURE_COUNT, table_name
from dlrm_cache.data.loader import ParquetBatches, load_metadata
from dlrm_cache.data.preprocess import preprocess
from dlrm_cache.data.synthetic import generate

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, a resume that does not match)."""


def default_dataset(cfg: TrainRunConfig) -> Path:
    """The built-in default: synthetic Criteo data, generated and preprocessed once."""
    root = Path(cfg.data.synthetic_dir)
    tsv = root / "train.txt"
    if not tsv.exists():
        generate(SynthConfig(rows=cfg.data.synthetic_rows, out=str(tsv), seed=cfg.seed,
                             cardinality_scale=cfg.data.synthetic_cardinality_scale))  # fmt: skip
    return preprocess(
        PreprocessRunConfig(
            input=[str(tsv)], output_dir=str(root / "parquet"), preprocess=PreprocessOptions()
        )
    )


def build_model(
    cfg: TrainRunConfig, meta: dict, device: torch.device
) -> tuple[torch.nn.Module, CachedEmbeddingBagCollection]:
    tables = [
        EmbeddingBagConfig(
            num_embeddings=meta["vocab_sizes"][f],
            embedding_dim=cfg.model.embedding_dim,
            name=table_name(f),
            feature_names=[f],
        )
        for f in CAT_COLUMNS
    ]
    o = cfg.optim
    sparse = SparseOptimizer(o.sparse, lr=o.sparse_lr, eps=o.eps, beta1=o.beta1, beta2=o.beta2)
    ebc = CachedEmbeddingBagCollection(tables, cfg.cache, sparse, device=device, seed=cfg.seed)
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=INT_FEATURE_COUNT,
        dense_arch_layer_sizes=cfg.model.dense_arch_layer_sizes,
        over_arch_layer_sizes=cfg.model.over_arch_layer_sizes,
        dense_device=device,
    )
    if cfg.model.name == "dcn":
        model = DLRM_DCN(
            **common, dcn_num_layers=cfg.model.dcn_num_layers, dcn_low_rank_dim=cfg.model.dcn_low_rank_dim
        )
    else:
        model = DLRM(**common)
    return model, ebc


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
    """AUROC and log loss over a whole split (the cache serves misses from the host, writes nothing)."""
    model.eval()
    auroc = torchmetrics.classification.BinaryAUROC().to(device)
    loss_sum, n = 0.0, 0
    for batch in loader.batches(epoch=0):
        logits = model(batch.dense_features.to(device), batch.sparse_features).squeeze(1)
        labels = batch.labels.to(device)
        loss_sum += float(
            torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        )
        n += len(labels)
        auroc.update(torch.sigmoid(logits), labels.long())
    model.train()
    if n == 0:  # an empty split (a tiny dataset): nothing to score
        log.warning("the %s split is empty: no AUC or log loss", loader.split)
        return {"auc": float("nan"), "logloss": float("nan"), "samples": 0}
    return {"auc": float(auroc.compute()), "logloss": loss_sum / n, "samples": n}


def _lookahead(batches: Iterator, ebc: CachedEmbeddingBagCollection, depth: int) -> Iterator:
    """Yield ``batches`` while handing each one's ids to the cache ``depth`` batches ahead."""
    ahead: deque = deque()
    for b in batches:
        ebc.enqueue(b.sparse_features)
        ahead.append(b)
        if len(ahead) > depth:
            yield ahead.popleft()
    yield from ahead


def _comparable(cfg: TrainRunConfig) -> dict:
    """The config a resumed run must share with the run it continues."""
    d = asdict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("resume", "max_steps", "epochs")}
    return d


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write, then rename: a crash leaves the previous checkpoint whole."""
    tmp = run_dir / f".{CHECKPOINT}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, run_dir / CHECKPOINT)
    finally:
        tmp.unlink(missing_ok=True)


def train(cfg: TrainRunConfig, run_dir: Path) -> dict:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the summary."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TrainingError(
            "training on several processes needs the sharded cache, which is not built yet; run one process"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.trainer.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError("trainer.device=cuda but no CUDA device is available (use trainer=cpu)")
    root = Path(cfg.data.path) if cfg.data.path else default_dataset(cfg)
    meta = load_metadata(root)
    torch.manual_seed(cfg.seed)  # dense init; embedding tables have seeds of their own, the loader too
    model, ebc = build_model(cfg, meta, device)
    dense_opt = _dense_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    pin = device.type == "cuda"
    bs = cfg.train.batch_size
    loaders = {
        "train": ParquetBatches(root, "train", bs, shuffle=cfg.data.shuffle, seed=cfg.seed, pin_memory=pin),
        "val": ParquetBatches(root, "val", bs, drop_last=False, pin_memory=pin),
        "test": ParquetBatches(root, "test", bs, drop_last=False, pin_memory=pin),
    }
    steps_per_epoch = len(loaders["train"])
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    step, metrics_path = 0, run_dir / "metrics.jsonl"
    if cfg.train.resume and (run_dir / CHECKPOINT).exists():
        state = torch.load(run_dir / CHECKPOINT, weights_only=False)
        if state["config"] != _comparable(cfg):
            raise TrainingError(f"train.resume=true: {run_dir / CHECKPOINT} was written with another config")
        model.load_state_dict(state["model"])
        dense_opt.load_state_dict(state["dense_optimizer"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        log.info("resuming %s at step %d", run_dir, step)
    elif metrics_path.exists():
        metrics_path.unlink()

    def checkpoint() -> None:
        state = {"model": model.state_dict(), "dense_optimizer": dense_opt.state_dict()}
        save_checkpoint(
            run_dir, {**state, "rng": torch.get_rng_state(), "step": step, "config": _comparable(cfg)}
        )

    base_lrs = (cfg.optim.dense_lr, cfg.optim.sparse_lr)
    bar = tqdm(total=total, initial=step, desc="dlrm-train", unit="step")
    t_start, samples, last_val = time.perf_counter(), 0, None
    with metrics_path.open("a") as metrics:
        while step < total:
            epoch, skip = divmod(step, steps_per_epoch)
            stream = loaders["train"].batches(epoch, skip=skip)
            for batch in _lookahead(stream, ebc, cfg.cache.lookahead):
                factor = lr_factor(step, cfg)
                for group in dense_opt.param_groups:
                    group["lr"] = base_lrs[0] * factor
                ebc.set_learning_rate(base_lrs[1] * factor)
                logits = model(
                    batch.dense_features.to(device, non_blocking=True), batch.sparse_features
                ).squeeze(1)
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    logits, batch.labels.to(device, non_blocking=True)
                )
                ebc.prefetch()
                dense_opt.zero_grad()
                loss.backward()
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise TrainingError(
                        f"loss is {loss_value} at step {step + 1}; last good checkpoint kept in {run_dir}"
                    )
                dense_opt.step()
                step += 1
                samples += len(batch.labels)
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total:
                    stats = ebc.stats()
                    rate = samples / (time.perf_counter() - t_start)
                    record = {"step": step, "epoch": epoch, "loss": loss_value, "lr": base_lrs[0] * factor,
                              "samples_per_s": rate, "cache": _cache_summary(stats)}  # fmt: skip
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.set_postfix(
                        loss=f"{loss_value:.4f}", sps=f"{rate:,.0f}", hit=f"{stats['hit_rate_unique']:.3f}"
                    )
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    last_val = evaluate(model, loaders["val"], device)
                    metrics.write(json.dumps({"step": step, "val": last_val}) + "\n")
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    checkpoint()
                if step >= total:
                    break
    bar.close()
    train_seconds = time.perf_counter() - t_start
    train_stats = ebc.stats()  # before evaluation: the training figures alone
    val = evaluate(model, loaders["val"], device)
    test = evaluate(model, loaders["test"], device)
    checkpoint()
    summary = {
        "val_auc": val["auc"], "val_logloss": val["logloss"],
        "test_auc": test["auc"], "test_logloss": test["logloss"],
        "train_samples_per_s": samples / train_seconds if train_seconds else 0.0,
        "steps": step, "world_size": 1, "data_path": str(root),
        "cache": {**_cache_summary(train_stats), "eval": ebc.stats()["eval"]},
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    ebc.close()
    return summary


def _cache_summary(stats: dict) -> dict:
    keep = ("policy", "ratio", "hit_rate_unique", "rows_loaded", "rows_touched", "rows_from_host",
            "bytes_h2d", "bytes_d2h", "warmup_rows", "bookkeeping_s")  # fmt: skip
    tables = {
        n: {k: t[k] for k in ("capacity", "rows", "rows_loaded", "rows_touched")}
        for n, t in stats["tables"].items()
    }
    return {**{k: stats[k] for k in keep}, "tables": tables}
