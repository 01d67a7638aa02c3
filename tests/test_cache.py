"""The cached collection trains exactly like the tables held whole on the device, and like the
references (nn.EmbeddingBag + torch.optim.SGD / SparseAdam, FBGEMM's row-wise Adagrad)."""

import copy
import gc
import logging

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm_cache import native_build
from dlrm_cache.cache import group as group_module
from dlrm_cache.cache import python_planner
from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
from dlrm_cache.cache.future import FutureIndex
from dlrm_cache.cache.native import NativePlanner, RowKernels
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.cache.policy import NO_NEXT_USE
from dlrm_cache.config import CacheConfig, ConfigError

ROWS = [40, 3000, 600]  # a small table (wholly on the device) and two cached ones
POLICIES = ["lru", "lfu", "freq", "lookahead"]
OPTIMIZERS = ["sgd", "adagrad", "adam"]


def make_tables(dim=4, pooling=PoolingType.SUM, rows=ROWS):
    return [
        EmbeddingBagConfig(
            num_embeddings=n, embedding_dim=dim, name=f"t{i}", feature_names=[f"f{i}"], pooling=pooling
        )
        for i, n in enumerate(rows)
    ]


def make_batches(steps, batch_size=16, seed=0, rows=ROWS, one_hot=False):
    """Power-law ids (low ids hot, as after frequency re-numbering); 0..3 ids per bag, or exactly one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        if one_hot:
            lengths = torch.ones(len(rows) * batch_size, dtype=torch.int64)
        else:
            lengths = torch.randint(0, 4, (len(rows) * batch_size,), generator=g)
        values = []
        for i, n in enumerate(rows):
            k = int(lengths[i * batch_size : (i + 1) * batch_size].sum())
            values.append((torch.rand(k, generator=g) ** 3 * n).long())
        out.append(
            KeyedJaggedTensor(
                keys=[f"f{i}" for i in range(len(rows))], values=torch.cat(values), lengths=lengths
            )
        )
    return out


def loss_of(pooled):
    """A loss whose gradient differs per position, so every row gets its own update."""
    weights = torch.arange(pooled.numel(), dtype=torch.float32).view_as(pooled).sin()
    return (pooled * weights).sum()


def train(ebc, batches, lookahead=0, prefetch=True):
    """Train on `batches` the way the trainer will: enqueue ahead, prefetch during the step."""
    outputs = []
    for b in batches[:lookahead]:
        ebc.enqueue(b)
    for i, b in enumerate(batches):
        if lookahead and i + lookahead < len(batches):
            ebc.enqueue(batches[i + lookahead])
        pooled = ebc(b).values()
        outputs.append(pooled.detach().clone())
        if prefetch:
            ebc.prefetch()
        loss_of(pooled).backward()
    return outputs


def cache_cfg(policy, ratio, **kw):
    return CacheConfig(policy=policy, ratio=ratio, full_table_rows=50, warmup_ratio=0.5, **kw)


def reference_bags(ebc, mode="sum", sparse=False):
    """nn.EmbeddingBag copies of the collection's tables, starting from its weights."""
    init = ebc.state_dict()
    bags = []
    for i, t in enumerate(ebc.embedding_bag_configs()):
        bag = torch.nn.EmbeddingBag(t.num_embeddings, t.embedding_dim, mode=mode, sparse=sparse)
        bag.weight.data.copy_(init[f"embedding_bags.t{i}.weight"])
        bags.append(bag)
    return bags


def pooled_by(bags, kjt):
    per_feature = kjt.to_dict()
    return torch.cat(
        [
            bag(per_feature[f"f{i}"].values(), per_feature[f"f{i}"].offsets()[:-1])
            for i, bag in enumerate(bags)
        ],
        dim=1,
    )


def assert_same_weights(ebc, bags):
    final = ebc.state_dict()
    for i, bag in enumerate(bags):
        torch.testing.assert_close(
            final[f"embedding_bags.t{i}.weight"], bag.weight.detach(), atol=1e-6, rtol=1e-5
        )


