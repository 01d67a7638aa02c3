"""The GPU path's logic, where a CPU can show it: failures surfacing in time, checkpoints agreed by
every rank, flushes and warm-ups in bounded memory, the order of copies and updates."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_cache import cache_cfg, loss_of, make_batches, make_tables

from dlrm_cache.cache import group as group_module
from dlrm_cache.cache.collection import CachedEmbeddingBagCollection
from dlrm_cache.cache.host import CHUNK_BYTES
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.distributed import checkpoint as ckpt


def _threaded(**kw) -> CachedEmbeddingBagCollection:
    cfg = cache_cfg("lookahead", 0.2, bookkeeping="thread", row_copies="torch", lookahead=2, **kw)
    return CachedEmbeddingBagCollection(make_tables(), cfg, SparseOptimizer("adagrad", lr=0.05))


def _failing_plans(monkeypatch, after: int) -> None:
    """Every plan after the first ``after`` raises (as a CUDA OOM on the copy stream would)."""
    plan, calls = group_module.TableGroup.plan, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) > after:
            raise RuntimeError("the copy stream failed")
        return plan(self, *args)

    monkeypatch.setattr(group_module.TableGroup, "plan", failing)


def _step(ebc, batches, i):
    if i + 2 < len(batches):
        ebc.enqueue(batches[i + 2])
    pooled = ebc(batches[i]).values()
    ebc.prefetch()
    loss_of(pooled).backward()


@pytest.mark.parametrize("then", ["checkpoint", "step"])
def test_a_failed_prefetch_is_raised_before_a_checkpoint_or_at_the_next_step(monkeypatch, then):
    batches = make_batches(6)
    ebc = _threaded()
    for b in batches[:2]:
        ebc.enqueue(b)
    _failing_plans(monkeypatch, after=2 * len(ebc.groups))  # steps 1 and 2 plan; 3 fails
    _step(ebc, batches, 0)  # plans step 1 inline, prefetches step 2
    _step(ebc, batches, 1)  # prefetches step 3: fails on the bookkeeping thread
    with pytest.raises(RuntimeError, match="the copy stream failed"):
        if then == "checkpoint":
            ebc.flush()  # what a checkpoint does first
        else:
            _step(ebc, batches, 2)
    ebc.close()


@pytest.mark.slow  # several processes
def test_one_ranks_checkpoint_error_is_raised_on_every_rank_at_once(tmp_path):
    worker = Path(__file__).with_name("checkpoint_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3", str(worker),
         str(tmp_path / "run"), "1"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    said = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert len(said) == 3, proc.stdout + proc.stderr[-2000:]
    for line in said:
        assert " raised after " in line and float(line.split(" raised after ")[1].split(" s")[0]) < 10
    assert "No space left on device" in said[1]
    assert all("another rank could not write its part" in said[r] for r in (0, 2))
    assert all("the previous one" in line and "is intact" in line for line in said)
    assert ckpt.load_meta(ckpt.find_checkpoint(tmp_path / "run"))["step"] == 1
    assert not (tmp_path / "run" / "checkpoint.new").exists()


class _Recording:
    """A mover that records which step's update each copy would wait for, and each update."""

    def __init__(self, inner, log, lock):
        self.inner, self.log, self.lock = inner, log, lock

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def copy_in(self, host, rows, cache, slots, after):
        with self.lock:
            self.log.append(("copy", after))
        self.inner.copy_in(host, rows, cache, slots, after)

    def copy_out(self, cache, slots, host, rows, after):
        with self.lock:
            self.log.append(("copy", after))
        self.inner.copy_out(cache, slots, host, rows, after)

    def after_update(self, step):
        with self.lock:
            self.log.append(("update", step))
        self.inner.after_update(step)


