#!/usr/bin/env bash
# One-shot GPU check: the first thing to run whenever a GPU is available.
#
#   tools/gpu_check.sh [OUT_DIR]          (default OUT_DIR: $OUT, else benchmarks/results)
#
# On a machine with an NVIDIA GPU and torch (with CUDA) already installed, from a checkout:
#   1. builds craft_ext._C in place for the present GPU architecture only (MAX_JOBS = cores);
#   2. runs every cuda-marked test (backends vs the reference on the GPU, no host sync under
#      torch.cuda.set_sync_debug_mode("error"), CUDA-graph capture) and the optimizer's
#      sync / capture check;
#   3. runs the GPU benchmarks (pytest-benchmark JSON with device name and versions inside);
#   4. prints one summary table against the targets (tools/gpu_summary.py).
# Writes <OUT>/gpu-<device>-torch<version>.{log,json} and -tests.xml, and build.log.
# Budget: about 8 minutes on an H100 with 16 cores (each phase has its own timeout).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CRAFT_EXT_REQUIRE_EXTENSION=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if ! ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null); then
  echo "gpu_check: torch sees no CUDA GPU here" >&2
  exit 2
fi
export TORCH_CUDA_ARCH_LIST=$ARCH
NAME=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
TORCH=$($PY -c "import torch; print(torch.__version__.split('+')[0])")
TAG="gpu-$NAME-torch$TORCH"
XDIST=()
if $PY -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
{
  echo "== versions"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 1 || true
  echo "== build (TORCH_CUDA_ARCH_LIST=$ARCH, MAX_JOBS=$MAX_JOBS)"
  t0=$SECONDS
  timeout 300 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build exit $? in $((SECONDS - t0)) s (log: $OUT/build.log)"
  $PY -c "import craft_ext as c; print('extension_loaded', c.extension_loaded(), 'cuda backends', c.available_backends('cuda', 'reactivate_'))"
  echo "== cuda tests"
  t0=$SECONDS
  timeout 330 $PY -m pytest tests -m cuda -q -p no:cacheprovider -rfE "${XDIST[@]}" \
    --junitxml="$OUT/$TAG-tests.xml"
  echo "tests exit $? in $((SECONDS - t0)) s"
  timeout 60 $PY -m pytest benchmarks/bench_optim.py::test_cuda_step_no_sync_and_graph_capture \
    -q -p no:cacheprovider -rfE --benchmark-disable
  echo "tests exit $? in $((SECONDS - t0)) s"
  echo "== benchmarks"
  t0=$SECONDS
  timeout 240 $PY -m pytest benchmarks/bench_reactivate.py benchmarks/bench_filter_stats.py \
    benchmarks/bench_optim.py benchmarks/bench_feature_map_stats.py \
    -k "cuda and (iresnet or r100 or optimizer or B100-C64 or r50-conv)" \
    --benchmark-only --benchmark-json "$OUT/$TAG.json" -q -p no:cacheprovider
  echo "benchmarks exit $? in $((SECONDS - t0)) s"
  echo "== summary"
  $PY tools/gpu_summary.py "$OUT/$TAG.json" "$OUT/$TAG-tests.xml"
} 2>&1 | tee "$OUT/$TAG.log"