def assert_same_state(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


# Every way a step can run (planner, row copies, bookkeeping): the CPU's default, CUDA's branches
# (torch copies, a bookkeeping thread) run here on the CPU, and the Python planner.
MODES = {
    "native-inline": {"planner": "native", "row_copies": "native", "bookkeeping": "inline"},
    "native-thread": {"planner": "native", "row_copies": "native", "bookkeeping": "thread"},
    "native-torchcopies-inline": {"planner": "native", "row_copies": "torch", "bookkeeping": "inline"},
    "native-torchcopies-thread": {"planner": "native", "row_copies": "torch", "bookkeeping": "thread"},
    "python-inline": {"planner": "python", "row_copies": "torch", "bookkeeping": "inline"},
    "python-thread": {"planner": "python", "row_copies": "torch", "bookkeeping": "thread"},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("ratio", [0.002, 0.2], ids=["tiny-overflows", "normal"])
def test_every_policy_trains_like_all_on_device(policy, optimizer, ratio, mode, caplog):
    opt = SparseOptimizer(optimizer, lr=0.05)
    batches = make_batches(60)
    reference = CachedEmbeddingBagCollection(make_tables(), CacheConfig(policy="none"), opt)
    cfg = cache_cfg(policy, ratio, lookahead=3, **MODES[mode])
    cached = CachedEmbeddingBagCollection(make_tables(), cfg, opt)
    with caplog.at_level(logging.WARNING):
        expected = train(reference, batches, lookahead=3)
        got = train(cached, batches, lookahead=3)
    for step, (e, g) in enumerate(zip(expected, got, strict=True)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5, msg=f"step {step}")
    assert_same_state(reference, cached, atol=1e-6)
    stats = cached.stats()
    assert stats["rows_loaded"] > 0 and stats["rows_written"] > 0
    if ratio < 0.01:
        assert stats["rows_from_host"] > 0, "the tiny cache must have overflowed"
        overflow_logs = [r for r in caplog.records if "served from the host" in r.message]
        assert 1 <= len(overflow_logs) <= 2, "logged once per table"
    else:
        assert not [r for r in caplog.records if "served from the host" in r.message], "no overflow"
        if policy != "lookahead":  # lookahead may also serve a cold miss from the host (bypass)
            assert stats["rows_from_host"] == 0


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_mean_pooled_bags_train_like_all_on_device(optimizer):
    """Bags of 0 to 3 ids, mean-pooled (an empty bag pools to zeros), for every optimizer."""
    opt = SparseOptimizer(optimizer, lr=0.05)
    batches = make_batches(40)
    tables = make_tables(pooling=PoolingType.MEAN)
    reference = CachedEmbeddingBagCollection(tables, CacheConfig(policy="none"), opt)
    cached = CachedEmbeddingBagCollection(make_tables(pooling=PoolingType.MEAN), cache_cfg("lookahead", 0.02,
                                          lookahead=3), opt)  # fmt: skip
    expected, got = train(reference, batches, lookahead=3), train(cached, batches, lookahead=3)
    for step, (e, g) in enumerate(zip(expected, got, strict=True)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5, msg=f"step {step}")
    assert_same_state(reference, cached, atol=1e-6)
    assert cached.stats()["rows_loaded"] > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("one_hot", [False, True], ids=["multi-hot", "one-hot"])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_sgd_matches_nn_embedding_bag_and_torch_sgd(pooling, one_hot, mode):
    tables = make_tables(dim=8, pooling=pooling)
    batches = make_batches(30, one_hot=one_hot)
    ebc = CachedEmbeddingBagCollection(
        tables, cache_cfg("lookahead", 0.02, lookahead=2, **MODES[mode]), SparseOptimizer("sgd", lr=0.1)
    )
    bags = reference_bags(ebc, mode="sum" if pooling == PoolingType.SUM else "mean")
    sgd = torch.optim.SGD([b.weight for b in bags], lr=0.1)
    got = train(ebc, batches, lookahead=2)
    for step, b in enumerate(batches):
        pooled = pooled_by(bags, b)
        torch.testing.assert_close(got[step], pooled.detach(), atol=1e-6, rtol=1e-5)
        sgd.zero_grad()
        loss_of(pooled).backward()
        sgd.step()
    assert_same_weights(ebc, bags)


def test_adam_matches_torch_sparse_adam():
    tables = make_tables(dim=4)
    batches = make_batches(25)
    ebc = CachedEmbeddingBagCollection(tables, cache_cfg("lru", 0.02), SparseOptimizer("adam", lr=0.01))
    bags = reference_bags(ebc, sparse=True)
    adam = torch.optim.SparseAdam([b.weight for b in bags], lr=0.01)
    train(ebc, batches)
    for b in batches:
        pooled = pooled_by(bags, b)
        adam.zero_grad()
        loss_of(pooled).backward()
        adam.step()
    assert_same_weights(ebc, bags)


def test_adagrad_matches_fbgemm_exact_rowwise_adagrad():
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    tables = make_tables(dim=8)
    batches = make_batches(25)
    ebc = CachedEmbeddingBagCollection(
        tables, cache_cfg("freq", 0.02), SparseOptimizer("adagrad", lr=0.1, eps=1e-8)
    )
    init = ebc.state_dict()
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(t.num_embeddings, 8, EmbeddingLocation.HOST, ComputeDevice.CPU) for t in tables],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.1,
        eps=1e-8,
    )
    for i, w in enumerate(tbe.split_embedding_weights()):
        w.data.copy_(init[f"embedding_bags.t{i}.weight"])
    train(ebc, batches)
    for b in batches:
        out = tbe(b.values(), b.offsets())
        loss_of(out).backward()
    final = ebc.state_dict()
    for i, (w, (momentum,)) in enumerate(
        zip(tbe.split_embedding_weights(), tbe.split_optimizer_states(), strict=True)
    ):
        torch.testing.assert_close(final[f"embedding_bags.t{i}.weight"], w, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            final[f"embedding_bags.t{i}.optimizer_state"][:, 0], momentum, atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_state_dict_round_trip_mid_training_continues_identically(optimizer):
    """Saved while the next batch is already planned (prefetched) and more are enqueued."""
    opt = SparseOptimizer(optimizer, lr=0.05)
    batches = make_batches(40)
    straight = CachedEmbeddingBagCollection(make_tables(), cache_cfg("lookahead", 0.02, lookahead=2), opt)
    train(straight, batches, lookahead=2)

    def steps(ebc, start, stop):
        for i in range(start, stop):
            if i + 2 < len(batches):
                ebc.enqueue(batches[i + 2])
            pooled = ebc(batches[i]).values()
            ebc.prefetch()
            loss_of(pooled).backward()

    first = CachedEmbeddingBagCollection(make_tables(), cache_cfg("lookahead", 0.02, lookahead=2), opt)
    for b in batches[:2]:
        first.enqueue(b)
    steps(first, 0, 17)
    saved = first.state_dict()
    resumed = CachedEmbeddingBagCollection(
        make_tables(), cache_cfg("lookahead", 0.02, lookahead=2), opt, seed=99
    )
    resumed.load_state_dict(saved)
    for b in batches[17:19]:
        resumed.enqueue(b)
    steps(resumed, 17, 40)
    assert_same_state(straight, resumed, atol=1e-6)


def test_only_dirty_rows_are_written_back():
    ebc = CachedEmbeddingBagCollection(make_tables(), cache_cfg("lru", 0.05), SparseOptimizer("sgd"))
    stats = ebc.stats()
    assert stats["warmup_rows"] > 0 and stats["rows_written"] == 0
    ebc.flush()
    assert ebc.stats()["rows_written"] == 0, "warm-up rows are clean: flushing them writes nothing"
    train(ebc, make_batches(5))
    ebc.flush()
    written = ebc.stats()["rows_written"]
    # Every row touched in training is dirty once; nothing else is ever written.
    assert 0 < written <= ebc.stats()["rows_touched"]
    ebc.flush()
    assert ebc.stats()["rows_written"] == written, "a second flush finds nothing dirty"


def test_evaluation_writes_nothing_back_and_admits_nothing():
    ebc = CachedEmbeddingBagCollection(
        make_tables(), cache_cfg("lookahead", 0.05), SparseOptimizer("adagrad")
    )
    train(ebc, make_batches(5))
    before = ebc.stats()
    host_before = [g.host.data.clone() for g in ebc.groups if g.host is not None]
    ebc.eval()
    with torch.no_grad():
        for b in make_batches(5, seed=1):
            ebc(b)
    after = ebc.stats()
    for key in ("rows_written", "rows_loaded", "rows_touched", "lookups"):
        assert after[key] == before[key], key
    assert after["eval"]["lookups"] > 0 and after["eval"]["rows_from_host"] > 0
    for g, h in zip([g for g in ebc.groups if g.host is not None], host_before, strict=True):
        assert torch.equal(g.host.data, h)


def test_eval_reads_the_latest_trained_values():
    opt = SparseOptimizer("adagrad", lr=0.05)
    reference = CachedEmbeddingBagCollection(make_tables(), CacheConfig(policy="none"), opt)
    cached = CachedEmbeddingBagCollection(make_tables(), cache_cfg("lru", 0.02), opt)
    for m in (reference, cached):
        train(m, make_batches(10))
        m.eval()
    with torch.no_grad():
        for b in make_batches(5, seed=7):
            torch.testing.assert_close(cached(b).values(), reference(b).values(), atol=1e-6, rtol=1e-5)


def test_mmap_host_tier_trains_a_table_larger_than_its_cache(tmp_path):
    rows = [200_000]
    opt = SparseOptimizer("adagrad", lr=0.05)
    cfg = CacheConfig(policy="lookahead", ratio=0.001, host="mmap", mmap_dir=str(tmp_path), warmup_ratio=0.5)
    cached = CachedEmbeddingBagCollection(make_tables(dim=16, rows=rows), cfg, opt)
    reference = CachedEmbeddingBagCollection(make_tables(dim=16, rows=rows), CacheConfig(policy="none"), opt)
    (file,) = tmp_path.iterdir()
    cache_bytes = cached.groups[0].cache.numel() * 4
    assert file.stat().st_size == 200_000 * 17 * 4 > 100 * cache_bytes
    batches = make_batches(20, batch_size=64, rows=rows)
    for e, g in zip(train(reference, batches), train(cached, batches, lookahead=2), strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    assert_same_state(reference, cached, atol=1e-6)
    cached.close()
    assert not list(tmp_path.iterdir()), "the scratch file goes with the collection"


def test_drops_into_torchrec_dlrm():
    from torchrec.models.dlrm import DLRM

    tables = make_tables(dim=8)
    ebc = CachedEmbeddingBagCollection(tables, cache_cfg("lookahead", 0.05), SparseOptimizer("adagrad"))
    model = DLRM(
        embedding_bag_collection=ebc,
        dense_in_features=13,
        dense_arch_layer_sizes=[16, 8],
        over_arch_layer_sizes=[8, 1],
    )
    b = make_batches(1)[0]
    logits = model(torch.randn(16, 13), b)
    assert logits.shape == (16, 1)
    logits.sum().backward()
    assert ebc.stats()["rows_touched"] > 0


def test_tables_of_different_dims_and_poolings_keep_feature_order():
    tables = [
        EmbeddingBagConfig(num_embeddings=100, embedding_dim=4, name="a", feature_names=["f0"]),
        EmbeddingBagConfig(num_embeddings=3000, embedding_dim=8, name="b", feature_names=["f1"]),
        EmbeddingBagConfig(
            num_embeddings=600, embedding_dim=4, name="c", feature_names=["f2"], pooling=PoolingType.MEAN
        ),
    ]
    opt = SparseOptimizer("sgd", lr=0.1)
    ebc = CachedEmbeddingBagCollection(tables, cache_cfg("lru", 0.02), opt)
    ref = CachedEmbeddingBagCollection(tables, CacheConfig(policy="none"), opt)
    b = make_batches(1)[0]
    out = ebc(b)
    assert out.keys() == ["f0", "f1", "f2"] and out.length_per_key() == [4, 8, 4]
    torch.testing.assert_close(out.values(), ref(b).values())
    per_feature = b.to_dict()
    w = ebc.state_dict()["embedding_bags.c.weight"]
    jt = per_feature["f2"]
    expected = torch.nn.functional.embedding_bag(jt.values(), w, jt.offsets()[:-1], mode="mean")
    torch.testing.assert_close(out.to_dict()["f2"], expected)


def test_out_of_range_id_names_the_feature():
    ebc = CachedEmbeddingBagCollection(make_tables(), cache_cfg("lru", 0.05), SparseOptimizer("sgd"))
    bad = KeyedJaggedTensor(
        keys=["f0", "f1", "f2"], values=torch.tensor([1, 3000, 2]), lengths=torch.tensor([1, 1, 1])
    )
    with pytest.raises(ValueError, match=r"feature 'f1': id 3000 is outside its table 't1' of 3000 rows"):
        ebc(bad)


def test_forward_must_follow_the_enqueued_order():
    ebc = CachedEmbeddingBagCollection(make_tables(), cache_cfg("lookahead", 0.05), SparseOptimizer("sgd"))
    a, b = make_batches(2, seed=3)
    ebc.enqueue(a)
    with pytest.raises(ValueError, match="enqueue"):
        ebc(b)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"ratio": 0.0}, "cache.ratio"),
        ({"ratio": 1.5}, "cache.ratio"),
        ({"lookahead": -1}, "cache.lookahead"),
        ({"policy": "fifo"}, "cache.policy"),
        ({"warmup_ratio": 2.0}, "cache.warmup_ratio"),
        ({"host": "disk"}, "cache.host"),
        ({"bookkeeping": "async"}, "cache.bookkeeping"),
        ({"row_copies": "memcpy"}, "cache.row_copies"),
    ],
)
def test_bad_cache_config_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        CacheConfig(**kwargs)


