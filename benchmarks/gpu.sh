#!/usr/bin/env bash
# One run of tvr-kernels on a GPU machine: versions, the CUDA build, the test suite on the GPU,
# then the benchmark suite on cuda. It installs nothing from the network (pip runs with
# --no-index --no-deps --no-build-isolation) and uses the machine's own python (CUDA torch
# >= 2.11, triton >= 3.6).
#
#   bash benchmarks/gpu.sh [--dry-run] [--python PATH] [--skip-tests] [--skip-bench]
#                          [--out DIR] [--ops OP,OP] [--shapes SET] [--min-time S] [--budget S]
#                          [--no-compile]
#   make gpu GPU_ARGS="--skip-tests"
#
# Logs (one per step), the JUnit XML of the tests, the benchmark CSV and summary.txt go to
# --out DIR, else $OUT when set, else benchmarks/results/gpu-<date>/.
#
# Every step runs under `timeout`, capped by what is left of --budget (default 470 s, so that
# the whole script ends within 8 minutes); a failing step does not stop the next ones. The
# benchmarks run one bench module at a time (this issue's token_shift and sinkhorn_knopp
# first), each appending to the CSV when it completes, so a slow or hung module costs only
# itself. --shapes passes a shape set to `python -m benchmarks` (default paper; large also
# runs the heavy 1000 x 1000 eager references, which the default run takes from the records
# of this device when it has any). Exit status: 0 when every step that was asked for passed; 1 when one failed, timed
# out or did not fit in the budget; 2 for a usage error.
#
# Time on an H100 (estimates, not yet measured): the build ~1-2 min (ninja, nvcc for
# csrc/cuda), the tests ~2-3 min (Triton compiles each kernel specialization once), and
# the benchmarks the rest. A benchmark measurement is a fresh process (torch import, CUDA
# context, Triton/inductor compilation: seconds each), which costs more than the timed loop:
# --min-time 0.2 keeps the loops to ~15 s over the ~70 measurements; the whole suite with
# torch.compile baselines needs more than 8 minutes, so modules that do not fit are reported
# as not run (rerun them with --skip-tests --ops ...).
#
# --dry-run builds, tests and launches nothing: it prints each command it would run, and
# checks that python, torch, triton, pytest and setuptools import, that the files it needs
# exist, which extension setup.py would build, and that pytest collects the tests.
set -u

usage() {
  sed -n '2,/^set -u$/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

PY=python3
DRY=0
SKIP_TESTS=0
SKIP_BENCH=0
OUT_DIR=""
OPS=""
MIN_TIME=0.2
SHAPES=paper
BUDGET=470
COMPILE_ARGS=()

need_arg() {
  if [ "$#" -lt 2 ] || [ -z "$2" ]; then
    echo "gpu.sh: $1 needs a value" >&2
    exit 2
  fi
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --python) need_arg "$@"; PY=$2; shift ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    --out) need_arg "$@"; OUT_DIR=$2; shift ;;
    --ops) need_arg "$@"; OPS=$2; shift ;;
    --min-time) need_arg "$@"; MIN_TIME=$2; shift ;;
    --shapes) need_arg "$@"; SHAPES=$2; shift ;;
    --budget) need_arg "$@"; BUDGET=$2; shift ;;
    --no-compile) COMPILE_ARGS=(--no-compile) ;;
    -h | --help) usage; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$BUDGET" in
  '' | *[!0-9]*) echo "gpu.sh: --budget must be whole seconds, not '$BUDGET'" >&2; exit 2 ;;
esac

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu.sh: python '$PY' not found (use --python PATH)" >&2
  exit 2
fi
# Paths given relative to the caller's directory, before moving to the repository root.
case "$PY" in
  /*) ;;
  */*) PY=$PWD/$PY ;;
esac
if [ -n "$OUT_DIR" ]; then
  LOG=$OUT_DIR
elif [ -n "${OUT:-}" ]; then
  LOG=$OUT
else
  LOG=""
