// Torch-free device helpers shared by craft_ext's CUDA kernels (csrc/cuda/*_kernels.cuh).
//
// Only the CUDA toolkit headers are used here, so the kernels can be compile-checked (and
// instantiated by a standalone harness, see tools/check_cuda_compile.sh) without torch's CUDA
// headers. The torch glue in csrc/cuda/*.cu maps at::Half / at::BFloat16 onto __half /
// __nv_bfloat16 (identical 16-bit layouts) before launching.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// CRAFT_EXT_LAUNCH(grid, block, stream, kernel)(args...) launches `kernel` on `stream` with no
// dynamic shared memory. It is a macro only so that the host emulation used to test the kernels
// without a GPU (csrc/cuda/emulation/) can run the same launchers: it defines its own version
// before including this file.
#ifndef CRAFT_EXT_LAUNCH
#define CRAFT_EXT_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

namespace craft_ext {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Threads per block of every kernel launched by craft_ext (8 warps).
constexpr int kBlockThreads = 256;
constexpr int kBlockWarps = kBlockThreads / kWarpSize;

// Exact conversions of every supported element type to float and double. They spell out the
// intrinsics because torch builds with __CUDA_NO_HALF_CONVERSIONS__ (no implicit casts).
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(double x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ double to_double(float x) { return static_cast<double>(x); }
__device__ __forceinline__ double to_double(double x) { return x; }
__device__ __forceinline__ double to_double(__half x) { return __half2float(x); }
__device__ __forceinline__ double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }

// float -> element type, round to nearest even (as torch's .to(dtype)).
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ double from_float<double>(float x) { return static_cast<double>(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// -x, exact for every type (flips the sign bit of the 16-bit types).
__device__ __forceinline__ float negate(float x) { return -x; }
__device__ __forceinline__ double negate(double x) { return -x; }
__device__ __forceinline__ __half negate(__half x) { return __hneg(x); }
__device__ __forceinline__ __nv_bfloat16 negate(__nv_bfloat16 x) { return __hneg(x); }

// max that propagates NaN (fmaxf would drop it): NaN if either operand is NaN.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Sum of `v` over the 32 lanes of a warp; every lane gets the result.
template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// NaN-propagating max of `v` over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_nan_max(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = nan_max(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// Blocks needed to cover `work` items with `per_block` items per block (at least 1).
inline unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t b = (work + per_block - 1) / per_block;
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

}  // namespace cuda
}  // namespace craft_ext
