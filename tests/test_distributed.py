"""The cache behind TorchRec sharding: 2 gloo ranks under torchrun against one unsharded process."""

import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig
from dlrm_cache.data.default_dataset import synthetic_dataset
from dlrm_cache.distributed.checkpoint import find_checkpoint, load_meta, pieces
from dlrm_cache.distributed.planner import LOADS, plan_cache
from dlrm_cache.distributed.table_stats import TableStats, fit_to_batch
from dlrm_cache.distributed.torchrec_stats import FrequencyCacheStatistics

COMMON = [
    "model.embedding_dim=8", "model.dense_arch_layer_sizes=[32,8]", "model.over_arch_layer_sizes=[32,1]",
    "train.batch_size=256", "train.log_every=1", "cache.ratio=0.02", "cache.lookahead=8",
    "cache.full_table_rows=100", "optim.dense=sgd", "optim.sparse_lr=0.05", "optim.dense_lr=0.05",
]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic_dataset(
        tmp_path_factory.mktemp("data"), 20_000, 0.002, row_group_rows=4096, progress=False
    )


def run(ranks: int, run_dir, dataset, *extra, timeout=300) -> subprocess.CompletedProcess:
    """dlrm-train on ``ranks`` gloo processes under torchrun, or as one plain process."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m"]
        if ranks > 1
        else [sys.executable, "-m"]
    )
    args = [*COMMON, f"data.path={dataset}", f"hydra.run.dir={run_dir}", *extra]
    return subprocess.run(
        [*launcher, "dlrm_cache.cli.train", *args], capture_output=True, text=True, timeout=timeout
    )


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(run_dir) -> list[float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r]


def tables(run_dir) -> dict[str, torch.Tensor]:
    """Full tables (weight | optimizer state) assembled from every rank's checkpoint file."""
    folder = find_checkpoint(run_dir)
    out: dict[str, torch.Tensor] = {}
    for p in pieces(folder, load_meta(folder)["world_size"]):
        w = out.setdefault(p.table, torch.full((p.full_rows, p.full_dim), float("nan")))
        rows, cols = p.rows, p.cols
        w[p.row_offset : p.row_offset + rows, p.col_offset : p.col_offset + cols] = p.read(0, rows)[:, :cols]
    return out


def assert_same_model(a, b) -> None:
    ta, tb = tables(a), tables(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert not torch.isnan(ta[name]).any() and not torch.isnan(tb[name]).any(), name
        torch.testing.assert_close(tb[name], ta[name], atol=2e-6, rtol=1e-5, msg=name)
    da, db = load_meta(find_checkpoint(a))["model"], load_meta(find_checkpoint(b))["model"]
    assert set(da) == set(db)
    for k in da:
        torch.testing.assert_close(db[k], da[k], atol=2e-6, rtol=1e-5, msg=k)


@pytest.mark.slow  # several processes
@pytest.mark.parametrize(
    "sharding,sparse", [("table_wise", "adagrad"), ("column_wise", "sgd"), ("column_wise", "adam")]
)
def test_two_ranks_train_like_one_unsharded_process(dataset, tmp_path, sharding, sparse):
    """Column-wise with row-wise Adagrad is left out on purpose: a column shard keeps its own row
    state (as FBGEMM's does), which is not the unsharded update."""
    steps = ["train.max_steps=12", f"optim.sparse={sparse}"]
    if sparse == "adam":
        steps.append("optim.sparse_lr=0.005")
    ok(run(1, tmp_path / "one", dataset, *steps, "cache.policy=none"))
    two = run(2, tmp_path / "two", dataset, *steps, f"trainer.sharding={sharding}")
    ok(two)
    printed = two.stdout + two.stderr
    assert printed.count("cache plan over 2 rank(s)") == 1  # by rank 0 only
    assert printed.count('"test_auc"') == 1  # one summary
    if sharding == "column_wise":
        assert "column_wise  0,1" in printed
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5, atol=1e-6)
    assert_same_model(tmp_path / "one", tmp_path / "two")
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s2["world_size"] == 2 and s2["sharded"]
    assert s2["test_auc"] == pytest.approx(s1["test_auc"], abs=1e-5)
    assert s2["cache"]["rows_loaded"] > 0  # the 2-rank run really went through the cache


@pytest.mark.slow  # several processes
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_checkpoint_moves_between_rank_counts(dataset, tmp_path, first, then):
    steps = ["optim.sparse=adagrad", "train.checkpoint_every=5"]
    ok(run(1, tmp_path / "straight", dataset, *steps, "train.max_steps=10"))
    moved = tmp_path / "moved"
    ok(run(first, moved, dataset, *steps, "train.max_steps=5"))
    assert load_meta(find_checkpoint(moved))["world_size"] == first
    ok(run(then, moved, dataset, *steps, "train.max_steps=10", "train.resume=true"))
    assert load_meta(find_checkpoint(moved))["step"] == 10
    np.testing.assert_allclose(losses(moved), losses(tmp_path / "straight"), rtol=1e-5, atol=1e-6)
    assert_same_model(tmp_path / "straight", moved)