def test_bad_optimizer_and_tables_are_refused():
    with pytest.raises(ValueError, match="optim.sparse='rmsprop'"):
        SparseOptimizer("rmsprop")
    with pytest.raises(ValueError, match="Duplicate table name t0"):
        CachedEmbeddingBagCollection(make_tables() + make_tables()[:1], CacheConfig(), SparseOptimizer())
    with pytest.raises(ValueError, match="cache.table_ratios names unknown tables"):
        CachedEmbeddingBagCollection(
            make_tables(), CacheConfig(table_ratios={"nope": 0.1}), SparseOptimizer()
        )


def test_evaluation_between_prefetched_steps_sees_the_trained_values():
    """An eval lookup while the next step's plan runs in the background waits for it, and reads
    every row at its latest value."""
    opt = SparseOptimizer("adagrad", lr=0.05)
    reference = CachedEmbeddingBagCollection(make_tables(), CacheConfig(policy="none"), opt)
    cached = CachedEmbeddingBagCollection(make_tables(), cache_cfg("lookahead", 0.01, lookahead=2), opt)
    batches, probes = make_batches(12), make_batches(12, seed=5)
    for m in (reference, cached):
        for b in batches[:2]:
            m.enqueue(b)
    for i, b in enumerate(batches):
        for m in (reference, cached):
            if i + 2 < len(batches):
                m.enqueue(batches[i + 2])
            pooled = m(b).values()
            m.prefetch()
            loss_of(pooled).backward()
            m.eval()
            with torch.no_grad():
                m.probe = m(probes[i]).values()
            m.train()
        torch.testing.assert_close(cached.probe, reference.probe, atol=1e-6, rtol=1e-5)


