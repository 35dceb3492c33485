#!/usr/bin/env bash
# One command for a lent GPU machine: install carried peer wheels, build with CUDA, run the GPU
# tests, compute-sanitizer memcheck and racecheck on a small case, the quick benchmarks, then the
# full benchmarks with whatever time is left. Run from the repository root:
#
#     bash bench/gpu_check.sh
#
# Every step is time-boxed with `timeout` under one deadline (GPU_CHECK_SECONDS, default 450 s),
# so the script ends in under 8 minutes; a failing step is recorded and the next one still runs.
# Logs and results go under $OUT (or bench/results/gpu-check-<date> when OUT is unset). Only a
# few files come back from a lent machine's $OUT, so everything is also packed into
# gpu-check.tar.gz there; summary.txt and the benchmarks' Markdown tables lie beside it.
set -uo pipefail
cd "$(dirname "$0")/.."

STARTED=$(date +%s)
DEADLINE=$((STARTED + ${GPU_CHECK_SECONDS:-450}))
PYTHON=${PYTHON:-python3}
if [ -n "${OUT:-}" ]; then
  RESULTS=$OUT
  PACK_ONLY=1  # a lent machine returns at most 8 files: keep the tarball, drop the loose copies
else
  RESULTS=bench/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)
  PACK_ONLY=0
fi
LOGS=$RESULTS/logs
mkdir -p "$LOGS"
RESULTS=$(cd "$RESULTS" && pwd)
LOGS=$RESULTS/logs
SUMMARY=()

# step NAME SECONDS COMMAND...: run COMMAND under `timeout`, at most SECONDS and never past the
# deadline, logging to $LOGS/NAME.log; records ok / FAIL (rc) / TIMEOUT / skipped.
step() {
  local name=$1 box=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - 5))
  if [ "$left" -lt 15 ]; then
    SUMMARY+=("$(printf '%-22s %-14s %5s' "$name" "skipped" "0")  (no time left)")
    return 0
  fi
  [ "$box" -gt "$left" ] && box=$left
  echo "== $name (up to ${box}s): $*"
  local begin=$(date +%s) rc
  timeout -k 15 "$box" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - begin)) state
  case $rc in
    0) state=ok ;;
    124|137) state=TIMEOUT ;;
    *) state="FAIL (rc $rc)" ;;
  esac
  tail -n 5 "$LOGS/$name.log" | sed 's/^/   | /'
  SUMMARY+=("$(printf '%-22s %-14s %5s' "$name" "$state" "$took")  logs/$name.log")
  return 0
}

note() {  # note NAME TEXT: a step that did not run, and why
  SUMMARY+=("$(printf '%-22s %-14s %5s' "$1" "skipped" "0")  ($2)")
}

# 1. Peer wheels (Liger-Kernel, SpikingJelly, ...) carried in .whl/: no network on the machine.
if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 90 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  note wheels "no .whl/*.whl carried"
fi

# 2. What the machine is.
step environment 30 bash -c "nvidia-smi; nvcc --version; $PYTHON -c 'import torch, triton; \
print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name())'; \
$PYTHON -m pip list 2>/dev/null | grep -i -E 'torch|triton|liger|spikingjelly|cupy'; true"

# 3. Build the extension with its CUDA kernels (editable, so htakl_kernels.triton_kernels maps).
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
step build 210 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v -e .
if ! "$PYTHON" -c "import htakl_kernels._C" 2>/dev/null; then
  # The first H100 run's pip could not install editable offline; an in-place build serves the
  # tests and benchmarks run from this folder just as well.
  step build-inplace 210 "$PYTHON" setup.py build_ext --inplace
fi
step extension-has-cuda 30 "$PYTHON" -c "import htakl_kernels, sys; \
from htakl_kernels._backends import extension_built_with_cuda as cuda; \
print('backends on cuda:', htakl_kernels.available_backends('cuda')); sys.exit(0 if cuda() else 1)"