@pytest.mark.slow  # several processes
def test_every_rank_writes_into_rank_0s_run_dir(dataset, tmp_path):
    """Hydra names a run dir per process (by default from its start time, which may differ between
    ranks); here each rank's differs on purpose, and everything still goes to rank 0's."""
    ok(run(2, str(tmp_path / "run_${oc.env:RANK}"), dataset, "train.max_steps=2"))
    first = tmp_path / "run_0"
    assert (first / "summary.json").is_file() and (first / "metrics.jsonl").is_file()
    assert {"meta.pt", "embeddings-rank0.json", "embeddings-rank1.json"} <= {
        p.name for p in (first / "checkpoint").iterdir()
    }
    assert not any(
        (tmp_path / "run_1" / name).exists() for name in ("checkpoint", "summary.json", "metrics.jsonl")
    )


@pytest.mark.slow  # several processes
def test_a_failing_rank_stops_the_job_with_its_error(dataset, tmp_path):
    """One bad id in rank 1's half of the first batch: its table's owner fails, torchrun stops the rest."""
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(dataset), str(bad)], check=True)
    part = sorted((bad / "train").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    column = table.column("cat_3").to_numpy().copy()
    column[200] = 10**9  # row 200 of the first 256-row batch: rank 1's share
    table = table.set_column(table.schema.get_field_index("cat_3"), "cat_3", pa.array(column))
    # without column statistics, so that the loader cannot refuse it up front: the table's owner finds it
    pq.write_table(table, part, row_group_size=4096, write_statistics=False)
    start = time.time()
    proc = run(2, tmp_path / "r", bad, "train.max_steps=4", timeout=240)
    assert proc.returncode != 0
    assert "feature 'cat_3': id 1000000000 is outside its table" in proc.stderr
    assert "dlrm-train [rank " in proc.stderr
    assert time.time() - start < 200


@pytest.mark.slow  # several processes
def test_a_batch_that_does_not_divide_over_the_ranks_is_refused_on_every_rank(dataset, tmp_path):
    proc = run(2, tmp_path / "r", dataset, "train.batch_size=255", "train.max_steps=2", timeout=240)
    assert proc.returncode != 0
    for r in (0, 1):
        assert (
            f"dlrm-train [rank {r}]: error: train.batch_size=255 does not divide over 2 ranks" in proc.stderr
        )
    assert not (tmp_path / "r" / "checkpoint").exists()


def skewed_tables(n=26, seed=0) -> list[TableStats]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rows = int(10 ** rng.uniform(2.5, 5.5))
        counts = np.floor(1e6 / np.arange(1, rows + 1) ** rng.uniform(0.6, 1.6))
        out.append(TableStats(f"t{i}", rows, int(rng.choice([16, 32, 64])), 1, counts))
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_planner_balances_its_three_loads_better_than_naive_placements(world_size):
    tables = skewed_tables()
    opt = SparseOptimizer("adagrad")
    plan = plan_cache(tables, world_size, CacheConfig(ratio=0.05, full_table_rows=1000), opt)
    mean = plan.loads.mean(axis=0)
    worst = float((plan.loads / mean).max())  # the largest normalised load on any rank
    assert worst < 1.35, plan.describe()
    # recompute the loads independently from the plan's shards and compare with what it reports
    by_name = {t.name: t for t in tables}
    loads = np.zeros((world_size, len(LOADS)))
    for s in plan.shards:
        t = by_name[s.table]
        b = 4 * (s.cols + opt.state_width(s.cols))
        loads[s.rank] += [(1 - t.hit_share(s.cache_rows)) * b, t.rows * b, s.cache_rows * b]
    np.testing.assert_allclose(loads, plan.loads, rtol=1e-12)
    # ... and beat round-robin and random placements of the same tables on the same measure
    rng = np.random.default_rng(1)
    cost = {s.table: plan.shard_loads[s.table, s.rank] for s in plan.shards}
    for trial in range(50):
        ranks = (
            np.arange(len(tables)) % world_size if trial == 0 else rng.integers(0, world_size, len(tables))
        )
        other = np.zeros_like(loads)
        for t, r in zip(tables, ranks, strict=True):
            other[r] += cost[t.name]
        assert worst <= float((other / mean).max()) + 1e-9


def test_device_budget_sizes_caches_by_frequency_within_each_rank():
    tables = skewed_tables(12, seed=3)
    opt = SparseOptimizer("sgd")
    budget_gb = 0.004
    plan = plan_cache(tables, 2, CacheConfig(device_budget_gb=budget_gb, full_table_rows=500), opt)
    assert (plan.loads[:, 2] <= budget_gb * 2**30).all()
    assert (plan.loads[:, 2] >= 0.97 * budget_gb * 2**30).all()  # the budget is used, not wasted
    # the same device memory spent as a flat ratio misses more
    flat_ratio = float(plan.loads[:, 2].sum()) / sum(4 * t.dim * t.rows for t in tables)
    flat = plan_cache(tables, 2, CacheConfig(ratio=flat_ratio, full_table_rows=500), opt)
    assert plan.loads[:, 0].sum() < flat.loads[:, 0].sum()
    # water-filling: a row left out is never hotter than a row kept, within a rank
    for r in range(2):
        mine = [
            s for s in plan.shards if s.rank == r and s.cache_rows < {t.name: t.rows for t in tables}[s.table]
        ]
        kept_min = min(t.counts[s.cache_rows - 1] for s in mine for t in tables if t.name == s.table)
        left_max = max(t.counts[s.cache_rows] for s in mine for t in tables if t.name == s.table)
        assert left_max <= kept_min
    with pytest.raises(ValueError, match="device_budget_gb"):
        plan_cache(tables, 2, CacheConfig(device_budget_gb=1e-7, full_table_rows=500), opt)


def test_cache_statistics_for_torchrecs_planner():
    rows = 10_000
    skewed = FrequencyCacheStatistics(
        TableStats("s", rows, 8, 1, np.floor(1e6 / np.arange(1, rows + 1) ** 1.2)), 512
    )
    uniform = FrequencyCacheStatistics(TableStats("u", rows, 8, 1, np.full(rows, 5.0)), 512)
    assert uniform.expected_miss_rate(0.0) == 1.0 and uniform.expected_miss_rate(1.0) == 0.0
    assert uniform.expected_miss_rate(0.25) == pytest.approx(0.75)
    assert skewed.expected_miss_rate(0.01) < 0.5 < uniform.expected_miss_rate(0.01)
    assert skewed.cacheability < 0.2 and uniform.cacheability == pytest.approx(1.0, abs=1e-3)
    # distinct rows in a batch of 512 uniform draws from 10k: 10k * (1 - (1 - 1e-4)^512)
    assert uniform.expected_lookups == pytest.approx(rows * (1 - (1 - 1 / rows) ** 512), rel=1e-6)
    assert skewed.expected_lookups < uniform.expected_lookups


def test_torchrecs_prefetch_hook_hands_the_kernel_the_next_batch():
    """``CachedPooledEmbeddingsLookup.prefetch`` (what TorchRec's prefetch pipeline calls after input
    dist): the kernel queues and plans that batch, and training matches the unsharded model."""
    import torch.distributed as dist
    from torchrec.models.dlrm import DLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dlrm_cache.cache import CachedEmbeddingBagCollection
    from dlrm_cache.distributed.rank import Rank
    from dlrm_cache.distributed.runtime import EBC_FQN, init_process_group, shard

    rows, batch, opt = [300, 40, 2000], 32, SparseOptimizer("adagrad", lr=0.1)
    configs = [EmbeddingBagConfig(num_embeddings=r, embedding_dim=8, name=f"t{i}", feature_names=[f"f{i}"])
               for i, r in enumerate(rows)]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(6):
        ids = torch.cat([torch.randint(0, r, (batch,), generator=g) for r in rows])
        kjt = KeyedJaggedTensor(
            keys=["f0", "f1", "f2"], values=ids, lengths=torch.ones(3 * batch, dtype=torch.int32)
        )
        batches.append(
            (torch.randn(batch, 4, generator=g), kjt, torch.randint(0, 2, (batch,), generator=g).float())
        )

    def dlrm(ebc):
        torch.manual_seed(1)
        return DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8, 8],
                    over_arch_layer_sizes=[8, 1])  # fmt: skip

    def train(model, before_step=lambda i: None):
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        out = []
        for i, (d, s, y) in enumerate(batches):
            before_step(i)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(d, s).squeeze(1), y)
            sgd.zero_grad()
            loss.backward()
            sgd.step()
            out.append(loss.item())
        return out

    reference = train(dlrm(CachedEmbeddingBagCollection(configs, CacheConfig(policy="none"), opt)))
    init_process_group(torch.device("cpu"), Rank())
    try:
        cache = CacheConfig(ratio=0.1, full_table_rows=50, lookahead=0)
        stats = [TableStats(c.name, c.num_embeddings, 8) for c in configs]
        plan = plan_cache(stats, 1, cache, opt)
        model, sharded_cache = shard(plan, configs, dlrm, opt, 0, torch.device("cpu"))
        sm = model.module.get_submodule(EBC_FQN)
        seen = []

        def prefetch(j):  # batch j after input dist, as TorchRec's prefetch pipeline hands it over
            dist_input = sm.input_dist(sm.create_context(), batches[j][1]).wait().wait()
            for lookup, features in zip(sm._lookups, dist_input, strict=True):
                lookup.prefetch(features)
            seen.append(all(k.cache.is_enqueued(f) for k in sharded_cache.kernels for f in dist_input))

        def prefetch_next(i):  # the pipeline prefetches batch i + 1 while batch i trains
            if i == 0:
                prefetch(0)
            if i + 1 < len(batches):
                prefetch(i + 1)

        assert train(model, prefetch_next) == pytest.approx(reference, rel=1e-5, abs=1e-6)
        assert seen and all(seen)
        assert sharded_cache.stats()["rows_loaded"] > 0
        sharded_cache.close()
    finally:
        dist.destroy_process_group()


