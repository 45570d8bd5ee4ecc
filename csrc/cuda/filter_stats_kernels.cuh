// Torch-free CUDA kernel of craft_ext::filter_stats (see craft_ext/reference.py).
//
// weight is given as N rows of K elements: row i starts at w + i * row_stride and is dense
// (unit stride). For each row x_i, with s = x_i0 (the row's first element, a shift that keeps
// the variance formula free of cancellation):
//
//   max_abs[i] = max_k |x_ik|                 l1[i]  = sum_k |x_ik|
//   mean[i]    = sum_k x_ik / K               std[i] = sqrt(S2 / K - (S1 / K)^2)
//   with S1 = sum_k (x_ik - s), S2 = sum_k (x_ik - s)^2   (population std, correction 0)
//
// The sums are accumulated in double (per thread, then warp shuffles, then shared memory across
// the warps of a row) and rounded once to float32, so the results are float32-accurate for
// float, double, half and bfloat16 inputs. max_abs is exact. A NaN in a row makes all four
// statistics NaN; an Inf makes max_abs and l1 Inf. With fold_var (float32 [N]; fold_gamma
// float32 [N] or null for 1), the statistics of the row times s_i = gamma_i / sqrt(var_i + eps):
// the filter as the BatchNorm after it applies it (max_abs, l1, std times |s_i|, mean times s_i).
//
// A row is handled by kWarpsPerRow warps of a 256-thread block (1 warp for short rows, so one
// block serves 8 filters; 8 warps for long rows). With kVec, rows are read with 16-byte vector
// loads (the caller checks that w and row_stride are aligned to them), then a scalar tail.
#pragma once

#include "cuda_common.cuh"

namespace craft_ext {
namespace cuda {

// Partial statistics of some elements of one row.
struct StatsAcc {
  float max_abs;
  double l1;
  double sum;
  double s1;  // sum of (x - shift)
  double s2;  // sum of (x - shift)^2

