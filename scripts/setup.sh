#!/usr/bin/env bash
# One-command set-up: creates .venv, installs a torch / fbgemm-gpu / torchrec trio that loads
# together, then dlrm_cache in editable mode with its dev tools. Re-runnable; stops at the first error.
#
#   scripts/setup.sh                      # picks CPU or CUDA by itself (nvidia-smi present => CUDA)
#   DLRM_DEVICE=cpu scripts/setup.sh      # force the CPU stack (DLRM_DEVICE=cuda forces CUDA)
#   PYTHON=python3.12 VENV=.venv-x scripts/setup.sh
#
# Why torchrec goes in with --no-deps: its metadata requires `fbgemm-gpu` (the 2.7 GB CUDA build) even
# on CPU machines, where the CPU build `fbgemm-gpu-cpu` is the right one. Its real run-time
# dependencies are installed explicitly below. Pairing rule: FBGEMM x.y <-> torch 2.(x+5), TorchRec x.y
# <-> FBGEMM x.y.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DEVICE=${DLRM_DEVICE:-auto}
TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0

fail() { echo "setup: ERROR: $*" >&2; exit 1; }

if [[ "$DEVICE" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then DEVICE=cuda; else DEVICE=cpu; fi
fi
case "$DEVICE" in
  cpu) FBGEMM_PKG="fbgemm-gpu-cpu==$FBGEMM_VERSION" ;;
  cuda) FBGEMM_PKG="fbgemm-gpu==$FBGEMM_VERSION" ;;
  *) fail "DLRM_DEVICE must be auto, cpu or cuda, got '$DEVICE'" ;;
esac

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || fail "$PYTHON is $("$PYTHON" --version 2>&1); dlrm_cache needs Python >= 3.11"

echo "setup: device stack = $DEVICE, venv = $VENV"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV" || fail "could not create $VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# After an install pip checks the whole environment and, with the CPU stack, names torchrec's declared
# `fbgemm-gpu` as missing: its CPU build `fbgemm-gpu-cpu` is there instead. That note (an "ERROR"
# line, then the torchrec line) is expected: it is said once, as what it is; anything else pip says
# is shown as it is.
pip_install() {
  local out rc=0
  out=$("${PIP[@]}" "$@" 2>&1) || rc=$?
  if grep -q "^torchrec .* requires fbgemm-gpu, which is not installed" <<<"$out" && [[ "$DEVICE" == cpu ]]; then
    echo "setup: pip notes torchrec's declared fbgemm-gpu as missing: expected, fbgemm-gpu-cpu is its CPU build"
    out=$(grep -v -e "^ERROR: pip's dependency resolver does not currently take into account" \
                  -e "^torchrec .* requires fbgemm-gpu, which is not installed" <<<"$out" || true)
  fi
  [[ -z "$out" ]] || printf '%s\n' "$out"
  return "$rc"
}

# 1. torch + fbgemm. On CPU machines `torch==2.13.0` resolves to the CPU wheel (a local wheel or the
#    +cpu build); on CUDA machines PyPI's default torch build is the CUDA one.
pip_install "torch==$TORCH_VERSION" "$FBGEMM_PKG" || fail "installing torch/$FBGEMM_PKG failed"
# 2. the dependencies torchrec really needs, then the package itself, editable, with its dev tools.
pip_install -r scripts/requirements-torchrec.txt || fail "installing torchrec's dependencies failed"
pip_install -e ".[dev]" || fail "installing dlrm_cache failed"
# 3. torchrec last, without its declared dependencies (on a fresh machine pip then has nothing to note)
pip_install --no-deps "torchrec==$TORCHREC_VERSION" || fail "installing torchrec failed"

"$VENV/bin/python" - <<'PY' || fail "the installed stack does not import together (see above)"
import importlib.metadata as md
import torch, fbgemm_gpu, torchrec  # noqa: F401  (the check itself)
import dlrm_cache  # noqa: F401
names = ["torch", "fbgemm-gpu", "fbgemm-gpu-cpu", "torchrec", "torchmetrics", "tensordict",
         "hydra-core", "pyarrow", "tqdm", "dlrm-cache"]
for name in names:
    try:
        print(f"  {name:16s} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print(f"  cuda available   {torch.cuda.is_available()}")
PY
echo "setup: done. Activate with: source $VENV/bin/activate"