def test_a_bad_id_in_an_enqueued_batch_fails_at_its_forward():
    ebc = CachedEmbeddingBagCollection(make_tables(), cache_cfg("lookahead", 0.05), SparseOptimizer("sgd"))
    bad = KeyedJaggedTensor(
        keys=["f0", "f1", "f2"], values=torch.tensor([1, -4, 2]), lengths=torch.tensor([1, 1, 1])
    )
    ebc.enqueue(bad)
    with pytest.raises(ValueError, match=r"feature 'f1': id -4 is outside its table 't1'"):
        ebc(bad)


@pytest.mark.parametrize("policy", ["freq", "lookahead"])
@pytest.mark.parametrize("ratio", [0.002, 0.2], ids=["tiny-overflows", "normal"])
@pytest.mark.parametrize("parallel_rows", [0, 1 << 62], ids=["tables-at-once", "one-thread"])
def test_the_native_planner_makes_the_python_planners_plans(policy, ratio, parallel_rows, monkeypatch):
    """Where eviction keys have no ties (ids ranked by frequency, so the key's coldness is the row),
    planner.cpp must pick exactly the slots, victims and host-served rows the Python planner picks,
    whether it plans the tables one after the other or at once on several threads. Small candidate
    pools make both refill and rebuild their pools often."""
    monkeypatch.setattr(python_planner, "POOL_MIN", 3)
    monkeypatch.setattr(python_planner, "POOL_FACTOR", 2)
    monkeypatch.setattr(python_planner, "POOL_REBUILD", 2)
    monkeypatch.setattr(group_module, "_PARALLEL_ROWS", parallel_rows)
    plans = {"native": [], "python": []}
    plan = group_module.TableGroup.plan

    def recording_plan(self, *args):
        p = plan(self, *args)
        over = None if p.overflow is None else p.overflow.clone()
        plans["native" if isinstance(self.planner, NativePlanner) else "python"].append(
            (p.slots.clone(), over)
        )
        return p

    monkeypatch.setattr(group_module.TableGroup, "plan", recording_plan)
    rows = [40, 3000, 600, 9000]
    batches = make_batches(80, batch_size=24, rows=rows)
    stats, states = {}, {}
    for planner in plans:
        ebc = CachedEmbeddingBagCollection(
            make_tables(rows=rows), cache_cfg(policy, ratio, lookahead=4, planner=planner), SparseOptimizer()
        )
        train(ebc, batches, lookahead=4)
        g = ebc.groups[0]
        states[planner] = [
            g.state.row_to_slot,
            g.state.slot_to_row,
            g.state.dirty,
            g.state.filled,
            g.state.pin_until,
        ]
        if policy == "lookahead":
            states[planner] += [g.state.next_use, g.future.last_pos, g.future.arena]
        stats[planner] = {k: v for k, v in ebc.stats().items() if k != "bookkeeping_s"}
    assert len(plans["native"]) == len(plans["python"]) == len(batches)
    for step, (n, p) in enumerate(zip(plans["native"], plans["python"], strict=True)):
        assert torch.equal(n[0], p[0]), f"step {step}: slots differ"
        assert (n[1] is None) == (p[1] is None) and (n[1] is None or torch.equal(n[1], p[1])), step
    for a, b in zip(states["native"], states["python"], strict=True):
        assert torch.equal(a, b)
    assert stats["native"] == stats["python"]
    assert stats["native"]["rows_loaded"] > 0 and stats["native"]["rows_written"] > 0
    if ratio < 0.01:
        assert stats["native"]["rows_from_host"] > 0


