"""The cache core runs on plain PyTorch: no torchrec, no fbgemm (what a lent GPU machine has)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = """
import runpy, sys
sys.modules['torchrec'] = None      # any import of them fails
sys.modules['fbgemm_gpu'] = None
sys.argv = ['bench', '--device', 'cpu', '--scale', '0.002', '--steps', '6', '--warm', '2', '--batch', '256']
runpy.run_path('scripts/bench_cache_device.py', run_name='__main__')
"""


def test_device_benchmark_runs_the_cache_core_without_torchrec():
    r = subprocess.run([sys.executable, "-c", BLOCKED], cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if "ms/step" in line]
    assert [line.split()[0] for line in lines] == ["none", "lookahead"]


WITHOUT_HYDRA = """
import sys
sys.modules['hydra'] = None         # any import of them fails
sys.modules['omegaconf'] = None
import dlrm_cache.cache, dlrm_cache.distributed
from dlrm_cache.cache import CachedEmbeddingBagCollection, SparseOptimizer
from dlrm_cache.config import CacheConfig
from dlrm_cache.distributed import checkpoint, hybrid, hybrid_plan, planner, runtime, sharder
from torchrec.modules.embedding_configs import EmbeddingBagConfig
t = EmbeddingBagConfig(num_embeddings=100, embedding_dim=4, name="t", feature_names=["f"])
CachedEmbeddingBagCollection([t], CacheConfig(ratio=0.1), SparseOptimizer())
print("imported")
"""


def test_the_library_imports_without_hydra_or_omegaconf():
    """What a TorchRec user embeds in their own trainer: the cache and the sharded path."""
    r = subprocess.run([sys.executable, "-c", WITHOUT_HYDRA], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "imported"


WITHOUT_TORCHREC_PLANNING = """
import sys
sys.modules['torchrec'] = None      # any import of it fails
sys.modules['fbgemm_gpu'] = None
import numpy as np
from dlrm_cache.cache.optim import SparseOptimizer
from dlrm_cache.config import CacheConfig, NetworkConfig
from dlrm_cache.distributed import comm_model, hybrid_plan, placement, planner, table_stats
tables = [table_stats.TableStats(f"t{i}", 1000, 8, 1, np.sort(np.arange(1000.0))[::-1] + 1) for i in range(4)]
plan = planner.plan_cache(tables, 2, CacheConfig(ratio=0.1), SparseOptimizer())
hybrid = hybrid_plan.plan_hybrid(tables, 2, 256, CacheConfig(ratio=0.1), SparseOptimizer(), NetworkConfig())
print(sorted(plan.sharding.values())[0], hybrid.predicted.network > 0)
"""


def test_the_planners_and_their_cost_model_plan_without_torchrec():
    """Frequency statistics, the cost model and both planners are numpy code beneath the sharded path."""
    r = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCHREC_PLANNING],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["table_wise", "True"]


@pytest.mark.slow  # the core's CPU cases once more, and a short benchmark
def test_the_gpu_check_runs_here_and_names_each_cuda_check_it_skips(tmp_path):
    r = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHON": sys.executable}, timeout=900, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    said = [line.split(maxsplit=3) for line in r.stdout.splitlines() if line.startswith("gpu_check: ")]
    status = {words[2]: words[1] for words in said if words[1] in ("PASS", "FAIL", "SKIP")}
    assert status == {"core-exact": "PASS", "core-exact-cuda": "SKIP", "sanitizer": "SKIP",
                      "no-sync-cpu": "PASS", "no-sync": "SKIP", "bounded-memory": "SKIP", "bench-cpu": "PASS",
                      "overlap": "SKIP", "speed": "SKIP"}  # fmt: skip
    assert (tmp_path / "summary.txt").read_text().count("gpu_check: ") == 9
