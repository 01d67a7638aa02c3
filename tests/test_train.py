"""dlrm-train end to end on small generated data."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from dlrm_cache.config import (
    CacheConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainLoopConfig,
    TrainRunConfig,
)
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.data.loader import ParquetBatches
from dlrm_cache.distributed.checkpoint import META, find_checkpoint, load_meta, pieces
from dlrm_cache.train.trainer import TrainingError, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(
        tmp_path_factory.mktemp("data"), 40_000, 0.002, row_group_rows=4096, progress=False
    )


def config(path, **kw) -> TrainRunConfig:
    small = ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[32, 8], over_arch_layer_sizes=[32, 1])
    base = TrainRunConfig(
        data=DataConfig(path=str(path)),
        model=small,
        cache=CacheConfig(policy="lookahead", ratio=0.02, lookahead=8, full_table_rows=100),
        optim=OptimConfig(sparse="adagrad", dense="adagrad", sparse_lr=0.05, dense_lr=0.05),
        train=TrainLoopConfig(batch_size=512, log_every=1, max_steps=25),
    )
    return replace(base, **kw)


def losses(run_dir):
    return [
        r["loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]


@pytest.mark.parametrize("data", ["dataset", "bags"], ids=["one-hot", "multi-hot"])
@pytest.mark.parametrize("sparse", ["sgd", "adagrad", "adam"])
def test_cached_training_matches_all_on_device_step_by_step(request, tmp_path, sparse, data):
    """One id a feature, and MLPerf's bags (``bags``: 214 ids a sample)."""
    root = request.getfixturevalue(data)
    optim = OptimConfig(
        sparse=sparse, dense="sgd", sparse_lr=0.05 if sparse != "adam" else 0.005, dense_lr=0.05
    )
    cached = train(config(root, optim=optim), tmp_path / "cached")
    plain = train(config(root, optim=optim, cache=CacheConfig(policy="none")), tmp_path / "none")
    np.testing.assert_allclose(losses(tmp_path / "cached"), losses(tmp_path / "none"), rtol=1e-5, atol=1e-6)
    assert cached["test_auc"] == pytest.approx(plain["test_auc"], abs=1e-5)
    assert cached["cache"]["rows_loaded"] > 0 and plain["cache"]["rows_loaded"] == 0


def test_a_bookkeeping_thread_trains_like_inline_bookkeeping_step_for_step(dataset, tmp_path):
    inline = train(config(dataset), tmp_path / "inline")
    threaded_cache = replace(config(dataset).cache, bookkeeping="thread", row_copies="torch")
    threaded = train(config(dataset, cache=threaded_cache), tmp_path / "thread")
    assert losses(tmp_path / "thread") == losses(tmp_path / "inline")
    assert threaded["test_auc"] == inline["test_auc"]
    assert threaded["cache"]["rows_loaded"] == inline["cache"]["rows_loaded"] > 0