fi
case "$LOG" in
  '' | /*) ;;
  *) LOG=$PWD/$LOG ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || exit 2
cd "$ROOT" || exit 2
[ -n "$LOG" ] || LOG=$ROOT/benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)
if ! command -v timeout >/dev/null 2>&1; then
  echo "gpu.sh: needs coreutils' timeout" >&2
  exit 2
fi

# Nothing below may reach a network: pip has no index, the Hugging Face libraries stay offline.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# tests/test_gpu_script.py skips itself inside this run (it would dry-run this script again).
export TVR_GPU_SCRIPT=1
# Triton on the GPU, never its CPU interpreter.
unset TRITON_INTERPRET

NAMES=()
STATUS=()
SECS=()
N=0

show() {  # a command line, inline python scripts abbreviated
  local a out=""
  for a in "$@"; do
    case "$a" in
      *$'\n'*) out+=" <script>" ;;
      *) out+=" $a" ;;
    esac
  done
  echo "${out# }"
}

record() {  # name status seconds
  NAMES+=("$1")
  STATUS+=("$2")
  SECS+=("$3")
}

left() {
  echo $((BUDGET - SECONDS))
}

# step NAME CAP_SECONDS CMD...: run CMD under timeout (CAP capped by the budget left), its
# output to the console and to $LOG/NN-NAME.log. Sets STEP_RC.
step() {
  local name=$1 cap=$2 t log start rc status
  shift 2
  N=$((N + 1))
  t=$(left)
  [ "$cap" -lt "$t" ] && t=$cap
  printf '\n== [%d] %s: %s\n' "$N" "$name" "$(show "$@")"
  if [ "$t" -lt 10 ]; then
    echo "   not run: the time budget (--budget $BUDGET s) is spent"
    record "$name" "NOT RUN (budget)" 0
    STEP_RC=125
    return
  fi
  log=$LOG/$(printf '%02d' "$N")-$name.log
  start=$SECONDS
  timeout -k 10 "$t" "$@" < /dev/null 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  case "$rc" in
    0) status=ok ;;
    124 | 137) status="TIMEOUT (${t} s)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  record "$name" "$status" $((SECONDS - start))
  STEP_RC=$rc
}

# check NAME CMD...: a dry-run check, run without a log file.
check() {
  local name=$1 start rc
  shift
  N=$((N + 1))
  printf '\n== [%d] check %s: %s\n' "$N" "$name" "$(show "$@")"
  start=$SECONDS
  timeout -k 10 120 "$@" < /dev/null 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    record "check $name" ok $((SECONDS - start))
  else
    record "check $name" "FAILED (exit $rc)" $((SECONDS - start))
  fi
}

# would NAME CMD...: what a real run would do at this step.
would() {
  local name=$1
  shift
  N=$((N + 1))
  printf '\n== [%d] %s (dry run, not run): %s\n' "$N" "$name" "$*"
  record "$name" "dry run" 0
}

# Versions, devices, and which extension setup.py builds here (its own test, repeated).
VERSIONS_PY='
import os, platform, sys
import setuptools  # before torch: it replaces distutils
import torch
import triton
from torch.utils.cpp_extension import CUDA_HOME
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}  CUDA {torch.version.cuda}  cuDNN {torch.backends.cudnn.version()}")
print(f"triton {triton.__version__}  setuptools {setuptools.__version__}")
try:
    import pip
    print(f"pip {pip.__version__}")
except ImportError:
    print("no pip: the build falls back to setup.py build_ext --inplace")
cuda = torch.version.cuda is not None and (CUDA_HOME is not None or os.environ.get("TORCH_CUDA_ARCH_LIST"))
print("setup.py builds " + (f"a CUDAExtension (csrc/cpu + csrc/cuda), CUDA_HOME={CUDA_HOME}" if cuda
      else "a CPU-only CppExtension (torch without CUDA, or no nvcc): no cuda backend"))
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
for i in range(n):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}  sm_{p.major}{p.minor}  {p.total_memory / 2**30:.0f} GiB  "
          f"{p.multi_processor_count} SMs")
if n == 0:
    print("no CUDA device visible")
    sys.exit(0 if "--dry-run" in sys.argv else 1)
'

# One line per bench module: its ops, comma-separated; this issue's ops first, the
# evaluation stages (the slowest references) last.
GROUPS_PY='
from benchmarks.run import bench_modules, load_cases
first, last = ["bench_token_shift", "bench_sinkhorn_knopp"], ["bench_eval_scoring"]
mods = bench_modules()
middle = [m for m in mods if m not in first + last]
for m in [m for m in first if m in mods] + middle + [m for m in last if m in mods]:
    ops = []
    for c in load_cases(m):
        if c.op not in ops:
            ops.append(c.op)
    print(",".join(ops))
'

COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
echo "tvr-kernels GPU run: commit $COMMIT, $(date '+%Y-%m-%d %H:%M:%S'), python $PY"
if [ "$DRY" -eq 1 ]; then
  echo "dry run: logs would go to $LOG"
else
  mkdir -p "$LOG" || { echo "gpu.sh: cannot create $LOG" >&2; exit 2; }
  echo "logs: $LOG   budget: $BUDGET s"
fi

BUILD_CMD=("$PY" -m pip install --no-index --no-build-isolation --no-deps -e .)
BUILD_FALLBACK=("$PY" setup.py build_ext --inplace)
TEST_CMD=("$PY" -m pytest -q tests -p no:cacheprovider --junitxml="$LOG/tests.xml")
BENCH_CMD=("$PY" -m benchmarks --device cuda --shapes "$SHAPES" --min-time "$MIN_TIME" --csv "$LOG/results.csv"
           ${COMPILE_ARGS[@]+"${COMPILE_ARGS[@]}"})

if [ "$DRY" -eq 1 ]; then
  check python "$PY" -c "$VERSIONS_PY" --dry-run
  N=$((N + 1))
  missing=()
  for f in setup.py csrc tvr_kernels/info.py tests/conftest.py benchmarks/run.py benchmarks/common.py; do
    [ -e "$f" ] || missing+=("$f")
  done
  printf '\n== [%d] check files: setup.py, csrc/, tvr_kernels/info.py, tests/, benchmarks/\n' "$N"
  if [ "${#missing[@]}" -eq 0 ]; then
    record "check files" ok 0
  else
    echo "   missing: ${missing[*]}"
    record "check files" "FAILED (missing)" 0
  fi
  would build "${BUILD_CMD[@]}" "(else: ${BUILD_FALLBACK[*]})"
  would info "$PY" -m tvr_kernels.info
  if [ "$SKIP_TESTS" -eq 0 ]; then
    check collect "$PY" -m pytest --collect-only -q tests -p no:cacheprovider
    would tests "${TEST_CMD[@]}"
  fi
  if [ "$SKIP_BENCH" -eq 0 ]; then
    if [ -n "$OPS" ]; then
      would bench "${BENCH_CMD[@]}" --ops "$OPS"
    else
      if mapfile -t groups < <(timeout 120 "$PY" -c "$GROUPS_PY") && [ "${#groups[@]}" -gt 0 ]; then
        for ops in "${groups[@]}"; do
          would "bench-${ops%%,*}" "${BENCH_CMD[@]}" --ops "$ops"
        done
      else
        record "check bench modules" "FAILED (import)" 0
      fi
    fi
  fi
else
  step versions 60 "$PY" -c "$VERSIONS_PY"
  if command -v nvidia-smi >/dev/null 2>&1; then
    step nvidia-smi 30 nvidia-smi
  fi
  step build 300 "${BUILD_CMD[@]}"
  if [ "$STEP_RC" -ne 0 ] && [ "$STEP_RC" -ne 125 ]; then
    # pip missing or unable to install editable here: the same extension, built in place
    # (tests and benchmarks run from the repository root, so it imports from there).
    step build-inplace 300 "${BUILD_FALLBACK[@]}"
    if [ "$STEP_RC" -eq 0 ]; then
      STATUS[${#STATUS[@]} - 2]="failed, built in place instead"
    fi
  fi
  step info 60 "$PY" -m tvr_kernels.info
  if [ "$SKIP_TESTS" -eq 0 ]; then
    cap=300
    if [ "$SKIP_BENCH" -eq 0 ]; then  # leave the benchmarks at least 150 s
      reserve=$(($(left) - 150))
      [ "$reserve" -lt "$cap" ] && cap=$reserve
    fi
    step tests "$cap" "${TEST_CMD[@]}"
  fi
  if [ "$SKIP_BENCH" -eq 0 ]; then
    if [ -n "$OPS" ]; then
      step bench "$(left)" "${BENCH_CMD[@]}" --ops "$OPS"
    else
      if mapfile -t groups < <(timeout 120 "$PY" -c "$GROUPS_PY") && [ "${#groups[@]}" -gt 0 ]; then
        for ops in "${groups[@]}"; do
          step "bench-${ops%%,*}" "$(left)" "${BENCH_CMD[@]}" --ops "$ops"
        done
      else
        record "bench modules" "FAILED (import)" 0
      fi
    fi
  fi
fi

summary=$(
  printf '== summary (%d s of a %d s budget)\n' "$SECONDS" "$BUDGET"
  for i in "${!NAMES[@]}"; do
    printf '  %-34s %-30s %5s s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
  done
)
printf '\n%s\n' "$summary"
[ "$DRY" -eq 1 ] || printf '%s\n' "$summary" > "$LOG/summary.txt"
failed=0
for s in "${STATUS[@]}"; do
  case "$s" in
    ok | "dry run" | "failed, built in place instead") ;;
    *) failed=1 ;;
  esac
done
[ "$failed" -eq 0 ] || echo "some steps failed, timed out or were not run: see the logs above"
exit "$failed"