def test_planner_without_a_compiler(monkeypatch, caplog, request):
    """``planner=native`` says why it cannot build; ``auto`` falls back to Python with a warning."""
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    native_build.forget()  # built and announced already: forget both, then again after the test
    request.addfinalizer(native_build.forget)
    with pytest.raises(native_build.NativeUnavailable, match="cache.planner=native: no C.. compiler"):
        CachedEmbeddingBagCollection(
            make_tables(), cache_cfg("lru", 0.2, planner="native"), SparseOptimizer()
        )
    with caplog.at_level(logging.WARNING):
        ebc = CachedEmbeddingBagCollection(make_tables(), cache_cfg("lru", 0.2), SparseOptimizer())
    assert not any(isinstance(g.planner, NativePlanner) for g in ebc.groups)
    assert "planning in Python" in caplog.text


def test_the_planner_builds_serial_where_the_compiler_has_no_openmp(monkeypatch, tmp_path, request):
    """planner.cpp and prepare.cpp without OpenMP (a compiler that refuses the flag) build serial and
    train the same."""
    opt = SparseOptimizer("adagrad", lr=0.05)
    batches = make_batches(20)
    cfg = cache_cfg("lookahead", 0.2, planner="native")
    threaded = train(CachedEmbeddingBagCollection(make_tables(), cfg, opt), batches)
    monkeypatch.setattr(native_build, "OPENMP", ["-fno-such-openmp-flag"])
    monkeypatch.setenv("DLRM_CACHE_BUILD_DIR", str(tmp_path))
    native_build.forget()
    request.addfinalizer(native_build.forget)
    serial = train(CachedEmbeddingBagCollection(make_tables(), cfg, opt), batches)
    built = sorted(p.name.split("-")[0] for p in tmp_path.glob("*.so"))
    assert built == ["planner", "prepare"]  # the serial builds only
    torch.testing.assert_close(torch.stack(serial), torch.stack(threaded))


