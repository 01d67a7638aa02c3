"""The cache core on a device trains exactly like every table held whole: each policy x optimizer x
(overflowing, normal) cache. Plain PyTorch only (no torchrec, no fbgemm), so that a GPU machine with
nothing but a CUDA torch runs it (``scripts/gpu_check.sh``). The CPU cases run everywhere and show
that the check itself holds; the CUDA cases are marked ``gpu`` and skipped without a CUDA device."""

import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch

from dlrm_cache.cache import native
from dlrm_cache.cache.group import GroupSettings, TableGroup
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.cache.table import TableSpec

ROWS = [40, 3000, 600]
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


def batches(steps: int, batch: int = 32, seed: int = 0, rows=ROWS) -> list[torch.Tensor]:
    """(B, F) ids per step, power-law (low ids hot)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.stack([(torch.rand(batch, generator=g) ** 3 * n).long() for n in rows], dim=1)
        for _ in range(steps)
    ]


def assert_same(expected, got) -> None:
    """Per-step outputs, final rows and evaluations of two runs (``run``) alike."""
    for name, e, o in zip(("outputs", "rows", "evaluations"), expected, got, strict=True):
        if name == "rows":
            e, o = [e], [o]
        assert len(e) == len(o), name
        for i, (a, b) in enumerate(zip(e, o, strict=True)):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=f"{name} {i}")


def run(device, policy, optimizer, ratio, ids, planner="python", lookahead=3, threaded=False, mmap_dir=None,
        rows=ROWS, dim=8, evaluate=(), timed=None, keep=True):  # fmt: skip
    """Train a group through ``ids`` as the trainer drives it; the pooled outputs per step, the final
    rows (on the host) and the evaluation outputs (``lookup_readonly`` of the batches ``evaluate``,
    after every fifth step). ``threaded``: as training runs it with a bookkeeping thread - the plan of
    step t + 1 made on that thread while step t computes, the update on this thread (on CUDA after a
    sleep on the compute stream, which widens any window where a copy could race an update).
    ``timed(step)``: a context manager around each step; ``keep``: whether to keep the outputs."""
    tables = [TableSpec(f"t{i}", n, dim, [f"f{i}"]) for i, n in enumerate(rows)]
    caps = [n if policy == "none" or n <= 50 else max(1, round(ratio * n)) for n in rows]
    opt = SparseOptimizer(optimizer, lr=0.05)
    host = dict(host_kind="mmap", mmap_dir=mmap_dir) if mmap_dir else {}
    g = TableGroup(
        tables,
        GroupSettings(caps, policy, opt, torch.device(device), warmup_ratio=0.5, planner=planner, **host),
    )
    batch = ids[0].shape[0]
    bags = torch.arange(batch * len(rows) + 1, dtype=torch.int64)
    lookups = torch.full((len(rows),), batch, dtype=torch.int64)
    cuda = torch.device(device).type == "cuda"
    thread = ThreadPoolExecutor(1, initializer=torch.cuda.set_device if cuda else None,
                                initargs=(torch.device(device),) if cuda else ())  # fmt: skip

    def prepare(step_ids, future=True):
        p = g.prepare(
            (step_ids + g.layout.feature_row_offset).reshape(-1), bags, batch, lookups
        )  # sample-major
        if future:
            g.register_future(p)
        return p

    def plan_ahead(step):  # what the collection's prefetch hands its bookkeeping thread
        if step - 1 + lookahead < len(ids):
            queue.append(prepare(ids[step - 1 + lookahead]))
        floor, host_rows = g.pin_floor(step), g.inflight_host_rows()  # read here, as the collection does
        batch_ = queue.pop(0)
        return (thread.submit(g.plan, batch_, step, floor, host_rows) if threaded
                else _done(g.plan(batch_, step, floor, host_rows)))  # fmt: skip

    queue = [prepare(b) for b in ids[:lookahead]]
    outputs, evaluations = [], []
    planned = plan_ahead(1)
    for step in range(1, len(ids) + 1):
        with timed(step) if timed else nullcontext():
            plan = planned.result()
            g.begin_step(plan)
            pooled = g.pool(plan, plan.rows)
            if threaded and step < len(ids):
                planned = plan_ahead(step + 1)  # while this step's backward runs
            weights = (
                torch.arange(pooled.numel(), dtype=torch.float32, device=pooled.device).view_as(pooled).sin()
            )
            if threaded and cuda:
                torch.cuda._sleep(1_000_000)  # the update queued late: a copy racing it would read stale rows
            g.apply_gradients(plan, weights)  # the gradient of (pooled * weights).sum()
            if not threaded and step < len(ids):
                planned = plan_ahead(step + 1)
        if keep:
            outputs.append(pooled.cpu())
        if step % 5 == 0 and evaluate:
            if step < len(ids):
                planned = _done(planned.result())  # the collection's drain before an evaluation
            evaluations.extend(g.lookup_readonly(prepare(b, future=False)).cpu() for b in evaluate)
    thread.shutdown()
    g.flush()
    final = torch.cat([g.table_rows(t).cpu() for t in range(len(rows))])
    g.close()
    return outputs, final, evaluations


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("planner", ["python", "native"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "freq", "lookahead"])
@pytest.mark.parametrize("ratio", [0.002, 0.2], ids=["tiny-overflows", "normal"])
def test_the_cache_on_a_device_trains_like_every_table_whole(device, policy, optimizer, ratio, planner):
    if planner == "native" and native.resolve("auto") != "native":
        pytest.skip("no C++ compiler here for the native planner")
    ids, held_out = batches(40), batches(2, seed=1)
    expected = run(device, "none", optimizer, 1.0, ids, evaluate=held_out)
    assert_same(expected, run(device, policy, optimizer, ratio, ids, planner, evaluate=held_out))


@pytest.mark.gpu
def test_cuda_and_cpu_train_alike():
    ids = batches(20)
    cpu, cpu_rows, _ = run("cpu", "lookahead", "adagrad", 0.2, ids)
    cuda, cuda_rows, _ = run("cuda", "lookahead", "adagrad", 0.2, ids)
    for c, g in zip(cpu, cuda, strict=True):
        torch.testing.assert_close(g, c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cuda_rows, cpu_rows, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("host", ["memory", "mmap"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("ratio", [0.002, 0.2], ids=["tiny-overflows", "normal"])
def test_the_threaded_pipeline_trains_like_every_table_whole(device, host, optimizer, ratio, tmp_path):
    """The plan of step t + 1 on a thread of its own while step t computes, rows served from the host
    for overflowing tables (some of them updated by the step in flight), evaluations in between, the
    mapped host tier: exactly the steps of every table whole."""
    ids, held_out = batches(30), batches(2, seed=1)
    expected = run(device, "none", optimizer, 1.0, ids, evaluate=held_out)
    mmap_dir = str(tmp_path) if host == "mmap" else None
    got = run(device, "lookahead", optimizer, ratio, ids, threaded=True, mmap_dir=mmap_dir, evaluate=held_out)
    assert_same(expected, got)


BIG = [6_000_000, 3_000_000, 600]  # dim 128, row-wise Adagrad: a 2.3 GB cache at ratio 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [0.0005, 0.5], ids=["tiny-overflows", "normal"])
def test_a_cache_of_a_few_gb_trains_like_every_table_whole(ratio):
    """The threaded pipeline at batch 16,384 and dim 128 over tables of 9M rows (4.6 GB of host rows)."""
    ids = batches(12, batch=16_384, rows=BIG)
    kw = dict(rows=BIG, dim=128, lookahead=4)
    expected = run("cuda", "none", "adagrad", 1.0, ids, **kw)
    assert_same(expected, run("cuda", "lookahead", "adagrad", ratio, ids, threaded=True, **kw))


@pytest.mark.gpu
def test_the_threaded_pipeline_has_no_race_under_the_cuda_sanitizer():
    """~10 steps of the threaded pipeline (overflowing and normal caches) under ``TORCH_CUDA_SANITIZER=1``,
    which reports any kernel reading or writing a tensor another stream used without an event between."""
    code = (
        "from test_gpu import batches, run\n"
        "for ratio in (0.002, 0.2):\n"
        "    run('cuda', 'lookahead', 'adam', ratio, batches(10), threaded=True)\n"
        "print('sanitizer run done')\n"
    )
    env = {**os.environ, "TORCH_CUDA_SANITIZER": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0 and "sanitizer run done" in report, report[-4000:]
    assert "CSAN" not in report and "data race" not in report, report[-4000:]


class SyncFree:
    """Around each step past the first few: ``torch.cuda.set_sync_debug_mode("error")`` (a host sync
    raises, on any thread), and a profiler over a few of them, whose trace must hold no copy from
    pageable host memory (such a copy first waits for the stream's earlier work)."""

    def __init__(self, warm: int = 3, profiled: int = 5):
        self.warm, self.profiled = warm, profiled
        self.profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        )
        self.steps = 0

    @contextmanager
    def __call__(self, step: int):
        if step <= self.warm:
            yield
            return
        if step == self.warm + 1:
            self.profiler.start()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        self.steps += 1
        if step == self.warm + self.profiled:
            torch.cuda.synchronize()
            self.profiler.stop()

    def pageable_copies(self) -> list[str]:
        return [e.name for e in self.profiler.events() if "Pageable" in e.name]


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [0.002, 0.2], ids=["tiny-overflows", "normal"])
def test_the_timed_steps_make_no_host_sync_and_no_pageable_copy(ratio):
    check = SyncFree()
    run("cuda", "lookahead", "adagrad", ratio, batches(20, batch=256), threaded=True, timed=check, keep=False)
    assert check.steps == 17
    assert check.pageable_copies() == []