def test_checkpoint_pieces_reassemble_into_any_column_split(tmp_path):
    """Adam's per-column moments and Adagrad's per-row state follow their columns across splits:
    a whole table -> two column halves (two ranks) -> a whole table and a middle column shard."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from dlrm_cache.cache import CachedEmbeddingBagCollection
    from dlrm_cache.cache.host import TableShard
    from dlrm_cache.distributed.checkpoint import load_embeddings, write_embeddings

    def rows_of(ebc):
        return ebc.groups[0].table_rows(0).clone()

    for kind in ("adam", "adagrad"):
        opt = SparseOptimizer(kind, lr=0.05)

        def shard(cols, col_offset=0, opt=opt):
            table = EmbeddingBagConfig(num_embeddings=50, embedding_dim=cols, name="t", feature_names=["f"])
            spec = {"t": TableShard(0, col_offset, 50, 8)}
            return CachedEmbeddingBagCollection([table], CacheConfig(policy="none"), opt, shards=spec), spec

        whole, _ = shard(8)
        ids = torch.randint(0, 50, (64,), generator=torch.Generator().manual_seed(0))
        batch = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.ones(64, dtype=torch.int32))
        whole(batch).values().pow(2).sum().backward()  # one fused update: non-zero optimizer state
        expected = rows_of(whole)
        state = expected[:, 8:]
        assert state.abs().sum() > 0
        (one := tmp_path / f"{kind}-1").mkdir()
        write_embeddings(one, 0, [(whole, {})])
        halves = [shard(4, c) for c in (0, 4)]
        load_embeddings(one, 1, halves)
        (two := tmp_path / f"{kind}-2").mkdir()
        for rank, half in enumerate(halves):
            write_embeddings(two, rank, [half])
        again, middle = shard(8), shard(4, 2)
        load_embeddings(two, 2, [again, middle])
        assert torch.equal(rows_of(again[0])[:, :8], expected[:, :8])
        assert torch.equal(rows_of(middle[0])[:, :4], expected[:, 2:6])
        if opt.state_per_column:  # [m | v], each column with its weight
            assert torch.equal(rows_of(again[0]), expected)
            assert torch.equal(rows_of(middle[0])[:, 4:], torch.cat([state[:, 2:6], state[:, 10:14]], 1))
        else:  # one value per row: the piece holding the shard's first column gives it
            assert torch.equal(rows_of(middle[0])[:, 4:], state)
        assert again[0].optimizer_step == middle[0].optimizer_step == 1


def test_caches_too_small_for_a_step_are_raised_to_fit_and_asked_sizes_kept():
    uniform = TableStats("u", 30_000, 8, counts=np.ones(30_000))
    skewed = TableStats("z", 30_000, 8, counts=1e6 / np.arange(1, 30_001) ** 1.2)
    asked = TableStats("a", 30_000, 8, counts=np.ones(30_000))
    small = TableStats("s", 500, 8, counts=np.ones(500))
    big = TableStats("b", 10_000_000, 8)
    cache = CacheConfig(ratio=0.015, full_table_rows=1000, table_ratios={"a": 0.001})
    fitted, raised = fit_to_batch(cache, [uniform, skewed, asked, small, big], lookups=2048)
    # uniform over 30,000 rows, 2,048 lookups: 1,981 distinct rows expected; twice (E + 4 sd)
    expected = 30_000 * -np.expm1(2048 * np.log1p(-1 / 30_000))
    assert raised["u"] == (450, int(np.ceil(2 * (expected + 4 * np.sqrt(expected)))))
    assert fitted.capacity("u", 30_000) == raised["u"][1]
    # a skewed table's batch touches fewer rows: raised less
    assert 450 < raised["z"][1] < raised["u"][1]
    # asked sizes, tables kept whole, and caches already large enough stay as they were
    assert "a" not in raised and fitted.capacity("a", 30_000) == 30
    assert "s" not in raised and "b" not in raised and fitted.capacity("b", 10_000_000) == 150_000
