"""trainer.sharding=hybrid: hot rows replicated, cold rows sharded; against one unsharded process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distributed import assert_same_model, dataset, losses, ok, run  # noqa: F401 (dataset: fixture)
from torchmetrics.classification import BinaryAUROC

from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig, ConfigError, NetworkConfig
from dlrm_cache.data.loader import ParquetBatches
from dlrm_cache.distributed import comm_model
from dlrm_cache.distributed.checkpoint import find_checkpoint, load_meta
from dlrm_cache.distributed.hybrid_plan import plan_hybrid
from dlrm_cache.distributed.table_stats import TableStats
from dlrm_cache.train.trained_run import load_run

WORKER = Path(__file__).with_name("hybrid_worker.py")


@pytest.mark.slow  # several processes
@pytest.mark.parametrize("ranks,optimizer", [(2, "adam"), (3, "sgd"), (3, "adagrad")])
def test_module_pools_and_trains_like_one_process_with_identical_replicas(ranks, optimizer):
    """Multi-hot bags (empty ones too), sum and mean pooling, a table all cold, one all hot, one rank's
    cold table holding two tables' cold rows; per step and at the end (tests/hybrid_worker.py)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
         str(WORKER), optimizer],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("hybrid worker ok") == ranks


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow  # several processes
@pytest.mark.parametrize("ranks,sparse", [(2, "adagrad"), (3, "adam")])
def test_training_matches_one_process_and_the_model_predicts_the_bytes(dataset, tmp_path, ranks, sparse):  # noqa: F811
    steps = ["train.max_steps=12", f"optim.sparse={sparse}", "train.batch_size=258"]
    if sparse == "adam":
        steps.append("optim.sparse_lr=0.005")
    ok(run(1, tmp_path / "one", dataset, *steps, "cache.policy=none"))
    proc = run(ranks, tmp_path / "hybrid", dataset, *steps, "trainer.sharding=hybrid")
    ok(proc)
    printed = proc.stdout + proc.stderr
    assert printed.count(f"hybrid plan over {ranks} rank(s)") == 1
    np.testing.assert_allclose(losses(tmp_path / "hybrid"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    assert_same_model(tmp_path / "one", tmp_path / "hybrid")
    comm = summary(tmp_path / "hybrid")["comm"]
    assert comm["all_to_all_bytes_per_step"] > 0 and comm["all_reduce_bytes_per_step"] > 0
    for kind in ("all_to_all", "all_reduce"):  # expected figures against one run's
        measured = comm[f"{kind}_bytes_per_step"]
        assert abs(comm[f"predicted_{kind}_bytes_per_step"] - measured) <= 0.10 * measured, kind
    assert summary(tmp_path / "hybrid")["cache"]["rows_loaded"] > 0  # the cold rows went through the cache


@pytest.mark.slow  # several processes
@pytest.mark.parametrize(
    "first,then",
    [
        ((2, "hybrid"), (1, "table_wise")),
        ((1, "table_wise"), (2, "hybrid")),
        ((3, "hybrid"), (2, "table_wise")),
        ((2, "hybrid"), (3, "hybrid")),
    ],
)
def test_checkpoints_move_between_hybrid_table_wise_and_unsharded(dataset, tmp_path, first, then):  # noqa: F811
    common = ["optim.sparse=adagrad", "train.checkpoint_every=4", "train.batch_size=258"]
    ok(run(1, tmp_path / "straight", dataset, *common, "train.max_steps=8"))
    moved = tmp_path / "moved"
    ok(run(first[0], moved, dataset, *common, "train.max_steps=4", f"trainer.sharding={first[1]}"))
    assert load_meta(find_checkpoint(moved))["world_size"] == first[0]
    again = ["train.max_steps=8", "train.resume=true", f"trainer.sharding={then[1]}"]
    ok(run(then[0], moved, dataset, *common, *again))
    np.testing.assert_allclose(losses(moved), losses(tmp_path / "straight"), rtol=1e-5, atol=1e-6)
    assert_same_model(tmp_path / "straight", moved)


@pytest.mark.slow  # several processes
def test_table_and_column_wise_runs_report_their_bytes_as_modeled(dataset, tmp_path):  # noqa: F811
    for sharding in ("table_wise", "column_wise"):
        ok(run(2, tmp_path / sharding, dataset, "train.max_steps=3", f"trainer.sharding={sharding}"))
        comm = summary(tmp_path / sharding)["comm"]
        assert comm["all_to_all_bytes_per_step"] == comm["predicted_all_to_all_bytes_per_step"], sharding
        assert comm["all_reduce_bytes_per_step"] == 0  # nothing replicated
        assert comm["dense_all_reduce_bytes_per_step"] > 0
        # the 2 ranks' pieces (whole tables, or column shards) assemble into the plain model it scored
        trained = load_run(tmp_path / sharding)
        model = trained.plain_model()
        loader = ParquetBatches(dataset, "test", trained.batch_size, drop_last=False)
        with torch.no_grad():
            scores = [(torch.sigmoid(model(b.dense_features, b.sparse_features).squeeze(1)), b.labels)
                      for b in loader.batches(0)]  # fmt: skip
        auc = BinaryAUROC()
        auc.update(torch.cat([p for p, _ in scores]), torch.cat([y for _, y in scores]).long())
        assert float(auc.compute()) == pytest.approx(summary(tmp_path / sharding)["test_auc"], abs=1e-6), (
            sharding
        )


def test_the_split_is_the_optimum_of_a_toy_curve_solved_by_hand():
    """One table, counts [3, 1, 0, 0] (two rows never looked up), dim 2, 2 ranks, a global batch of 4
    (2 a rank), equal bandwidths. By hand, bytes per step (``comm_model``'s docstring):
    - split sizes, 24 * 2 * 1 = 48, always;
    - the one cold owner's rank receives from the other rank stride * (4 length + 2 * 2 * 4 pooled
      and gradient) + cold ids * 8, with cold ids = 2 * cold share, stride = max(1, cold ids);
    - the hot rows' gradients, all-reduced (2 * (2 - 1) = 2 times), 2 * 4 bytes for each touched row:
      row 0 with probability 1 - (1/4)^4 = 255/256, row 1 1 - (3/4)^4 = 175/256.
      H = 0: ids 2, stride 2:            48 + 40 + 16 + 0                        = 104
      H = 1: ids 0.5, stride 1:          48 + 20 + 4 + 2 * 8 * 255/256           = 87.9375
      H = 2: ids 0, stride 1:            48 + 20 + 0 + 2 * 8 * 430/256           = 94.875
      H = 3: as H = 2 (row 2 is never touched: it sends nothing)                 = 94.875
    The modeled time adds the host-to-device bytes of the cold lookups (no cache here: each one a miss,
    a row of 8 bytes): 4 lookups at H = 0, 1 at H = 1, none from H = 2 on; with equal bandwidths the time
    is proportional to 136, 95.9375, 94.875: so H = 2 (H = 3 is no candidate: row 2 has no lookups)."""
    table = TableStats("t", 4, 2, 1, np.array([3.0, 1.0, 0.0, 0.0]))
    by_hand = {0: 104, 1: 87.9375, 2: 94.875, 3: 94.875}
    for h, expected in by_hand.items():
        owners = comm_model.place_cold([table], {"t": h}, 2)
        assert comm_model.hybrid_bytes([table], {"t": h}, owners, 4, 2).network == pytest.approx(expected)
    same = comm_model.Network(1.0, 1.0, 1.0)
    choice = comm_model.choose_hot_rows([table], 2, 4, same, 8, float("inf"), {}, lambda t, hot: 0)
    assert choice.hot_rows == {"t": 2}
    assert choice.predicted.network == pytest.approx(94.875)
    assert choice.predicted.host_to_device == 0


def kaggle_like(n_rows=(10**6, 10**5, 10**4, 3000), dim=16) -> list[TableStats]:
    out = []
    for i, rows in enumerate(n_rows):
        counts = np.floor(1e7 / np.arange(1, rows + 1) ** 1.05)
        out.append(TableStats(f"t{i}", rows, dim, 1, counts))
    return out


def test_the_chosen_split_beats_every_fixed_share_of_hot_rows():
    tables, w, g = kaggle_like(), 8, 2048
    net = comm_model.Network(190e9, 130e9, 50e9)

    def none(t, hot):
        return 0

    best = comm_model.choose_hot_rows(tables, w, g, net, 64, float("inf"), {}, none)
    for share in (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0):
        hot = {t.name: int(share * t.rows) for t in tables}
        other = comm_model.evaluate(tables, hot, w, g, 64, net, none)
        assert best.seconds <= other.seconds, share


def test_without_a_device_budget_the_replicated_rows_are_what_the_cache_would_hold():
    """A replicated row untouched in a step sends nothing, so only device memory bounds the hot rows:
    without ``cache.device_budget_gb``, at most ``cache.ratio`` of all rows (unless fixed by the user)."""
    tables, cache, opt = kaggle_like(), CacheConfig(ratio=0.01), SparseOptimizer("adagrad")
    total = sum(t.rows for t in tables)
    plan = plan_hybrid(tables, 2, 16384, cache, opt, NetworkConfig())
    assert 0 < sum(plan.hot_rows.values()) <= 0.01 * total
    fixed = plan_hybrid(tables, 2, 16384, cache, opt, NetworkConfig(), fixed={"t0": 500_000})
    assert fixed.hot_rows["t0"] == 500_000 and sum(fixed.hot_rows.values()) <= 500_000


def test_bad_hybrid_settings_are_refused_before_any_work(dataset, tmp_path):  # noqa: F811
    too_many = run(1, tmp_path / "a", dataset, "trainer.sharding=hybrid", "trainer.sharded=true",
                   "+trainer.hot_rows.t_cat_2=999999")  # fmt: skip
    assert too_many.returncode == 2
    assert "trainer.hot_rows.t_cat_2=999999: the table has" in too_many.stderr
    unknown = run(1, tmp_path / "b", dataset, "trainer.sharding=hybrid", "trainer.sharded=true",
                  "+trainer.hot_rows.nope=3")  # fmt: skip
    assert unknown.returncode == 2 and "trainer.hot_rows.nope=3: no table 'nope'" in unknown.stderr
    small = run(1, tmp_path / "c", dataset, "trainer.sharding=hybrid", "trainer.sharded=true",
                "cache.device_budget_gb=0.0000001")  # fmt: skip
    assert small.returncode == 2 and "cache.device_budget_gb" in small.stderr
    elsewhere = run(1, tmp_path / "d", dataset, "+trainer.hot_rows.t_cat_2=3")
    assert elsewhere.returncode == 2 and "trainer.sharding=hybrid" in elsewhere.stderr
    for proc in (too_many, unknown, small, elsewhere):
        assert "Traceback" not in proc.stderr
    assert not any((tmp_path / d / "checkpoint").exists() for d in "abcd")
    with pytest.raises(ConfigError, match="trainer.network.all_reduce_gb_per_s"):
        NetworkConfig(all_reduce_gb_per_s=0)


def test_cold_caches_are_fitted_to_the_cold_lookups_of_a_step():
    tables = [TableStats(f"t{i}", 50_000, 16, counts=1e6 / np.arange(1, 50_001) ** 1.05) for i in range(3)]
    cache = CacheConfig(ratio=0.001, full_table_rows=100)
    plan = plan_hybrid(tables, 4, 2048, cache, SparseOptimizer("adagrad"), NetworkConfig())
    for t in tables:
        hot = plan.hot_rows[t.name]
        cold = TableStats(t.name, t.rows - hot, t.dim, counts=t.counts[hot:])
        expected = cold.expected_touched(cold.rows, 2048 * comm_model.cold_share(t, hot))
        assert plan.cache.capacity(t.name, cold.rows) >= 2 * expected > cache.capacity(t.name, cold.rows)
