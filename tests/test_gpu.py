"""The cache core on a device trains exactly like every table held whole: each policy x optimizer x
(overflowing, normal) cache. Plain PyTorch only (no torchrec, no fbgemm), so that a GPU machine with
nothing but a CUDA torch runs it (``scripts/gpu_check.sh``). The CPU cases run everywhere and show
that the check itself holds; the CUDA cases are marked ``gpu`` and skipped without a CUDA device."""

from concurrent.futures import Future, ThreadPoolExecutor

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


def batches(steps: int, batch: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """(B, F) ids per step, power-law (low ids hot)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.stack([(torch.rand(batch, generator=g) ** 3 * n).long() for n in ROWS], dim=1)
        for _ in range(steps)
    ]


def run(device, policy, optimizer, ratio, ids, planner="python", lookahead=3, threaded=False, mmap_dir=None):
    """Train a group through ``ids`` as the trainer drives it; the pooled outputs per step and the
    final rows (on the host). ``threaded``: as training runs it with a bookkeeping thread - the plan of
    step t + 1 made on that thread while step t computes, the update on this thread (on CUDA after a
    sleep on the compute stream, which widens any window where a copy could race an update)."""
    tables = [TableSpec(f"t{i}", n, 8, [f"f{i}"]) for i, n in enumerate(ROWS)]
    caps = [n if policy == "none" or n <= 50 else max(1, round(ratio * n)) for n in ROWS]
    opt = SparseOptimizer(optimizer, lr=0.05)
    host = dict(host_kind="mmap", mmap_dir=mmap_dir) if mmap_dir else {}
    g = TableGroup(
        tables,
        GroupSettings(caps, policy, opt, torch.device(device), warmup_ratio=0.5, planner=planner, **host),
    )
    batch = ids[0].shape[0]
    bags = torch.arange(batch * len(ROWS) + 1, dtype=torch.int64)
    lookups = torch.full((len(ROWS),), batch, dtype=torch.int64)
    cuda = torch.device(device).type == "cuda"
    thread = ThreadPoolExecutor(1, initializer=torch.cuda.set_device if cuda else None,
                                initargs=(torch.device(device),) if cuda else ())  # fmt: skip

    def prepare(step_ids):
        p = g.prepare(
            (step_ids + g.layout.feature_row_offset).reshape(-1), bags, batch, lookups
        )  # sample-major
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
    outputs = []
    planned = plan_ahead(1)
    for step in range(1, len(ids) + 1):
        plan = planned.result()
        g.begin_step(plan)
        pooled = g.pool(plan, plan.rows)
        outputs.append(pooled.cpu())
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
    thread.shutdown()
    g.flush()
    rows = torch.cat([g.table_rows(t).cpu() for t in range(len(ROWS))])
    g.close()
    return outputs, rows


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
    ids = batches(40)
    expected, expected_rows = run(device, "none", optimizer, 1.0, ids)
    got, rows = run(device, policy, optimizer, ratio, ids, planner)
    for step, (e, o) in enumerate(zip(expected, got, strict=True)):
        torch.testing.assert_close(o, e, atol=1e-6, rtol=1e-5, msg=f"step {step}")
    torch.testing.assert_close(rows, expected_rows, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_and_cpu_train_alike():
    ids = batches(20)
    cpu, cpu_rows = run("cpu", "lookahead", "adagrad", 0.2, ids)
    cuda, cuda_rows = run("cuda", "lookahead", "adagrad", 0.2, ids)
    for c, g in zip(cpu, cuda, strict=True):
        torch.testing.assert_close(g, c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cuda_rows, cpu_rows, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("host", ["memory", "mmap"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
@pytest.mark.parametrize("ratio", [0.002, 0.2], ids=["tiny-overflows", "normal"])
def test_the_threaded_pipeline_trains_like_every_table_whole(device, host, optimizer, ratio, tmp_path):
    """The plan of step t + 1 on a thread of its own while step t computes, rows served from the host
    for overflowing tables, the mapped host tier: exactly the steps of every table whole."""
    ids = batches(30)
    expected, expected_rows = run(device, "none", optimizer, 1.0, ids)
    mmap_dir = str(tmp_path) if host == "mmap" else None
    got, rows = run(device, "lookahead", optimizer, ratio, ids, threaded=True, mmap_dir=mmap_dir)
    for step, (e, o) in enumerate(zip(expected, got, strict=True)):
        torch.testing.assert_close(o, e, atol=1e-6, rtol=1e-5, msg=f"step {step}")
    torch.testing.assert_close(rows, expected_rows, atol=1e-6, rtol=1e-5)
