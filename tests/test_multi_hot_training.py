"""Training on multi-hot data (MLPerf's bag sizes; ``bags``, conftest.py): table-wise, column-wise and
hybrid ranks against one process, and predict and export of a multi-hot run. Cached against all-resident
in one process: tests/test_train.py."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from test_distributed import assert_same_model, ok, run
from test_distributed import losses as run_losses
from test_predict_export import exported_model, scores_of, trainer_scores
from test_train import config

from dlrm_cache.config import ExportConfig, PredictConfig
from dlrm_cache.data.loader import ParquetBatches, load_metadata
from dlrm_cache.train.export import export
from dlrm_cache.train.predict import predict, read_predictions
from dlrm_cache.train.trainer import train


@pytest.mark.slow  # several processes
@pytest.mark.parametrize(
    "ranks,sharding,sparse", [(2, "table_wise", "adagrad"), (2, "column_wise", "sgd"), (3, "hybrid", "sgd")]
)
def test_ranks_train_on_bags_like_one_unsharded_process(bags, tmp_path, ranks, sharding, sparse):
    steps = ["train.max_steps=10", f"optim.sparse={sparse}", "train.batch_size=258"]
    ok(run(1, tmp_path / "one", bags, *steps, "cache.policy=none"))
    ok(run(ranks, tmp_path / "ranks", bags, *steps, f"trainer.sharding={sharding}"))
    np.testing.assert_allclose(
        run_losses(tmp_path / "ranks"), run_losses(tmp_path / "one"), rtol=1e-5, atol=1e-6
    )
    assert_same_model(tmp_path / "one", tmp_path / "ranks")
    summary = json.loads((tmp_path / "ranks" / "summary.json").read_text())
    assert summary["world_size"] == ranks and summary["cache"]["rows_loaded"] > 0
    # Table-wise sends every bag and id: modeled within 10%. The hybrid model takes a bag's ids as drawn
    # independently, so that a bag is cold with 1 - (1 - q)^size; MLPerf's bags are not (a value's extra
    # ids are drawn once, the hottest ones replicated together): it over-counts cold bags (measured 22%).
    tolerance = 0.30 if sharding == "hybrid" else 0.10
    for kind in ("all_to_all", "all_reduce") if sharding == "hybrid" else ("all_to_all",):
        measured, predicted = (summary["comm"][f"{p}{kind}_bytes_per_step"] for p in ("", "predicted_"))
        assert abs(predicted - measured) <= tolerance * measured, (kind, predicted, measured)


def test_predict_and_export_score_bags_as_the_trainer_does(bags, tmp_path):
    cfg = config(bags, train=replace(config(bags).train, max_steps=8))
    train(cfg, tmp_path / "run")
    got = read_predictions(
        predict(PredictConfig(run_dir=str(tmp_path / "run"), input=str(bags), split="val",
                              output=str(tmp_path / "val.csv"), progress=False))
    )  # fmt: skip
    expected = trainer_scores(cfg, tmp_path / "run", bags, "val")
    np.testing.assert_array_equal(got["probability"].astype(np.float32), expected)
    assert len(expected) == load_metadata(bags)["rows"]["val"]
    # raw lines, encoded with the run's vocabulary into the same bags, score the same
    lines = (bags.parent / "train.txt").read_text().splitlines(keepends=True)
    split = json.loads((bags / "metadata.json").read_text())["split_lines"][0]
    raw = tmp_path / "val.txt"
    raw.write_text("".join(lines[split["train_last_line"] : split["val_last_line"]]))
    from_tsv = read_predictions(
        predict(PredictConfig(run_dir=str(tmp_path / "run"), input=str(raw), output=str(tmp_path / "raw.csv"),
                              progress=False))
    )  # fmt: skip
    np.testing.assert_array_equal(from_tsv["probability"], got["probability"])
    plain, _ = exported_model(
        export(ExportConfig(run_dir=str(tmp_path / "run"), output=str(tmp_path / "export")))
    )
    np.testing.assert_array_equal(
        scores_of(plain, ParquetBatches(bags, "val", 512, drop_last=False)), expected
    )


@pytest.mark.slow  # generates and preprocesses its data, a model of MLPerf's size
def test_the_small_mlperf_experiment_runs_on_generated_multi_hot_data_and_reports_auc(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dlrm_cache.cli.train", "experiment=mlperf_dcnv2_small",
         "data.synthetic_rows=20000", f"data.synthetic_dir={tmp_path / 'data'}", "train.max_steps=3",
         "train.batch_size=512", f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["test_auc"] < 1 and summary["steps"] == 3
    meta = json.loads((tmp_path / "data" / "parquet" / "metadata.json").read_text())
    assert sum(meta["multi_hot_sizes"].values()) == 214 and meta["max_ind_range"] == 40_000
    evaluations = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                   if "val" in r and "loss" not in r]  # fmt: skip
    assert len(evaluations) >= 3  # 20 an epoch: every step of this short one, and the end's