@pytest.mark.slow
def test_learns_clearly_better_than_chance_and_dense_only(dataset, tmp_path):
    summary = train(
        config(dataset, train=TrainLoopConfig(batch_size=256, log_every=50, epochs=2)), tmp_path / "run"
    )

    # the dense-only reference: logistic regression on the 13 dense features of the same splits
    def arrays(split):
        b = list(ParquetBatches(dataset, split, 1024, drop_last=False).batches(0))
        return torch.cat([x.dense_features for x in b]), torch.cat([x.labels for x in b])

    x, y = arrays("train")
    lin = torch.nn.Linear(13, 1)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(lin(x).squeeze(1), y).backward()
        opt.step()
    xt, yt = arrays("test")
    from torchmetrics.functional.classification import binary_auroc

    dense_only = float(binary_auroc(torch.sigmoid(lin(xt).squeeze(1)).detach(), yt.long()))
    assert summary["test_auc"] > 0.70
    assert summary["test_auc"] > dense_only + 0.1
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("val_auc", "test_auc", "test_logloss", "train_samples_per_s", "steps", "world_size"):
        assert key in s
    rate = float(yt.double().mean())  # NE: the log loss over the entropy of the split's click rate
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert s["test_ne"] == pytest.approx(s["test_logloss"] / entropy, rel=1e-9)
    assert s["test_ne"] < 1  # better than always predicting the click rate
    png = (tmp_path / "run" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val"]["auc"] == s["val_auc"]  # the final evaluation is on the curves
    assert set(s["cache"]["tables"]) == {f"t_cat_{i}" for i in range(26)}
    for key in (
        "policy",
        "ratio",
        "hit_rate_unique",
        "rows_loaded",
        "rows_touched",
        "bytes_h2d",
        "bytes_d2h",
    ):
        assert key in s["cache"]


def test_tensorboard_event_files_hold_every_logged_figure(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loop = TrainLoopConfig(batch_size=512, log_every=5, max_steps=20, eval_every=10)
    summary = train(config(dataset, train=loop), tmp_path / "run")
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert tags == {"train/loss", "train/lr_dense", "train/lr_sparse", "train/samples_per_s",
                    "cache/hit_rate_unique", "cache/rows_loaded_per_step",
                    "val/auc", "val/logloss", "val/ne"}  # fmt: skip
    loss = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert [s for s, _ in loss] == [5, 10, 15, 20]
    np.testing.assert_allclose([v for _, v in loss], losses(tmp_path / "run"), rtol=1e-6)
    assert [e.step for e in board.Scalars("val/auc")][:1] == [10]
    assert board.Scalars("val/auc")[-1].value == pytest.approx(summary["val_auc"], rel=1e-6)
    loaded = sum(e.value * 5 for e in board.Scalars("cache/rows_loaded_per_step"))
    assert loaded == pytest.approx(summary["cache"]["rows_loaded"]) and loaded > 0
    off = train(config(dataset, train=replace(loop, tensorboard=False, eval_every=0)), tmp_path / "off")
    assert off["steps"] == 20 and not (tmp_path / "off" / "tensorboard").exists()


@pytest.mark.slow
def test_the_built_in_default_prints_no_warning(tmp_path):
    """What `make demo` runs, on data made afresh: the default config and dataset fit each other."""
    done = subprocess.run(
        [sys.executable, "-m", "dlrm_cache.cli.train", f"data.synthetic_dir={tmp_path / 'data'}",
         f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "warn" not in output.lower(), [line for line in output.splitlines() if "warn" in line.lower()]
    assert "raised to fit" in output  # the small tables' caches, said once, as information
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val_auc"] > 0.7


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_parameters(dataset, tmp_path):
    args = [
        sys.executable, "-m", "dlrm_cache.cli.train", f"data.path={dataset}", "model.embedding_dim=8",
        "model.dense_arch_layer_sizes=[32,8]", "model.over_arch_layer_sizes=[32,1]", "train.batch_size=256",
        "train.max_steps=120", "train.checkpoint_every=10", "cache.ratio=0.02", "cache.lookahead=8",
    ]  # fmt: skip
    straight = tmp_path / "straight"
    subprocess.run([*args, f"hydra.run.dir={straight}"], check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, f"hydra.run.dir={killed}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while find_checkpoint(killed) is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = load_meta(find_checkpoint(killed))["step"]
    assert 0 < step_at_kill < 120, "killed mid-run"
    subprocess.run([*args, f"hydra.run.dir={killed}", "train.resume=true"], check=True, capture_output=True)
    a, b = load_meta(find_checkpoint(straight)), load_meta(find_checkpoint(killed))
    assert a["step"] == b["step"] == 120
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], atol=1e-6, rtol=1e-5, msg=k)
    ta, tb = (pieces(d / "checkpoint", 1) for d in (straight, killed))
    for pa, pb in zip(ta, tb, strict=True):
        rows_a, rows_b = pa.read(0, pa.rows), pb.read(0, pb.rows)
        torch.testing.assert_close(rows_b, rows_a, atol=1e-6, rtol=1e-5, msg=pa.table)


def test_bad_data_path_and_schema_version(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        train(config(tmp_path / "nope"), tmp_path / "r")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a dlrm-preprocess output"):
        train(config(tmp_path / "empty"), tmp_path / "r")
    fake = tmp_path / "future"
    fake.mkdir()
    (fake / "metadata.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ValueError, match="schema_version 99"):
        train(config(fake), tmp_path / "r")


def test_resume_with_another_config_is_refused(dataset, tmp_path):
    train(config(dataset, train=TrainLoopConfig(batch_size=512, max_steps=3)), tmp_path / "r")
    other = config(dataset, train=TrainLoopConfig(batch_size=256, max_steps=6, resume=True))
    with pytest.raises(TrainingError, match=r"other values: train.batch_size \(512 then, 256 now\)$"):
        train(other, tmp_path / "r")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(dataset, tmp_path):
    optim = OptimConfig(sparse="sgd", dense="sgd", sparse_lr=1e30, dense_lr=1e30)
    cfg = config(
        dataset, optim=optim, train=TrainLoopConfig(batch_size=512, max_steps=20, checkpoint_every=1)
    )
    kept = r"the last checkpoint, .*checkpoint \(step \d+\), is kept"
    with pytest.raises(TrainingError, match=rf"loss is (nan|inf) at step \d+; {kept}"):
        train(cfg, tmp_path / "r")
    assert (tmp_path / "r" / "checkpoint" / META).exists()
    never = replace(cfg, train=replace(cfg.train, checkpoint_every=0))
    with pytest.raises(TrainingError, match=r"at step \d+; no checkpoint was written"):
        train(never, tmp_path / "never")


def test_an_empty_split_gives_nan_metrics_not_a_crash(tmp_path):
    root = synthetic_dataset(tmp_path, 7, 0.0001, progress=False)
    summary = train(config(root, train=TrainLoopConfig(batch_size=2, max_steps=2)), tmp_path / "r")
    assert summary["steps"] == 2
    assert np.isnan(summary["val_auc"])  # 7 rows: 6 train, 0 val, 1 test


def test_unlabelled_data_is_refused_before_training(tmp_path):
    from dlrm_cache.config import PreprocessRunConfig, SynthConfig
    from dlrm_cache.data.preprocess import preprocess
    from dlrm_cache.data.synthetic import generate

    generate(SynthConfig(rows=300, out=str(tmp_path / "test.txt"), labeled=False, progress=False))
    root = preprocess(
        PreprocessRunConfig(input=[str(tmp_path / "test.txt")], output_dir=str(tmp_path / "pq"))
    )
    with pytest.raises(TrainingError, match=r"pq: the dataset has no labels \(made from 39-field input\)"):
        train(config(root, train=TrainLoopConfig(batch_size=64)), tmp_path / "r")
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_a_train_split_smaller_than_a_batch_is_refused(dataset, tmp_path):
    rows = json.loads((dataset / "metadata.json").read_text())["rows"]["train"]
    with pytest.raises(TrainingError, match=rf"the train split has {rows} rows, fewer than one batch"):
        train(config(dataset, train=TrainLoopConfig(batch_size=rows + 1)), tmp_path / "r")


def broken_copy(dataset, tmp_path, damage):
    root = tmp_path / "copy"
    shutil.copytree(dataset, root)
    damage(root)
    return root


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda r: (r / "metadata.json").write_text('{"schema_version": 1, "rows": '),
         "metadata.json: not a readable metadata"),
        (lambda r: next((r / "train").glob("part-*")).write_bytes(b"PAR1 not really"),
         r"part-\d+.parquet: not a readable Parquet part"),
        (lambda r: next((r / "val").glob("part-*")).unlink(), "no part-"),
        (lambda r: shutil.copy(next((r / "train").glob("part-*")), next((r / "val").glob("part-*"))),
         "its parts hold .* rows, metadata.json says"),
    ],
)  # fmt: skip
def test_damaged_datasets_are_refused_naming_the_file(dataset, tmp_path, damage, message):
    root = broken_copy(dataset, tmp_path, damage)
    with pytest.raises(ValueError, match=message):
        train(config(root), tmp_path / "r")


def test_the_trained_model_is_checkpointed_before_the_final_evaluation(dataset, tmp_path, monkeypatch):
    from dlrm_cache.train import trainer

    def fail(*a, **k):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(trainer, "evaluate", fail)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train(config(dataset, train=TrainLoopConfig(batch_size=512, max_steps=4)), tmp_path / "r")
    assert load_meta(find_checkpoint(tmp_path / "r"))["step"] == 4


def test_a_run_dir_with_a_checkpoint_is_never_trained_over_without_resume(dataset, tmp_path, caplog):
    cfg = config(dataset, train=TrainLoopConfig(batch_size=512, max_steps=3))
    train(cfg, tmp_path / "r")
    before = (tmp_path / "r" / "checkpoint" / META).read_bytes()
    with pytest.raises(TrainingError, match=r"holds a checkpoint \(step 3\): pass train.resume=true"):
        train(replace(cfg, train=replace(cfg.train, max_steps=5)), tmp_path / "r")
    assert (tmp_path / "r" / "checkpoint" / META).read_bytes() == before
    resumed = train(replace(cfg, train=replace(cfg.train, resume=True)), tmp_path / "fresh")
    assert (
        resumed["steps"] == 3 and "no checkpoint in" in caplog.text and "starting from step 0" in caplog.text
    )


def test_a_corrupt_checkpoint_is_refused_naming_the_file(dataset, tmp_path):
    cfg = config(dataset, train=TrainLoopConfig(batch_size=512, max_steps=2))
    train(cfg, tmp_path / "r")
    meta = tmp_path / "r" / "checkpoint" / META
    meta.write_bytes(meta.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"meta.pt: not a readable checkpoint"):
        train(replace(cfg, train=replace(cfg.train, resume=True)), tmp_path / "r")


def test_a_gpu_run_without_the_gpus_it_needs_is_refused_before_any_work(dataset, tmp_path, monkeypatch):
    gpu = config(dataset, trainer=replace(config(dataset).trainer, device="cuda"))
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="trainer.device=cuda but no CUDA device is available"):
            train(gpu, tmp_path / "r")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(TrainingError, match=r"local rank 2 needs GPU 2, but 2 are visible"):
        train(gpu, tmp_path / "r")
    assert not (tmp_path / "r").exists()
