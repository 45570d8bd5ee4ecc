#!/usr/bin/env bash
# Compile-check craft_ext's CUDA sources with nvcc for sm_80 (A100) and sm_90 (H100/H200) on a
# machine without a GPU (and possibly without a CUDA build of torch).
#
# What IS checked:
#   1. csrc/cuda/*.cu, torch glue included, compile to object files for sm_80 and sm_90 with the
#      flags torch's CUDAExtension uses (-D__CUDA_NO_HALF_OPERATORS__ etc., --expt-relaxed-
#      constexpr, -std=c++17, -O3 as in setup.py; no --use_fast_math). The CPU wheel of torch ships
#      the c10/cuda and ATen headers but not the generated c10/cuda/impl/cuda_cmake_macros.h;
#      -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE (torch's own switch for that) skips it. ptxas register
#      and spill reports are printed (-Xptxas -v, filtered).
#   2. A torch-free harness that includes only csrc/cuda/*_kernels.cuh, instantiates every
#      kernel for float, double, half and bfloat16 and every method, and links into an
#      executable against the static CUDA runtime (catches missing device symbols); its PTX
#      must hold no .ftz instruction (--use_fast_math or -ftz=true would flush float32
#      denormals to zero, e.g. give a filter of denormals max_abs 0, inactive at threshold 0).
#
#   3. csrc/cuda/emulation/emulate_kernels.cpp: the same launchers and kernels compiled for the
#      host with a thread-per-CUDA-thread emulation (host_emulation.h) and run against a direct
#      C++ computation: every dtype, warp and block paths, vector / scalar loads, row strides,
#      misaligned bases, NaN / Inf rows, the three write methods. It checks the logic
#      (indexing, reduction trees, barriers, launch configuration), not GPU behaviour.
#      tests/test_cuda_kernels.py::test_emulated_* go one step further on CPU: they build the
#      .cu files, torch glue included, under the same emulation and compare the ops with
#      craft_ext/reference.py (layouts, dtypes, methods, pairing rules).
#
# What is NOT checked here:
#   * linking the torch glue against libc10_cuda / libtorch_cuda (the CPU wheel has neither),
#     nor loading the op library: that needs a CUDA build of torch;
#   * running anything: no GPU. Numerical correctness, the absence of host syncs
#     (set_sync_debug_mode("error")) and CUDA-graph capture are tested by
#     tests/test_cuda_kernels.py, tests/test_filter_stats.py and tests/test_reactivate.py on a
#     GPU machine (they skip without one).
#
# Usage: tools/check_cuda_compile.sh [arch ...]   (default: 80 90). Exit status 0 = all passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NVCC="${NVCC:-nvcc}"
ARCHS=("$@")
[ ${#ARCHS[@]} -eq 0 ] && ARCHS=(80 90)

command -v "$NVCC" >/dev/null || { echo "nvcc not found (set NVCC=...)"; exit 1; }
mapfile -t TORCH_INC < <(python -c 'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
# the toolkit's include directory, as nvcc itself reports it (nvcc may be a wrapper script)
CUDA_INC="$(echo | "$NVCC" --dryrun -x cu -c - -o /dev/null 2>&1 \
  | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1 | sed 's/ *$//')"
PY_INC="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"

GENCODE=()
for a in "${ARCHS[@]}"; do GENCODE+=(-gencode "arch=compute_${a},code=sm_${a}"); done
FLAGS=(-std=c++17 -O3 -lineinfo -DCRAFT_EXT_WITH_CUDA
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr
  -Xcompiler -Wall -Xcompiler -fPIC)
COMMON=("${FLAGS[@]}" "${GENCODE[@]}")

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
status=0

echo "== nvcc: $("$NVCC" --version | tail -1); archs: ${ARCHS[*]}"
echo "== 1. csrc/cuda/*.cu with the torch glue (compile only, no link)"
INC=(-I"$ROOT/csrc" -I"$PY_INC")
for d in "${TORCH_INC[@]}"; do INC+=(-I"$d"); done
for src in "$ROOT"/csrc/cuda/*.cu; do
  name="$(basename "$src" .cu)"
  if "$NVCC" "${COMMON[@]}" "${INC[@]}" -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE \
      -DPy_LIMITED_API=0x03090000 -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
      -Xptxas -v -c "$src" -o "$TMP/$name.o" 2>"$TMP/$name.log"; then
    echo "PASS $name.cu"
  else
    echo "FAIL $name.cu"; status=1
  fi
  # diagnostics from our sources (torch's own header warnings are not shown), spills, and the
  # highest register count of any kernel entry
  grep -E "error|warning" "$TMP/$name.log" | grep -v "/torch/include/\|^Remark" | sed 's/^/    /' \
    | head -40 || true
  grep -E "[1-9][0-9]* bytes spill" "$TMP/$name.log" | sed 's/^/    spill: /' | head -10 || true
  entries="$(grep -c "Compiling entry" "$TMP/$name.log" || true)"
  maxreg="$(grep -oE "Used [0-9]+ registers" "$TMP/$name.log" | grep -oE "[0-9]+" | sort -n \
    | tail -1 || true)"
  echo "    ptxas: ${entries} kernel entries, at most ${maxreg:-?} registers per thread"
done

echo "== 2. torch-free kernels: instantiate all dtypes/methods, link with the static cudart"
cat >"$TMP/harness.cu" <<'CU'
#include "cuda/filter_stats_kernels.cuh"
#include "cuda/reactivate_kernels.cuh"

using namespace craft_ext::cuda;

template <typename T>
static void instantiate() {
  T* w = nullptr;
  float* f = nullptr;
  bool* b = nullptr;
  int64_t* d = nullptr;
  launch_filter_stats<T>(w, 4, 27, 27, f, f, f, f, nullptr);
  launch_filter_stats<T>(w, 4, 4608, 4608, f, f, f, f, nullptr);
  for (auto m : {ReactivateMethod::kCraft, ReactivateMethod::kScaledGaussian,
                 ReactivateMethod::kRandom}) {
    launch_write_reactivated<T>(w, 4, 27, 27, b, d, f, f, f, 0.5f, m, nullptr);
  }
}

int main() {
  instantiate<float>();
  instantiate<double>();
  instantiate<__half>();
  instantiate<__nv_bfloat16>();
  // No GPU is expected here: report what the runtime says instead of failing.
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess || err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver ? 0
                                                                                              : 1;
}
CU
if "$NVCC" "${COMMON[@]}" -I"$ROOT/csrc" "$TMP/harness.cu" -o "$TMP/harness" \
    2>"$TMP/harness.log"; then
  echo "PASS harness (compiled and linked; not run: needs a GPU)"
else
  echo "FAIL harness"; status=1
fi
grep -E "error|warning" "$TMP/harness.log" | sed 's/^/    /' | head -40 || true
if "$NVCC" "${FLAGS[@]}" -arch="compute_${ARCHS[0]}" -I"$ROOT/csrc" -ptx "$TMP/harness.cu" \
    -o "$TMP/harness.ptx" 2>"$TMP/harness_ptx.log"; then
  # instructions such as cvt.rn.ftz.f32.f64 or setp.gt.ftz.f32 (.file lines name paths)
  ftz="$(grep -vE '^[[:space:]]*\.file' "$TMP/harness.ptx" | grep -cE '\.ftz\.' || true)"
  if [ "$ftz" = 0 ]; then
    echo "PASS no denormal flushing: no .ftz instruction in the kernels' PTX"
  else
    echo "FAIL $ftz PTX lines flush denormals (.ftz): is --use_fast_math or -ftz=true set?"
    status=1
  fi
else
  echo "FAIL harness PTX"; status=1
  grep -E "error" "$TMP/harness_ptx.log" | sed 's/^/    /' | head -20 || true
fi

echo "== 3. host emulation: run the kernels' launchers on CPU threads, check their results"
if "${CXX:-g++}" -std=c++20 -O1 -pthread -I"$CUDA_INC" \
    "$ROOT/csrc/cuda/emulation/emulate_kernels.cpp" -o "$TMP/emulate" 2>"$TMP/emulate.log"; then
  if "$TMP/emulate" | sed 's/^/    /'; then
    echo "PASS emulated kernels (indexing, reductions, vector/scalar paths, launch configs)"
  else
    echo "FAIL emulated kernels"; status=1
  fi
else
  echo "FAIL compiling the emulation"; status=1
  grep -E "error" "$TMP/emulate.log" | sed 's/^/    /' | head -20 || true
fi

[ $status -eq 0 ] && echo "== all compile checks passed" || echo "== compile checks FAILED"
exit $status
