#!/usr/bin/env bash
# One command for a GPU machine, its steps in order of value: build for sm_90, the benchmarks of
# every fused kernel at the shapes its performance targets name (with the cost census's predictions
# beside the measured figures), the GPU tests, compute-sanitizer memcheck and racecheck, the
# binding-crash diagnosis, then the full benchmarks with whatever time is left. Run from the
# repository root:
#
#     bash bench/gpu_check.sh
#
# A second call on a fresh machine can skip the build: the first leaves the extension it built in
# $OUT (_C.so, with the hash of its sources in _C.sha256); put both in .gpu-build/ (git-ignored)
# and carry that folder. It is used only while the sources hash alike.
# Every step runs under its own `timeout -s INT -k 10` inside one deadline (GPU_CHECK_SECONDS,
# default 450 s): SIGINT first, so pytest still writes its summary and junit file and the
# benchmarks write the cases they finished. A failing or cut step is recorded and the next one
# runs. Results are packed after every step, so a run stopped from outside loses only the step
# in flight.
#
# Output: $OUT when set (a remote device machine that returns only a few files gets: summary.txt,
# gpu-check.tar.gz with every log and result, the census-against-measured tables and the built
# extension; the working files live in a scratch folder), else bench/results/gpu-check-<date>/ with everything.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

STARTED=$(date +%s)
DEADLINE=$((STARTED + ${GPU_CHECK_SECONDS:-450}))
PYTHON=${PYTHON:-python3}
if [ -n "${OUT:-}" ]; then
  FINAL=$OUT
  WORK=$(mktemp -d /tmp/gpu-check.XXXXXX)
else
  FINAL=bench/results/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)
  WORK=$FINAL
fi
mkdir -p "$FINAL" "$WORK/logs"
FINAL=$(cd "$FINAL" && pwd)
WORK=$(cd "$WORK" && pwd)
LOGS=$WORK/logs
SUMMARY=$WORK/summary.txt
{
  echo "gpu_check on $(hostname) from $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null)"
  printf '%-22s %-14s %5s  %s\n' step status secs log
} >"$SUMMARY"

