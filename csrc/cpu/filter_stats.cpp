// CPU kernel of craft_ext::filter_stats (schema in csrc/ops.cpp, semantics in
// craft_ext/reference.py::filter_stats).
//
// For weight [N, ...] viewed as N filters x_i of K elements, returns float32 [N] tensors
//   max_abs[i] = max_k |x_ik|,  l1[i] = sum_k |x_ik|,  mean[i] = sum_k x_ik / K,
//   std[i] = sqrt(sum_k (x_ik - mean[i])^2 / K)
// (CRAFT, Bhatta et al., arXiv 2312.00072: max_abs finds inactive filters, l1 ranks donors).
// One fused sweep per filter (row_stats below), parallel over filters; float32, float64, float16
// and bfloat16 inputs; any memory layout: filters that are dense blocks (contiguous,
// channels_last, transposed kernels, slices along dim 0 or 1) are read in place, others from a
// contiguous copy. With running_var (and bn_weight), the statistics of the filters folded with
// the BatchNorm that follows them (fold_bn).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.h"

namespace craft_ext {
namespace {

// Filter i of a weight [N, ...] is a row x_i of K elements. For every row this computes, in one
// sweep over its memory,
//
//   max_abs = max_k |x_k|      l1 = sum_k |x_k|      mean = sum_k x_k / K
//   std     = sqrt(sum_k (x_k - mean)^2 / K)          (correction 0)
//
// with double accumulators, reading every element once. The row is processed in blocks of
// kStatsBlock elements: each block's M2 comes from sums of d = x - c shifted by one of its own
// elements c (cancellation bounded by the block length, not by |mean| / std), and the blocks'
// (count, mean, M2) are merged with Chan et al.'s parallel update. So float32 results are within
// an output rounding of the float64 truth even when |mean| >> std; they are rounded once.
//
// NaN semantics (as craft_ext/reference.py): a NaN anywhere in a row makes all four results
// NaN; an Inf makes max_abs and l1 Inf (and std NaN, like torch.std_mean).
struct RowStats {
  float max_abs;
  float l1;
  float mean;
  float std;
};

// An element as double: float16 / bfloat16 / float32 convert exactly, float64 is kept.
template <typename T>
inline double widen(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return static_cast<double>(static_cast<float>(v));
  }
}

// Elements per block: its shifted sums below lose at most ~kStatsBlock^2 * 2^-53 of M2.
constexpr int64_t kStatsBlock = 512;
// Independent accumulators per block loop, so the compiler can keep several in flight.
constexpr int kStatsLanes = 8;

// Statistics of one dense row x[0..k), k >= 1.
template <typename T>
inline RowStats row_stats(const T* x, int64_t k) {
  double max_abs = 0.0, l1 = 0.0, total = 0.0;
  double count = 0.0, mean = 0.0, m2 = 0.0;  // Chan merge state
  for (int64_t b0 = 0; b0 < k; b0 += kStatsBlock) {
    const int64_t len = std::min(kStatsBlock, k - b0);
    const T* p = x + b0;
    // Shifted sums d = x - c with c = the block's first element. c is a sample, so
    // len * (mean - c)^2 <= len * M2 and s2 - s1^2 / len cancels at most a factor len + 1.
    const double c = widen(p[0]);
    double amax[kStatsLanes] = {}, asum[kStatsLanes] = {}, sum[kStatsLanes] = {};
    double s1[kStatsLanes] = {}, s2[kStatsLanes] = {};
    int64_t j = 0;
    for (; j + kStatsLanes <= len; j += kStatsLanes) {
      for (int l = 0; l < kStatsLanes; ++l) {
        const double v = widen(p[j + l]);
        const double a = std::fabs(v);
        const double d = v - c;
        amax[l] = a > amax[l] ? a : amax[l];
        asum[l] += a;
        sum[l] += v;
        s1[l] += d;
        s2[l] += d * d;
      }
    }
    for (; j < len; ++j) {
      const double v = widen(p[j]);
      const double a = std::fabs(v);
      const double d = v - c;
      amax[0] = a > amax[0] ? a : amax[0];
      asum[0] += a;
      sum[0] += v;
      s1[0] += d;
      s2[0] += d * d;
    }
    double b_amax = 0.0, b_asum = 0.0, b_sum = 0.0, b_s1 = 0.0, b_s2 = 0.0;
    for (int l = 0; l < kStatsLanes; ++l) {
      b_amax = amax[l] > b_amax ? amax[l] : b_amax;
      b_asum += asum[l];
      b_sum += sum[l];
      b_s1 += s1[l];
      b_s2 += s2[l];
    }
    const double b_count = static_cast<double>(len);
    const double b_mean = c + b_s1 / b_count;
    const double b_m2 = std::max(b_s2 - b_s1 * (b_s1 / b_count), 0.0);

    // Chan et al.: merge (count, mean, m2) with the block's.
    const double merged = count + b_count;
    const double delta = b_mean - mean;
    mean += delta * (b_count / merged);
    m2 += b_m2 + delta * delta * (count * b_count / merged);
    count = merged;

    max_abs = b_amax > max_abs ? b_amax : max_abs;
    l1 += b_asum;
    total += b_sum;
  }
  RowStats s;
  const double kd = static_cast<double>(k);
  s.l1 = static_cast<float>(l1);
  // l1 is NaN exactly when the row holds a NaN (|x| >= 0, and Inf + finite stays Inf); the
  // comparisons above skip NaNs, so restore it here.
  s.max_abs = std::isnan(l1) ? std::numeric_limits<float>::quiet_NaN()
                             : static_cast<float>(max_abs);
  s.mean = static_cast<float>(total / kd);
  s.std = static_cast<float>(std::sqrt(m2 / kd));
  return s;
}

// Statistics of rows [0, n) of a [n, k] matrix whose row i starts at base + i * row_stride (unit
// column stride), in parallel over rows.
template <typename T>
inline void rows_stats(const T* base, int64_t row_stride, int64_t n, int64_t k, float* max_abs,
                       float* l1, float* mean, float* std) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const RowStats s = row_stats(base + i * row_stride, k);
      max_abs[i] = s.max_abs;
      l1[i] = s.l1;
      mean[i] = s.mean;
      std[i] = s.std;
    }
  });
}

