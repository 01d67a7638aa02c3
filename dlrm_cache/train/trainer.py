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

import logging
import math
from collections import deque
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.contrib.logging import logging_redirect_tqdm

from dlrm_cache.config import TrainRunConfig
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.loader import ParquetBatches, load_metadata
from dlrm_cache.distributed import checkpoint as ckpt
from dlrm_cache.distributed.placement import Plan, plan_tables
from dlrm_cache.distributed.rank import Rank, current_rank
from dlrm_cache.distributed.runtime import init_process_group
from dlrm_cache.files import held
from dlrm_cache.train.curves import plot_curves
from dlrm_cache.train.embeddings import EmbeddingRuntime, embedding_runtime
from dlrm_cache.train.errors import TrainingError
from dlrm_cache.train.evaluate import evaluate
from dlrm_cache.train.run_log import RunLog, cache_summary, json_text
from dlrm_cache.train.train_state import TrainState, dense_optimizer, resumable_checkpoint

log = logging.getLogger(__name__)
_LOSSES_HELD = 64  # losses left on the device at most: then read at once (one wait every 64 steps)


def train(cfg: TrainRunConfig, run_dir: Path) -> dict:
    """Train as ``cfg`` says, writing into ``run_dir``; returns the summary. Under ``torchrun`` every
    rank calls it, and all write into rank 0's ``run_dir``; the tables are then sharded (so they are
    with ``trainer.sharded=true``)."""
    rank = current_rank()
    sharded = rank.world_size > 1 or cfg.trainer.sharded
    device = _device(cfg, rank)
    if not sharded and cfg.trainer.sharding != "table_wise":
        raise TrainingError(
            f"trainer.sharding={cfg.trainer.sharding} places tables over the ranks of a sharded run: start "
            "under torchrun, or add trainer.sharded=true to take the sharded path in one process"
        )
    if cfg.trainer.hot_rows and not (sharded and cfg.trainer.sharding == "hybrid"):
        raise TrainingError("trainer.hot_rows is read only by a sharded run with trainer.sharding=hybrid")
    plan = None  # bad hybrid settings are refused before any process group work
    if sharded and cfg.trainer.sharding == "hybrid" and cfg.data.path:
        plan = plan_tables(cfg, Path(cfg.data.path), rank.world_size)
    if sharded:
        init_process_group(device, rank, cfg.trainer.collective_timeout_min)
        # One run dir for all ranks: rank 0's (each rank's Hydra names its own, from its start time).
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    try:
        with held(run_dir, "hydra.run.dir") if rank.rank == 0 else nullcontext():
            return _train(cfg, run_dir, rank, sharded, device, plan)
    finally:
        if sharded and dist.is_initialized():
            dist.destroy_process_group()