  __device__ __forceinline__ void init() {
    max_abs = 0.0f;
    l1 = sum = s1 = s2 = 0.0;
  }
  __device__ __forceinline__ void add(double x, double shift) {
    const double a = fabs(x);
    max_abs = nan_max(max_abs, static_cast<float>(a));
    l1 += a;
    sum += x;
    const double d = x - shift;
    s1 += d;
    s2 += d * d;
  }
  __device__ __forceinline__ void merge(const StatsAcc& o) {
    max_abs = nan_max(max_abs, o.max_abs);
    l1 += o.l1;
    sum += o.sum;
    s1 += o.s1;
    s2 += o.s2;
  }
  __device__ __forceinline__ void warp_reduce() {
    max_abs = warp_nan_max(max_abs);
    l1 = warp_sum(l1);
    sum = warp_sum(sum);
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
  }
};

// 16 bytes of consecutive elements, for vectorised loads.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
  T v[kSize];
};

template <typename T, int kWarpsPerRow, bool kVec>
__global__ void __launch_bounds__(kBlockThreads)
    filter_stats_kernel(const T* __restrict__ w, int64_t n, int64_t k, int64_t row_stride,
                        float* __restrict__ max_abs, float* __restrict__ l1,
                        float* __restrict__ mean, float* __restrict__ stdv,
                        const float* __restrict__ fold_gamma, const float* __restrict__ fold_var,
                        float fold_eps) {
  static_assert(kBlockWarps % kWarpsPerRow == 0, "warps per row must divide the block");
  constexpr int kRowsPerBlock = kBlockWarps / kWarpsPerRow;
  constexpr int kRowThreads = kWarpsPerRow * kWarpSize;
  __shared__ StatsAcc partial[kBlockWarps];

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + warp / kWarpsPerRow;
  const int t = threadIdx.x % kRowThreads;  // thread index within the row's group
  const bool valid = row < n;

  StatsAcc acc;
  acc.init();
  if (valid) {
    const T* x = w + row * row_stride;
    const double shift = to_double(x[0]);
    int64_t tail_start = 0;
    if constexpr (kVec) {
      constexpr int kV = Vec16<T>::kSize;
      const int64_t nvec = k / kV;
      const auto* xv = reinterpret_cast<const Vec16<T>*>(x);
      for (int64_t j = t; j < nvec; j += kRowThreads) {
        const Vec16<T> chunk = xv[j];
#pragma unroll
        for (int e = 0; e < kV; ++e) acc.add(to_double(chunk.v[e]), shift);
      }
      tail_start = nvec * kV;
    }
    for (int64_t j = tail_start + t; j < k; j += kRowThreads) acc.add(to_double(x[j]), shift);
  }
  acc.warp_reduce();

  if constexpr (kWarpsPerRow > 1) {
    // All threads reach this barrier (no early return above).
    if (lane == 0) partial[warp] = acc;
    __syncthreads();
    const int first = (warp / kWarpsPerRow) * kWarpsPerRow;  // row's first warp in the block
    if (warp == first) {
      acc.init();
      if (lane < kWarpsPerRow) acc = partial[first + lane];
      acc.warp_reduce();  // lanes >= kWarpsPerRow hold the identity
    }
    if (warp != first) return;
  }

  if (valid && lane == 0) {
    const double kd = static_cast<double>(k);
    const double m1 = acc.s1 / kd;
    double var = acc.s2 / kd - m1 * m1;
    var = var > 0.0 ? var : (var != var ? var : 0.0);  // clamp rounding below 0, keep NaN
    float out_max = acc.max_abs;
    float out_l1 = static_cast<float>(acc.l1);
    float out_mean = static_cast<float>(acc.sum / kd);
    float out_std = static_cast<float>(sqrt(var));
    if (fold_var != nullptr) {
      // the BN that follows folded in: s = gamma / sqrt(var + eps), IEEE float32 (no fast math)
      const float gamma = fold_gamma != nullptr ? fold_gamma[row] : 1.0f;
      const float var_i = fold_var[row];
      // NaN where gamma or var is not finite (reference.folded_scale): x - x is 0 for finite
      // x and NaN for Inf / NaN (IEEE arithmetic; no fast math in this build)
      const float not_finite = (gamma - gamma) + (var_i - var_i);
      const float s = not_finite == 0.0f ? gamma / sqrtf(var_i + fold_eps) : not_finite;
      const float a = fabsf(s);
      out_max *= a;
      out_l1 *= a;
      out_mean *= s;
      out_std *= a;
    }
    max_abs[row] = out_max;
    l1[row] = out_l1;
    mean[row] = out_mean;
    stdv[row] = out_std;
  }
}

// Launches filter_stats_kernel for rows [N, K] (dense rows, `row_stride` elements apart) on
// `stream`. Outputs are float32 [N] device arrays. Launch errors are left for the caller to
// check (cudaGetLastError / C10_CUDA_KERNEL_LAUNCH_CHECK).
template <typename T>
void launch_filter_stats(const T* w, int64_t n, int64_t k, int64_t row_stride, float* max_abs,
                         float* l1, float* mean, float* stdv, cudaStream_t stream,
                         const float* fold_gamma = nullptr, const float* fold_var = nullptr,
                         float fold_eps = 0.0f) {
  if (n == 0) return;
  constexpr int kV = Vec16<T>::kSize;
  const bool vec = k >= kV && reinterpret_cast<uintptr_t>(w) % 16 == 0 &&
                   (n == 1 || row_stride % kV == 0);
  const bool warp_per_row = k <= 1024;  // else one block of eight warps per filter
  const dim3 grid(blocks_for(n, warp_per_row ? kBlockWarps : 1));
  const dim3 block(kBlockThreads);
  auto kernel = filter_stats_kernel<T, kBlockWarps, false>;
  if (warp_per_row) {
    kernel = vec ? filter_stats_kernel<T, 1, true> : filter_stats_kernel<T, 1, false>;
  } else if (vec) {
    kernel = filter_stats_kernel<T, kBlockWarps, true>;
  }
  CRAFT_EXT_LAUNCH(grid, block, stream, kernel)(w, n, k, row_stride, max_abs, l1, mean, stdv,
                                                 fold_gamma, fold_var, fold_eps);
}

}  // namespace cuda
}  // namespace craft_ext