// Folded statistics (the BN that follows the filters folded in): each float32 statistic times
// s_i = bn_weight_i / sqrt(running_var_i + eps) in float32 (|s_i| for max_abs, l1, std), as
// reference.filter_stats. One product per filter after the sweep: free next to the sweep.
void fold_bn(const at::Tensor& bn_weight, const at::Tensor& running_var, double eps,
             at::Tensor& max_abs, at::Tensor& l1, at::Tensor& mean, at::Tensor& std) {
  const int64_t n = max_abs.size(0);
  const at::Tensor var = running_var.to(at::kFloat).contiguous();
  const at::Tensor gamma =
      bn_weight.defined() ? bn_weight.to(at::kFloat).contiguous() : at::Tensor();
  const float* v = var.const_data_ptr<float>();
  const float* g = gamma.defined() ? gamma.const_data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  float* p_max = max_abs.mutable_data_ptr<float>();
  float* p_l1 = l1.mutable_data_ptr<float>();
  float* p_mean = mean.mutable_data_ptr<float>();
  float* p_std = std.mutable_data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    const float gamma = g != nullptr ? g[i] : 1.0f;
    const float s = std::isfinite(gamma) && std::isfinite(v[i])
                        ? gamma / std::sqrt(v[i] + e)
                        : std::numeric_limits<float>::quiet_NaN();  // as reference.folded_scale
    const float a = std::fabs(s);
    p_max[i] *= a;
    p_l1[i] *= a;
    p_mean[i] *= s;
    p_std[i] *= a;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_stats_cpu(
    const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& running_var, double eps) {
  TORCH_CHECK(weight.dim() >= 1, "craft_ext::filter_stats: weight must have a filter dim 0");
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()),
              "craft_ext::filter_stats: weight must be floating point, got ",
              weight.scalar_type());
  const int64_t n = weight.size(0);
  const int64_t k = n == 0 ? 0 : weight.numel() / n;
  const bool folded = running_var.has_value() && running_var->defined();
  const bool has_gamma = bn_weight.has_value() && bn_weight->defined();
  TORCH_CHECK(folded || !has_gamma,
              "craft_ext::filter_stats: bn_weight needs running_var (folded statistics)");
  for (const auto* t : {&bn_weight, &running_var}) {
    if (!t->has_value() || !(*t)->defined()) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == n && (*t)->device() == weight.device() &&
                    at::isFloatingType((*t)->scalar_type()),
                "craft_ext::filter_stats: bn_weight and running_var must be float [", n,
                "] tensors on ", weight.device(), ", got ", (*t)->scalar_type(), " of shape ",
                (*t)->sizes());
  }
  const auto opts = weight.options().dtype(at::kFloat);
  at::Tensor max_abs = at::empty({n}, opts);
  at::Tensor l1 = at::empty({n}, opts);
  at::Tensor mean = at::empty({n}, opts);
  at::Tensor std = at::empty({n}, opts);
  if (n == 0) return {max_abs, l1, mean, std};
  TORCH_CHECK(k > 0, "craft_ext::filter_stats: filters must hold at least one element");

  const at::Tensor rows = filter_rows(weight).rows;
  const int64_t row_stride = n > 1 ? rows.stride(0) : k;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "craft_ext::filter_stats", [&] {
        rows_stats(rows.const_data_ptr<scalar_t>(), row_stride, n, k,
                        max_abs.mutable_data_ptr<float>(), l1.mutable_data_ptr<float>(),
                        mean.mutable_data_ptr<float>(), std.mutable_data_ptr<float>());
      });
  if (folded) {
    fold_bn(has_gamma ? *bn_weight : at::Tensor(), *running_var, eps, max_abs, l1, mean, std);
  }
  return {max_abs, l1, mean, std};
}

}  // namespace

TORCH_LIBRARY_IMPL(craft_ext, CPU, m) { m.impl("filter_stats", &filter_stats_cpu); }

}  // namespace craft_ext