def test_a_deep_copy_trains_on_its_own():
    """copy.deepcopy gives the copy its own C++ planner (no shared handle, freed twice): the copy and
    the original then train alike."""
    opt = SparseOptimizer("adagrad", lr=0.05)
    batches = make_batches(30)
    a = CachedEmbeddingBagCollection(make_tables(), cache_cfg("lookahead", 0.2, planner="native"), opt)
    train(a, batches[:10])
    b = copy.deepcopy(a)
    assert b.groups[0].planner is not a.groups[0].planner
    torch.testing.assert_close(torch.stack(train(a, batches[10:])), torch.stack(train(b, batches[10:])))
    del a
    gc.collect()
    train(b, batches[:5])  # the copy's planner outlives the original's


def test_future_index_gives_each_rows_next_use_while_its_arena_wraps_and_grows():
    """The lookahead's next uses against a direct scan of the window, with an arena so small that
    batches wrap around its end and it has to grow."""
    gen = torch.Generator().manual_seed(0)
    batches = [
        torch.unique(torch.randint(0, 30, (int(n),), generator=gen)) for n in torch.randint(1, 12, (60,))
    ]
    window, future = 3, FutureIndex(30, initial=8)
    for b in batches[:window]:
        future.add(b)
    wrapped = False
    for i, b in enumerate(batches):
        if i + window < len(batches):
            future.add(batches[i + window])
        base = future.tail
        wrapped |= (base & (len(future.arena) - 1)) + len(b) > len(future.arena)
        got = future.consume(base, len(b))
        later = batches[i + 1 : i + 1 + window]
        want = [
            next((i + 1 + k for k, nb in enumerate(later) if int(r) in nb.tolist()), NO_NEXT_USE) for r in b
        ]
        assert got.tolist() == want, f"batch {i}"
    assert wrapped and len(future.arena) > 8


