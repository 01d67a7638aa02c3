#!/usr/bin/env bash
# The GPU check of the cache core, for a machine with a CUDA torch and nothing of this project's
# installed (no TorchRec, no FBGEMM, no Hydra): the core is plain PyTorch. One command, under 10 minutes
# on an H200-class GPU.
#
#   scripts/gpu_check.sh [OUT_DIR]      # figures and logs into OUT_DIR (default: $OUT, else gpu_check/)
#   PYTHON=.venv/bin/python scripts/gpu_check.sh    # another interpreter than `python`
#
# Each check prints one line, PASS, FAIL or SKIP, and the script exits non-zero on any FAIL. Without a
# CUDA device it runs the checks' CPU halves (make test runs them too, so the script cannot rot) and
# names each CUDA check it skips.
#   core-exact       tests/test_gpu.py: every policy x optimizer x (overflowing, normal) cache, both
#                    planners, the threaded pipeline (plan t+1 on its thread while t computes, the
#                    update after a sleep on the compute stream, host-served rows some of which the
#                    step in flight updates, evaluations in between, the mapped host tier) and a cache
#                    of 2.3 GB at batch 16,384, dim 128, step by step against every table held whole.
#   sanitizer        ~10 threaded steps under TORCH_CUDA_SANITIZER=1: no report of a stream race.
#   no-sync          the timed steps under torch.cuda.set_sync_debug_mode("error"), and a profiler trace
#                    of five of them without a copy from pageable host memory (CPU half:
#                    tests/test_no_sync.py, the training step on the meta device).
#   bounded-memory   scripts/gpu_memory_check.py: warm-up and flush of a ~3 GB dirty cache within two
#                    chunks of extra device memory and pinned staging.
#   overlap, speed   scripts/bench_cache_device.py, Kaggle cardinalities, dim 128, batch 16,384, 1.5%:
#                    threaded and inline bookkeeping side by side; the loads' copy time under compute
#                    >= 80% (CUDA events), and the cached step >= 0.9x every table whole.
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
judge() {  # judge NAME LOG: PASS or FAIL from the bench's "requirement NAME: PASS|FAIL ..." line
  local line
  line=$(grep "^requirement $1:" "$out/$2" | head -n 1)
  if [[ -z "$line" ]]; then report "$1" FAIL "see $out/$2: no figure"; return 0; fi
  report "$1" "$(awk '{print $3}' <<<"$line")" "${line#*: * }"
}

gpu_tests() {  # gpu_tests NAME LOG SELECTION...: one check from tests/test_gpu.py
  local name=$1 log=$2
  shift 2
  run "$name" "$log" "$py" -m pytest -q tests/test_gpu.py -p no:cacheprovider "$@"
}

if "$py" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  gpu_tests core-exact test_gpu.txt -k "not sanitizer and not no_host_sync"
  gpu_tests sanitizer sanitizer.txt -k sanitizer
  gpu_tests no-sync no_sync.txt -k no_host_sync
  run bounded-memory memory.txt "$py" scripts/gpu_memory_check.py
  "$py" scripts/bench_cache_device.py --device cuda --dim 128 --batch 16384 --steps 100 --warm 20 \
    --bookkeeping both --require-speed 0.9 --require-overlap 0.8 >"$out/bench_cache_device.txt" 2>&1
  judge overlap bench_cache_device.txt
  judge speed bench_cache_device.txt
else
  gpu_tests core-exact test_gpu.txt -m "not gpu"
  report core-exact-cuda SKIP "no CUDA device: the same cases on CUDA, the 2.3 GB cache, CUDA against the CPU"
  report sanitizer SKIP "no CUDA device: ~10 threaded steps under TORCH_CUDA_SANITIZER=1"
  run no-sync-cpu no_sync.txt "$py" -m pytest -q tests/test_no_sync.py -p no:cacheprovider
  report no-sync SKIP "no CUDA device: set_sync_debug_mode('error') and a profiler trace of the timed steps"
  report bounded-memory SKIP "no CUDA device (its CPU half: tests/test_gpu_path.py, in make test)"
  run bench-cpu bench_cache_device.txt "$py" scripts/bench_cache_device.py --device cpu --scale 0.002 --steps 6 \
    --warm 2 --batch 256 --bookkeeping both
  report overlap SKIP "no CUDA device: the loads' copy time under compute, threaded and inline"
  report speed SKIP "no CUDA device: cached at 1.5% against every table whole, dim 128, batch 16,384"
fi
echo "gpu_check: figures in $out/ (record them in docs/benchmarks.md)"
exit "$failed"
