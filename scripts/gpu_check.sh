#!/usr/bin/env bash
# The GPU check of the cache core, for a machine with a CUDA torch and nothing of this project's
# installed (no TorchRec, no FBGEMM, no Hydra): the core is plain PyTorch. Under 5 minutes.
#
#   scripts/gpu_check.sh [OUT_DIR]      # figures and logs into OUT_DIR (default: $OUT, else gpu_check/)
#
# 1. tests/test_gpu.py on CUDA: every policy x optimizer x (overflowing, normal) cache, Python and
#    C++ planners, against every table held whole, step by step, and CUDA against the CPU;
# 2. scripts/bench_cache_device.py: cached at 1.5% against policy=none, ms/step, hit rate, and the
#    loads' copy time with the share of it that overlapped compute (CUDA events).
# pytest comes from the machine, or from .gpu_deps/ carried with the tree
# (`pip install --target .gpu_deps pytest` here); without either, step 1 stops the check.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
[[ -d .gpu_deps ]] && export PYTHONPATH="$PYTHONPATH:.gpu_deps"
python - <<'PY' | tee "$out/machine.txt"
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
PY
python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$out/test_gpu.txt"
python scripts/bench_cache_device.py --device cuda --steps 200 2>&1 | tee "$out/bench_cache_device.txt"
echo "gpu_check: done; figures in $out/ (record them in docs/benchmarks.md)"