@pytest.mark.parametrize("n", [5, 700], ids=["one-thread", "threads"])
def test_the_row_kernels_copy_as_torch_indexing_does(n):
    """Gather reads each row from its slot, or from the host where the slot is -1; scatter writes each
    back to its slot (setting its dirty bit) or to the host; copy is ``dst[j] = src[i]``."""
    g = torch.Generator().manual_seed(0)
    cache, host = torch.randn(1000, 9, generator=g), torch.randn(5000, 9, generator=g)
    slots = torch.randperm(1000, generator=g)[:n]
    slots[::3] = -1
    host_rows = torch.randperm(5000, generator=g)[:n]
    kernels = RowKernels()
    out = kernels.gather(cache, slots, host, host_rows)
    expected = torch.where((slots >= 0).unsqueeze(1), cache[slots.clamp(min=0)], host[host_rows])
    assert torch.equal(out, expected)

    rows = torch.randn(n, 9, generator=g)
    new_cache, new_host, dirty = cache.clone(), host.clone(), torch.zeros(1000, dtype=torch.bool)
    kernels.scatter(rows, slots, host_rows, new_cache, dirty, new_host)
    in_cache = slots >= 0
    want_cache, want_host = cache.clone(), host.clone()
    want_cache[slots[in_cache]] = rows[in_cache]
    want_host[host_rows[~in_cache]] = rows[~in_cache]
    assert torch.equal(new_cache, want_cache) and torch.equal(new_host, want_host)
    assert torch.equal(dirty.nonzero().squeeze(1), slots[in_cache].sort().values)

    dst = slots[in_cache]  # distinct slots
    kernels.copy(host, host_rows[: len(dst)], new_cache, dst)
    assert torch.equal(new_cache[dst], host[host_rows[: len(dst)]])
    with pytest.raises(ValueError, match="int64 row indices"):
        kernels.gather(cache, slots.to(torch.int32), host, host_rows)


def test_native_row_copies_need_the_native_planner_on_the_cpu():
    with pytest.raises(ValueError, match="cache.row_copies=native needs the native planner on the CPU"):
        CachedEmbeddingBagCollection(
            make_tables(),
            cache_cfg("lru", 0.1, planner="python", row_copies="native"),
            SparseOptimizer("sgd"),
        )