# pack: the tarball of everything so far, the summary and the tables beside it in $FINAL.
pack() {
  local items=(logs summary.txt) tables=() name
  for name in bench bench-targets; do
    [ -d "$WORK/$name" ] && items+=("$name")
  done
  for name in "$WORK"/*.md; do
    [ -f "$name" ] && tables+=("$(basename "$name")")
  done
  tar -czf "$FINAL/gpu-check.tar.gz.part" -C "$WORK" "${items[@]}" ${tables[@]+"${tables[@]}"}
  mv -f "$FINAL/gpu-check.tar.gz.part" "$FINAL/gpu-check.tar.gz"
  if [ "$FINAL" != "$WORK" ]; then
    cp -f "$SUMMARY" "$FINAL/"
    for name in ${tables[@]+"${tables[@]}"}; do
      cp -f "$WORK/$name" "$FINAL/"
    done
  fi
}

record() {  # record NAME STATE SECONDS NOTE
  printf '%-22s %-14s %5s  %s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"
  pack
}

# step NAME SECONDS COMMAND...: COMMAND under `timeout -s INT -k 10`, at most SECONDS and never
# past the deadline, logged to $LOGS/NAME.log; records ok / FAIL (rc) / TIMEOUT / skipped.
step() {
  local name=$1 box=$2
  shift 2
  local left=$((DEADLINE - $(date +%s) - 15))
  if [ "$left" -lt 15 ]; then
    record "$name" skipped 0 "(no time left)"
    return 0
  fi
  [ "$box" -gt "$left" ] && box=$left
  echo "== $name (up to ${box}s): $*"
  local begin rc took state
  begin=$(date +%s)
  timeout -s INT -k 10 "$box" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  took=$(($(date +%s) - begin))
  case $rc in
    0) state=ok ;;
    124|137) state=TIMEOUT ;;
    *) state="FAIL (rc $rc)" ;;
  esac
  tail -n 5 "$LOGS/$name.log" | sed 's/^/   | /'
  record "$name" "$state" "$took" "logs/$name.log"
  return 0
}

note() {  # note NAME TEXT: a step that did not run, and why
  record "$1" skipped 0 "($2)"
}

# compare NAME JSON...: the census's predictions beside the measured fractions (reads JSON only).
compare() {
  local name=$1
  shift
  step "$name" 30 "$PYTHON" -m bench.census.compare "$@" --out "$WORK/$name.md"
}

# The extension's inputs: a carried build is reused only while these hash alike.
sources_hash() {
  find csrc setup.py pyproject.toml scripts/gpu_flags.py -type f | LC_ALL=C sort \
    | xargs sha256sum | sha256sum | cut -d' ' -f1
}

# Scripts run as files (tests/cuda/*.py) import htakl_kernels from here: the in-place build.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

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
$PYTHON -m pip list 2>/dev/null | grep -i -E 'torch|triton|liger|spikingjelly|ninja|xdist'; true"

# 3. The extension with its CUDA kernels, built in place for sm_90 only (scripts/gpu_flags.py reads
# HTAKL_GPU_ARCHS), ninja over the files; or the one a previous call built from the same sources.
# In place: an offline pip could not install editable on the first H100 run. The Triton kernels,
# which setup.py maps into the package from the top-level triton_kernels/ (package_dir), then need
# a link there to import as htakl_kernels.triton_kernels.
[ -e htakl_kernels/triton_kernels ] || ln -s ../triton_kernels htakl_kernels/triton_kernels
HASH=$(sources_hash)
EXTENSION_SUFFIX=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
if [ -f .gpu-build/_C.so ] && [ "$(cat .gpu-build/_C.sha256 2>/dev/null)" = "$HASH" ]; then
  cp -f .gpu-build/_C.so "htakl_kernels/_C$EXTENSION_SUFFIX"
  note build "reused .gpu-build/_C.so (sources hash $HASH)"
else
  export HTAKL_GPU_ARCHS=90 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  step build 240 "$PYTHON" setup.py build_ext --inplace
  if [ -f "htakl_kernels/_C$EXTENSION_SUFFIX" ] && [ "$FINAL" != "$WORK" ]; then
    cp -f "htakl_kernels/_C$EXTENSION_SUFFIX" "$FINAL/_C.so"
    echo "$HASH" >"$FINAL/_C.sha256"
  fi
fi
step extension-has-cuda 30 "$PYTHON" -c "import htakl_kernels, htakl_kernels.triton_kernels, sys; \
from htakl_kernels._backends import extension_built_with_cuda as cuda; \
print('backends on cuda:', htakl_kernels.available_backends('cuda')); sys.exit(0 if cuda() else 1)"

# 4. The performance targets' shapes: every fused kernel against F.kl_div (the floor of any KL
# loss) and the peers present, bfloat16 and float32 (torch.compile and the eager reference are in
# the full suites of step 8), then measured against the census's predictions.
step bench-loss-targets 150 "$PYTHON" -m bench --suite loss --device cuda \
  --shapes 4096x1000,4096x32000,1024x131072,T4x4096x32000,T4x8x131072 \
  --implementations htakl,f.kl_div,liger --out "$WORK/bench-targets"
step bench-lif-targets 90 "$PYTHON" -m bench --suite lif --device cuda \
  --implementations htakl,spikingjelly --out "$WORK/bench-targets"
compare census-vs-targets "$WORK/bench-targets/lif.json" "$WORK/bench-targets/loss.json"

# Where the measured kernels wait: Nsight Compute's speed of light, occupancy, warp stall reasons
# and memory workload for the CUDA and Triton kernels at two HTA-KL shapes and LIF T = 32.
if command -v ncu >/dev/null; then
  step ncu 90 ncu --clock-control none --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section MemoryWorkloadAnalysis -k "regex:hta_kl|lif_" \
    "$PYTHON" bench/ncu_case.py
else
  note ncu "ncu not on the PATH"
fi

# 5. GPU tests (the CPU suite runs in CI), over several processes when pytest-xdist is there: most
# of their time is compiling Triton kernels. The kernels' own files first; then the contract grid
# (about 2000 cases on a GPU, 20 minutes of one process: what the time allows).
PARALLEL=()
"$PYTHON" -c "import xdist" 2>/dev/null && PARALLEL=(-n 12)
GPU_TEST_FILES=$(ls tests/test_*.py | grep -v -e test_hta_kl_contract -e test_lif_contract -e test_demo_)
step gpu-tests 150 "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} \
  $GPU_TEST_FILES -k "(cuda or triton) and not emulat" --junitxml="$LOGS/gpu-tests.xml"
step gpu-contract 180 "$PYTHON" -m pytest -q -rfEs -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} \
  tests/test_lif_contract.py tests/test_hta_kl_contract.py -k "(cuda or triton) and not emulat" \
  --junitxml="$LOGS/gpu-contract.xml"

# 6. compute-sanitizer on the CUDA kernels' small cases. No caching allocator: memcheck then sees
# each tensor's exact bounds instead of a pooled block.
for tool in memcheck racecheck; do
  step "sanitizer-$tool" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
    --tool "$tool" --error-exitcode 1 "$PYTHON" tests/cuda/sanitizer_case.py
done
# 7. The CUDA binding's own errors crashed the interpreter on the first H100 run: a backtrace of
# one (where the image has cuda-gdb but no gdb; cuda-gdb debugs host-only crashes too), what the
# extension links and which compiler built it, and the case rerun with that compiler's C++
# runtime preloaded.
DEBUGGER=$(command -v gdb || command -v cuda-gdb || true)
if [ -n "$DEBUGGER" ]; then
  step binding-error-gdb 120 "$DEBUGGER" -q -batch -ex run -ex bt -ex "info sharedlibrary" \
    --args "$PYTHON" tests/cuda/binding_error_case.py
else
  step binding-error 120 "$PYTHON" tests/cuda/binding_error_case.py
fi
step extension-runtime 30 bash -c 'so=$(ls htakl_kernels/_C*.so | head -n 1); \
readelf -d "$so" | grep -E "NEEDED|RUNPATH|RPATH"; \
echo "runtime symbols defined inside (none expected):"; \
nm -D --defined-only "$so" | grep -E "__cxa_throw|_Unwind_|__gxx_personality"; \
echo "newest GLIBCXX needed: $(objdump -T "$so" | grep -o "GLIBCXX_[0-9.]*" | sort -uV | tail -n 1)"; \
command -v c++ g++ gcc; g++ --version | head -n 1; g++ -print-file-name=libstdc++.so.6; true'
step binding-error-preload 120 env \
  LD_PRELOAD="$(g++ -print-file-name=libstdc++.so.6):$(g++ -print-file-name=libgcc_s.so.1)" \
  "$PYTHON" tests/cuda/binding_error_case.py

# 8. The full suites (torch.compile included) while time lasts; SIGINT makes a suite write the
# cases it finished.
for suite in loss lif; do
  step "bench-$suite" 600 "$PYTHON" -m bench --suite "$suite" --device cuda --out "$WORK/bench"
done
compare census-vs-full "$WORK/bench/lif.json" "$WORK/bench/loss.json"

echo "gpu_check done in $(($(date +%s) - STARTED)) s" >>"$SUMMARY"
pack
echo
cat "$SUMMARY"
cat "$WORK"/census-vs-*.md 2>/dev/null || true