def _device(cfg: TrainRunConfig, rank: Rank) -> torch.device:
    """``trainer.device``; on CUDA, this rank's GPU (made the current one)."""
    device = torch.device(cfg.trainer.device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise TrainingError("trainer.device=cuda but no CUDA device is available (use trainer=cpu)")
    if rank.local_rank >= torch.cuda.device_count():
        raise TrainingError(
            f"local rank {rank.local_rank} needs GPU {rank.local_rank}, but {torch.cuda.device_count()} "
            "are visible (CUDA_VISIBLE_DEVICES?): start at most one process per GPU"
        )
    device = torch.device("cuda", rank.local_rank)
    torch.cuda.set_device(device)
    return device


def _train(cfg: TrainRunConfig, run_dir: Path, rank: Rank, sharded: bool, device: torch.device,
           plan: Plan | None) -> dict:  # fmt: skip
    """Set the run up (dataset, checkpoint to resume, plan, tables, state), then train it."""
    lead = rank.rank == 0  # writes the outputs, prints
    run_dir.mkdir(parents=True, exist_ok=True)
    root = _dataset(cfg, lead, sharded)
    meta = load_metadata(root)
    _check_trainable(root, meta, cfg.train.batch_size)
    resumed = resumable_checkpoint(cfg, run_dir, root, meta)
    if cfg.train.resume and resumed is None and lead:
        log.warning("train.resume=true: no checkpoint in %s; starting from step 0", run_dir)
    if plan is None and (sharded or cfg.cache.device_budget_gb):
        plan = plan_tables(cfg, root, rank.world_size, sharded)
    if plan is not None and lead:
        log.info("%s", plan.describe())
    runtime = embedding_runtime(cfg, root, meta, device, plan, sharded)
    dense = [p for p in runtime.model.parameters() if p.requires_grad]
    state = TrainState(cfg, runtime.module, dense_optimizer(cfg, dense), root, meta)
    if resumed:
        found, saved = resumed
        state.load_state_dict(saved)
        ckpt.load_embeddings(found, saved["world_size"], runtime.checkpoint_state())
        if lead:
            log.info(
                "resuming %s at step %d (written by %d rank(s))", run_dir, state.step, saved["world_size"]
            )
    trainer = Trainer(cfg, run_dir, rank, device, runtime, state, _loaders(cfg, root, rank, sharded, device))
    try:
        summary = trainer.fit(resumed=resumed is not None)
    finally:
        runtime.close()
    if lead:
        (run_dir / "summary.json").write_text(json_text(summary, indent=2))
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return summary


class Trainer:
    """The training loop over an ``EmbeddingRuntime``: ``train_step``, then ``maybe_log``,
    ``maybe_eval`` and ``maybe_checkpoint`` after each step, the final checkpoint and evaluations."""

    def __init__(
        self,
        cfg: TrainRunConfig,
        run_dir: Path,
        rank: Rank,
        device: torch.device,
        runtime: EmbeddingRuntime,
        state: TrainState,
        loaders: dict[str, ParquetBatches],
    ):
        self.cfg, self.run_dir, self.rank, self.device = cfg, run_dir, rank, device
        self.runtime, self.state, self.loaders = runtime, state, loaders
        self.steps_per_epoch = len(loaders["train"])
        self.losses: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) not yet read
        self.last_loss = math.nan
        self.total = self.steps_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total = min(self.total, cfg.train.max_steps)

    def fit(self, resumed: bool) -> dict:
        """Train up to the last step, checkpoint, evaluate on val and test; returns the summary."""
        cfg, runtime, state, first_step = self.cfg, self.runtime, self.state, self.state.step
        self.log = RunLog(self.run_dir, self.rank.rank == 0, first_step, self.total, cfg.train.tensorboard,
                          resumed)  # fmt: skip
        try:
            with logging_redirect_tqdm():  # what is logged meanwhile goes above the bar, not into it
                while state.step < self.total:
                    epoch, skip = divmod(state.step, self.steps_per_epoch)
                    for batch in self._lookahead(epoch, skip):
                        self.train_step(batch)
                        self.log.stepped(len(batch.labels) * self.rank.world_size)
                        self.maybe_log(epoch)
                        self.maybe_eval()
                        self.maybe_checkpoint()
                        if state.step >= self.total:
                            break
            self.log.bar.close()
            self.finite_loss()
            samples_per_s = self.log.samples_per_s()
            train_stats = runtime.stats()  # before evaluation: the training figures alone
            self.checkpoint()  # the trained model is safe before anything else can fail
            val = evaluate(runtime, self.loaders["val"], self.device)
            self.log.log_eval(state.step, val)  # the final evaluation, on the curves too
            test = evaluate(runtime, self.loaders["test"], self.device)
            eval_stats = runtime.stats()["eval"]
        finally:
            self.log.close()
        comm = runtime.comm_summary(state.step - first_step)
        return {
            "val_auc": val["auc"], "val_logloss": val["logloss"], "val_ne": val["ne"],
            "test_auc": test["auc"], "test_logloss": test["logloss"], "test_ne": test["ne"],
            "train_samples_per_s": samples_per_s,
            "steps": state.step, "world_size": self.rank.world_size, "sharded": runtime.sharded,
            "data_path": str(state.data_path), "run_dir": str(self.run_dir),
            "cache": {**cache_summary(train_stats), "eval": eval_stats},
            **({"comm": comm} if comm else {}),
        }  # fmt: skip

    def train_step(self, batch) -> None:
        """One step on ``batch``: forward (the cache gathers the planned rows), the next batch planned,
        backward (the sparse update fused in), the dense update. The global batch's mean loss stays on
        the device (``losses``) until a figure is needed: a step waits for no device work."""
        cfg, runtime, state = self.cfg, self.runtime, self.state
        factor = lr_factor(state.step, cfg)
        for group in state.optimizer.param_groups:
            group["lr"] = cfg.optim.dense_lr * factor
        runtime.set_learning_rate(cfg.optim.sparse_lr * factor)
        with runtime.counting():
            dense = batch.dense_features.to(self.device, non_blocking=True)
            logits = runtime.model(dense, runtime.sparse_input(batch)).squeeze(1)
            labels = batch.labels.to(self.device, non_blocking=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            runtime.prefetch()
            state.optimizer.zero_grad()
            loss.backward()
        state.optimizer.step()
        state.step += 1
        self.losses.append((state.step, runtime.mean_loss(loss)))
        if len(self.losses) == _LOSSES_HELD:
            self.finite_loss()

    def finite_loss(self) -> float:
        """The losses since the last look, read from the device at once: the first that is not finite
        stops the run with its step (before any checkpoint or evaluation of the model it made); returns
        the latest."""
        if self.losses:
            steps, values = [s for s, _ in self.losses], torch.stack([v for _, v in self.losses]).cpu()
            self.losses.clear()
            bad = torch.nonzero(~torch.isfinite(values)).squeeze(1)
            if len(bad):
                raise TrainingError(
                    f"loss is {float(values[bad[0]])} at step {steps[bad[0]]}; {self._kept()}"
                )
            self.last_loss = float(values[-1])
        return self.last_loss

    def maybe_log(self, epoch: int) -> None:
        step = self.state.step
        if step % self.cfg.train.log_every == 0 or step == self.total:
            factor, o = lr_factor(step - 1, self.cfg), self.cfg.optim
            lrs = (o.dense_lr * factor, o.sparse_lr * factor)
            self.log.log_step(step, epoch, self.finite_loss(), lrs, self.runtime.stats())

    def maybe_eval(self) -> None:
        t, steps = self.cfg.train, len(self.loaders["train"])
        every = t.eval_every or (max(1, steps // t.evals_per_epoch) if t.evals_per_epoch else 0)
        if every and self.state.step % every == 0:
            self.finite_loss()
            self.log.log_eval(self.state.step, evaluate(self.runtime, self.loaders["val"], self.device))

    def maybe_checkpoint(self) -> None:
        every = self.cfg.train.checkpoint_every
        if every and self.state.step % every == 0:
            self.finite_loss()
            self.checkpoint()

    def checkpoint(self) -> None:
        r, runtime = self.rank, self.runtime
        ckpt.save(self.run_dir, r.rank, r.world_size, runtime.checkpoint_state(), self.state.state_dict,
                  runtime.agree)  # fmt: skip

    def _kept(self) -> str:
        """What a failed run leaves to resume from."""
        last = ckpt.find_checkpoint(self.run_dir)
        if last is None:
            return "no checkpoint was written (train.checkpoint_every=0 or not reached)"
        return f"the last checkpoint, {last} (step {ckpt.load_meta(last)['step']}), is kept"

    def _lookahead(self, epoch: int, skip: int) -> Iterator:
        """This rank's batches of the epoch from ``skip`` on, while the runtime is handed the ids of the
        matching global batches (unsharded, the local batches are the global ones) ``cache.lookahead``
        batches ahead."""
        local = self.loaders["train"].batches(epoch, skip=skip)
        future = self.runtime.global_loader
        pairs = (
            zip(local, future.batches(epoch, skip=skip), strict=True) if future else ((b, b) for b in local)
        )
        ahead: deque = deque()
        for b, g in pairs:
            self.runtime.enqueue(g)
            ahead.append(b)
            if len(ahead) > self.cfg.cache.lookahead:
                yield ahead.popleft()
        yield from ahead


def _dataset(cfg: TrainRunConfig, lead: bool, sharded: bool) -> Path:
    """``data.path``, or the built-in default: synthetic Criteo data, generated and preprocessed once
    (by rank 0; the others then find it made)."""
    if cfg.data.path:
        return Path(cfg.data.path)
    d = cfg.data

    def made() -> Path:
        return synthetic_dataset(
            Path(d.synthetic_dir), d.synthetic_rows, d.synthetic_cardinality_scale, cfg.seed,
            cardinalities=d.synthetic_cardinalities, options=d.synthetic_preprocess(),
        )  # fmt: skip

    root = made() if lead else None
    if sharded:
        dist.barrier()
    return root or made()


def _loaders(cfg: TrainRunConfig, root: Path, rank: Rank, sharded: bool, device: torch.device) -> dict:
    """This rank's share of every split (val and test padded to equal shares when sharded)."""
    bs = cfg.train.batch_size
    shares = dict(rank=rank.rank, world_size=rank.world_size, pin_memory=device.type == "cuda")
    return {
        "train": ParquetBatches(root, "train", bs, shuffle=cfg.data.shuffle, seed=cfg.seed, **shares),
        "val": ParquetBatches(root, "val", bs, drop_last=False, pad_shares=sharded, **shares),
        "test": ParquetBatches(root, "test", bs, drop_last=False, pad_shares=sharded, **shares),
    }


def lr_factor(step: int, cfg: TrainRunConfig) -> float:
    """The DLRM reference schedule: linear warm-up, constant, then polynomial (power 2) decay."""
    o = cfg.optim
    if o.warmup_steps and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.decay_steps and step >= o.decay_start:
        return max(0.0, 1 - (step - o.decay_start) / o.decay_steps) ** 2
    return 1.0


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