def test_a_plans_copies_wait_for_the_update_before_the_step_in_flight_not_for_it(monkeypatch):
    """Threaded bookkeeping as training runs it: the plan of step s (made while step s - 1 computes)
    evicts only slots last used at s - 2 or before, so its copies wait for step s - 2's update - one
    that is always queued by then - and overlap step s - 1."""
    log, lock = [], threading.Lock()
    make = group_module.row_mover
    monkeypatch.setattr(group_module, "row_mover", lambda *a: _Recording(make(*a), log, lock))
    plan = group_module.TableGroup.plan

    def recording_plan(self, batch, step, *args):
        with lock:
            log.append(("plan", step))
        return plan(self, batch, step, *args)

    monkeypatch.setattr(group_module.TableGroup, "plan", recording_plan)
    ebc = CachedEmbeddingBagCollection(
        make_tables(),
        cache_cfg("lookahead", 0.05, bookkeeping="thread", row_copies="torch", lookahead=4),
        SparseOptimizer("adagrad", lr=0.05),
    )
    batches = make_batches(30)
    for b in batches[:2]:
        ebc.enqueue(b)
    for i in range(len(batches)):
        _step(ebc, batches, i)
    ebc.flush()
    ebc.close()
    planned, updated, copies = None, set(), 0
    for kind, value in log:
        if kind == "plan":
            planned = value
        elif kind == "update":
            updated.add(value)
        elif value is not None:  # a plan's copy (warm-up and flush wait for every update: None)
            copies += 1
            in_flight = (
                planned > 1
            )  # step 1 is planned at its own forward, every later one during the step before
            assert value == (planned - 2 if in_flight else planned - 1), (planned, value)
            assert value < 1 or value in updated, (
                f"step {planned}'s copies wait for update {value}, not queued"
            )
    assert copies > 20  # the caches were small enough to evict


MEMORY_CHILD = """
import json, sys, torch
from types import SimpleNamespace
from dlrm_cache.cache.group import GroupSettings, TableGroup
from dlrm_cache.cache.optim import SparseOptimizer
rows, dim, warm = 8_000_000, 64, float(sys.argv[1])
table = SimpleNamespace(name="t", num_embeddings=rows, embedding_dim=dim, feature_names=["f"], pooling="SUM",
                        init_fn=None)
def peak_mb():  # the high-water mark of resident memory since the last reset_peak()
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
settings = GroupSettings([rows * 3 // 4], "lookahead", SparseOptimizer(), torch.device("cpu"),
                         warmup_ratio=warm, native_copies=False)
g = TableGroup([table], settings)  # 2 GB of host rows, a 1.5 GB cache (its pages touched by warm-up)
made = peak_mb()
g.state.dirty[:] = g.state.slot_to_row >= 0  # every cached row written since
reset_peak()
before = peak_mb()
g.flush()
print(json.dumps({"cache_mb": rows * 3 // 4 * dim * 4 / 2**20, "made": made, "flush": peak_mb() - before}))
"""


def _memory(warm: float) -> dict:
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(warm)], capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.slow  # 3.5 GB of tables
def test_warm_up_and_flush_of_a_large_dirty_cache_take_a_chunk_of_extra_memory():
    cold, warm = _memory(0.0), _memory(1.0)
    chunk_mb = CHUNK_BYTES / 2**20
    # the cache's pages are counted once it is made (zeros): what warm-up adds is its temporaries
    assert warm["made"] - cold["made"] < 4 * chunk_mb, (cold, warm)
    assert warm["flush"] < 3 * chunk_mb, warm  # not a copy of every dirty row


def test_training_steps_leave_the_loss_on_the_device_between_the_figures_asked_for(tmp_path, monkeypatch):
    """Reading a loss from the device waits for the step: the trainer reads them 64 at a time, and
    where a figure is logged, evaluated or checkpointed - not every step."""
    from dlrm_cache.config import DataConfig, ModelConfig, TrainLoopConfig, TrainRunConfig
    from dlrm_cache.data.default_dataset import synthetic_dataset
    from dlrm_cache.train import trainer

    reads = []
    finite_loss = trainer.Trainer.finite_loss

    def counted(self):
        reads.append(len(self.losses))
        return finite_loss(self)

    monkeypatch.setattr(trainer.Trainer, "finite_loss", counted)
    root = synthetic_dataset(tmp_path / "d", 30_000, 0.001, progress=False)
    small = ModelConfig(embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    loop = TrainLoopConfig(
        batch_size=256, max_steps=100, log_every=1000, checkpoint_every=0, tensorboard=False
    )
    trainer.train(TrainRunConfig(data=DataConfig(path=str(root)), model=small, train=loop), tmp_path / "r")
    assert [n for n in reads if n] == [64, 36]  # 100 steps: one read of 64, then the last 36 at the end
