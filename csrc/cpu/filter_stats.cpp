// CPU kernel of craft_ext::filter_stats (schema in csrc/ops.cpp, semantics in
// craft_ext/reference.py::filter_stats).
//
// For weight [N, ...] viewed as N filters x_i of K elements, returns float32 [N] tensors
//   max_abs[i] = max_k |x_ik|,  l1[i] = sum_k |x_ik|,  mean[i] = sum_k x_ik / K,
//   std[i] = sqrt(sum_k (x_ik - mean[i])^2 / K)
// (CRAFT, Bhatta et al., arXiv 2312.00072: max_abs finds inactive filters, l1 ranks donors).
// One fused sweep per filter (row_stats.h), parallel over filters; float32, float64, float16
// and bfloat16 inputs; any memory layout: filters that are dense blocks (contiguous,
// channels_last, transposed kernels, slices along dim 0 or 1) are read in place, others from a
// contiguous copy.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "cpu/row_stats.h"

namespace craft_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_stats_cpu(
    const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() >= 1, "craft_ext::filter_stats: weight must have a filter dim 0");
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()),
              "craft_ext::filter_stats: weight must be floating point, got ",
              weight.scalar_type());
  const int64_t n = weight.size(0);
  const int64_t k = n == 0 ? 0 : weight.numel() / n;
  const auto opts = weight.options().dtype(at::kFloat);
  at::Tensor max_abs = at::empty({n}, opts);
  at::Tensor l1 = at::empty({n}, opts);
  at::Tensor mean = at::empty({n}, opts);
  at::Tensor std = at::empty({n}, opts);
  if (n == 0) return {max_abs, l1, mean, std};
  TORCH_CHECK(k > 0, "craft_ext::filter_stats: filters must hold at least one element");

  at::Tensor rows = filter_rows_view(weight);
  if (!rows.defined()) rows = weight.reshape({n, k}).contiguous();
  const int64_t row_stride = n > 1 ? rows.stride(0) : k;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "craft_ext::filter_stats", [&] {
        cpu::rows_stats(rows.const_data_ptr<scalar_t>(), row_stride, n, k,
                        max_abs.mutable_data_ptr<float>(), l1.mutable_data_ptr<float>(),
                        mean.mutable_data_ptr<float>(), std.mutable_data_ptr<float>());
      });
  return {max_abs, l1, mean, std};
}

}  // namespace

TORCH_LIBRARY_IMPL(craft_ext, CPU, m) { m.impl("filter_stats", &filter_stats_cpu); }

}  // namespace craft_ext
