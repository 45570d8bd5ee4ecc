// Torch-free CUDA kernel that writes the reactivated filters of craft_ext::reactivate_ (the
// statistics come from filter_stats_kernels.cuh and the donor pairing from ATen ops in
// reactivate.cu; see craft_ext/reference.py for the semantics and Bhatta et al., arXiv
// 2312.00072, sec. 4.3 for the method).
//
// weight is N dense rows of K elements, row i at w + i * row_stride. For every row i with
// reactivated[i] (and only those), element j becomes
//
//   craft:            -w[donor[i], j]                          (exact negation)
//   scaled_gaussian:  T(mean[donor[i]] + std[donor[i]] * noise[i, j])   (float32, no FMA)
//   random:           T(noise[i, j] * scale),  scale = float32(sqrt(2 / K))
//
// noise is float32 [N, K], row-contiguous, in the same element order as the weight rows.
// A craft donor is active, hence never reactivated itself, so the in-place update never reads
// a row that the same launch writes.
#pragma once

#include "cuda_common.cuh"

namespace craft_ext {
namespace cuda {

// Methods in the order of craft_ext::Method (csrc/common.h).
enum class ReactivateMethod : int { kCraft = 0, kScaledGaussian = 1, kRandom = 2 };

template <typename T, ReactivateMethod kMethod>
__global__ void __launch_bounds__(kBlockThreads)
    write_reactivated_kernel(T* __restrict__ w, int64_t n, int64_t k, int64_t row_stride,
                             const bool* __restrict__ reactivated,
                             const int64_t* __restrict__ donor, const float* __restrict__ noise,
                             const float* __restrict__ mean, const float* __restrict__ stdv,
                             float scale) {
  const int64_t total = n * k;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    const int64_t i = idx / k;
    if (!reactivated[i]) continue;
    const int64_t j = idx - i * k;
    T* out = w + i * row_stride + j;
    if constexpr (kMethod == ReactivateMethod::kCraft) {
      *out = negate(w[donor[i] * row_stride + j]);
    } else if constexpr (kMethod == ReactivateMethod::kScaledGaussian) {
      const int64_t s = donor[i];
      *out = from_float<T>(__fadd_rn(mean[s], __fmul_rn(stdv[s], noise[idx])));
    } else {
      *out = from_float<T>(__fmul_rn(noise[idx], scale));
    }
  }
}

// Launches write_reactivated_kernel on `stream`; `noise` may be null for craft and mean/stdv
// for craft and random. Launch errors are left for the caller to check.
template <typename T>
void launch_write_reactivated(T* w, int64_t n, int64_t k, int64_t row_stride,
                              const bool* reactivated, const int64_t* donor, const float* noise,
                              const float* mean, const float* stdv, float scale,
                              ReactivateMethod method, cudaStream_t stream) {
  const int64_t total = n * k;
  if (total == 0) return;
  constexpr int64_t kMaxBlocks = 65535;  // grid-stride loop beyond this
  const int64_t blocks = (total + kBlockThreads - 1) / kBlockThreads;
  const dim3 grid(static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks));
  const dim3 block(kBlockThreads);
  auto kernel = write_reactivated_kernel<T, ReactivateMethod::kCraft>;
  if (method == ReactivateMethod::kScaledGaussian) {
    kernel = write_reactivated_kernel<T, ReactivateMethod::kScaledGaussian>;
  } else if (method == ReactivateMethod::kRandom) {
    kernel = write_reactivated_kernel<T, ReactivateMethod::kRandom>;
  }
  CRAFT_EXT_LAUNCH(grid, block, stream, kernel)(w, n, k, row_stride, reactivated, donor, noise,
                                                mean, stdv, scale);
}

}  // namespace cuda
}  // namespace craft_ext
