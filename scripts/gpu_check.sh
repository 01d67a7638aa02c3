#!/usr/bin/env bash
# The GPU check of the cache core, for a machine with a CUDA torch and nothing of this project's
# installed (no TorchRec, no FBGEMM, no Hydra): the core is plain PyTorch. One command, a few minutes.
#
#   scripts/gpu_check.sh [OUT_DIR]      # figures and logs into OUT_DIR (default: $OUT, else gpu_check/)
#   PYTHON=.venv/bin/python scripts/gpu_check.sh    # another interpreter than `python`
#
# Each check prints one line, PASS, FAIL or SKIP, and the script exits non-zero on any FAIL. Without a
# CUDA device it runs the checks' CPU halves (make test runs them too, so the script cannot rot) and
# names each CUDA check it skips.
#   core-exact       tests/test_gpu.py: every policy x optimizer x (overflowing, normal) cache, both
#                    planners, and the threaded pipeline (plan t+1 on its thread while t computes, the
#                    update after a sleep on the compute stream, host-served rows, the mapped host
#                    tier), step by step against every table held whole; CUDA against the CPU.
#   bounded-memory   scripts/gpu_memory_check.py: warm-up and flush of a ~3 GB dirty cache within two
#                    chunks of extra device memory and pinned staging.
#   bench            scripts/bench_cache_device.py: cached at 1.5% against every table resident, ms/step,
#                    hit rate, the loads' copy time and the share of it hidden under compute.
# pytest comes from the machine, or from .gpu_deps/ carried with the tree
# (`pip install --target .gpu_deps pytest` here).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
[[ -d .gpu_deps ]] && export PYTHONPATH="$PYTHONPATH:.gpu_deps"
failed=0
py=${PYTHON:-python}

report() {  # report NAME STATUS WHAT
  printf 'gpu_check: %-4s %-15s %s\n' "$2" "$1" "$3" | tee -a "$out/summary.txt"
  [[ "$2" == FAIL ]] && failed=1
  return 0
}

run() {  # run NAME LOG COMMAND...: PASS or FAIL by the command's status, its output in LOG
  local name=$1 log=$2
  shift 2
  if "$@" >"$out/$log" 2>&1; then report "$name" PASS "$(tail -n 1 "$out/$log")"; else
    report "$name" FAIL "see $out/$log: $(tail -n 1 "$out/$log")"
  fi
}

: >"$out/summary.txt"
"$py" - <<'PY' | tee "$out/machine.txt"
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {name}")
PY
if "$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  run core-exact test_gpu.txt "$py" -m pytest -q tests/test_gpu.py -p no:cacheprovider
  run bounded-memory memory.txt "$py" scripts/gpu_memory_check.py
  run bench bench_cache_device.txt "$py" scripts/bench_cache_device.py --device cuda --steps 200
else
  run core-exact test_gpu.txt "$py" -m pytest -q -m "not gpu" tests/test_gpu.py -p no:cacheprovider
  report core-exact-cuda SKIP "no CUDA device: the same cases on CUDA, and CUDA against the CPU"
  report bounded-memory SKIP "no CUDA device (its CPU half: tests/test_gpu_path.py, in make test)"
  run bench bench_cache_device.txt "$py" scripts/bench_cache_device.py --device cpu --scale 0.002 --steps 6 \
    --warm 2 --batch 256
  report bench-cuda SKIP "no CUDA device: ms/step and the loads' overlap on CUDA"
fi
echo "gpu_check: figures in $out/ (record them in docs/benchmarks.md)"
exit "$failed"