# 4. GPU tests (the CPU suite runs in CI).
step gpu-tests 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests -k "cuda or triton" \
  --junitxml="$LOGS/gpu-tests.xml"

# 5. compute-sanitizer on the CUDA helper's small case (tests/cuda/sanitizer_case.py). No caching allocator: memcheck then sees
# each tensor's exact bounds instead of a pooled block.
SANITIZER_CASE=$(ls tests/cuda/sanitizer*.py 2>/dev/null | head -n 1)
if [ -n "$SANITIZER_CASE" ]; then
  for tool in memcheck racecheck; do
    step "sanitizer-$tool" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
      --tool "$tool" --error-exitcode 1 "$PYTHON" "$SANITIZER_CASE"
  done
else
  note sanitizer "no tests/cuda/sanitizer*.py"
fi

# The CUDA binding's own errors crashed the interpreter on the first H100 run: a backtrace of one.
# The lent image has cuda-gdb but no gdb; cuda-gdb debugs host-only crashes too.
DEBUGGER=$(command -v gdb || command -v cuda-gdb || true)
if [ -n "$DEBUGGER" ]; then
  step binding-error-gdb 60 "$DEBUGGER" -q -batch -ex run -ex bt -ex "info sharedlibrary" \
    --args "$PYTHON" tests/cuda/binding_error_case.py
else
  step binding-error 60 "$PYTHON" tests/cuda/binding_error_case.py
fi
# Suspect: the extension's compiler and runtime against torch's. What the extension needs and
# carries, which compiler built it, and the same case with that compiler's C++ runtime preloaded.
step extension-runtime 30 bash -c 'so=$(ls htakl_kernels/_C*.so | head -n 1); \
readelf -d "$so" | grep -E "NEEDED|RUNPATH|RPATH"; \
echo "runtime symbols defined inside (none expected):"; \
nm -D --defined-only "$so" | grep -E "__cxa_throw|_Unwind_|__gxx_personality"; \
echo "newest GLIBCXX needed: $(objdump -T "$so" | grep -o "GLIBCXX_[0-9.]*" | sort -uV | tail -n 1)"; \
command -v c++ g++ gcc; g++ --version | head -n 1; g++ -print-file-name=libstdc++.so.6; true'
step binding-error-preload 60 env \
  LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6):$(g++ -print-file-name=libgcc_s.so.1)" \
  "$PYTHON" tests/cuda/binding_error_case.py

# 6. Benchmarks: the quick ones (no torch.compile) first, then the full suites while time lasts
# (on SIGTERM from timeout a suite writes the cases it finished).
step bench-quick 120 "$PYTHON" -m bench --quick --device cuda --out "$RESULTS/bench-quick"
for suite in loss lif; do
  step "bench-$suite" 600 "$PYTHON" -m bench --suite "$suite" --device cuda --out "$RESULTS/bench"
done

# 7. Pack everything; put the summary and the Markdown tables beside the tarball.
for table in "$RESULTS"/bench-quick/*.md "$RESULTS"/bench/*.md; do
  [ -f "$table" ] && cp "$table" "$RESULTS/$(basename "$(dirname "$table")")-$(basename "$table")"
done
{
  echo "gpu_check on $(hostname) at $(date -u +%FT%TZ), $(($(date +%s) - STARTED)) s in all"
  printf '%-22s %-14s %5s  %s\n' step status secs log
  printf '%s\n' "${SUMMARY[@]}"
} >"$RESULTS/summary.txt"
tar -czf "$RESULTS/gpu-check.tar.gz" -C "$RESULTS" --exclude gpu-check.tar.gz \
  $(cd "$RESULTS" && ls -d logs bench bench-quick 2>/dev/null)
if [ "$PACK_ONLY" = 1 ]; then
  rm -rf "$LOGS" "$RESULTS/bench" "$RESULTS/bench-quick"
fi
echo
cat "$RESULTS/summary.txt"
