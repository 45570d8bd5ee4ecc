// CUDA kernel of craft_ext::filter_stats (schema in csrc/ops.cpp, semantics in
// craft_ext/reference.py.filter_stats): per-filter max |w|, sum |w|, mean and population std of
// weight [N, ...] seen as [N, K], each float32 [N]. Used by CRAFT (Bhatta et al., arXiv
// 2312.00072) to find inactive filters and rank donors.
//
// One warp (K <= 1024) or one 256-thread block per filter, 16-byte vector loads where aligned,
// double accumulators reduced by warp shuffles and shared memory (filter_stats_kernels.cuh).
// Any layout: the kernel reads the filter_rows_view of the weight (channels_last, row slices,
// transposed inner dims need no copy); filters that are not dense blocks are copied first.
// With running_var (and bn_weight), the statistics of the filters folded with the BatchNorm that
// follows them, fused into the kernel's epilogue (still one pass over the weight).
// Runs on the current stream without host synchronisation.

#include <optional>

#include "cuda_glue.cuh"
#include "filter_stats_kernels.cuh"

namespace craft_ext {
namespace cuda {
namespace {

// Runs filter_stats_kernel on `rows` (from filter_rows) into four float32 [N] tensors.
void filter_stats_rows(const at::Tensor& rows, at::Tensor& max_abs, at::Tensor& l1,
                       at::Tensor& mean, at::Tensor& stdv, const at::Tensor& gamma,
                       const at::Tensor& var, double eps) {
  const int64_t n = rows.size(0);
  const int64_t k = rows.size(1);
  TORCH_INTERNAL_ASSERT(rows.dim() == 2 && (k <= 1 || rows.stride(1) == 1));
  const int64_t row_stride = n > 1 ? rows.stride(0) : k;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, rows.scalar_type(), "filter_stats_cuda",
      [&] {
        launch_filter_stats(
            device_ptr<scalar_t>(rows), n, k, row_stride, max_abs.data_ptr<float>(),
            l1.data_ptr<float>(), mean.data_ptr<float>(), stdv.data_ptr<float>(), stream,
            gamma.defined() ? gamma.data_ptr<float>() : nullptr,
            var.defined() ? var.data_ptr<float>() : nullptr, static_cast<float>(eps));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> filter_stats_cuda(
    const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& running_var, double eps) {
  check_weight(weight, "filter_stats");
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t n = weight.size(0);
  const bool folded = running_var.has_value() && running_var->defined();
  const bool has_gamma = bn_weight.has_value() && bn_weight->defined();
  TORCH_CHECK(folded || !has_gamma,
              "craft_ext::filter_stats: bn_weight needs running_var (folded statistics)");
  at::Tensor gamma, var;  // float32 [N], contiguous (no copy for the usual float32 BN)
  if (folded) {
    for (const auto* t : {&bn_weight, &running_var}) {
      if (!t->has_value() || !(*t)->defined()) continue;
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == n &&
                      (*t)->device() == weight.device() && at::isFloatingType((*t)->scalar_type()),
                  "craft_ext::filter_stats: bn_weight and running_var must be float [", n,
                  "] tensors on ", weight.device(), ", got ", (*t)->scalar_type(), " of shape ",
                  (*t)->sizes());
    }
    var = running_var->to(at::kFloat).contiguous();
    if (has_gamma) gamma = bn_weight->to(at::kFloat).contiguous();
  }
  const auto opts = weight.options().dtype(at::kFloat);
  at::Tensor max_abs = at::empty({n}, opts);
  at::Tensor l1 = at::empty({n}, opts);
  at::Tensor mean = at::empty({n}, opts);
  at::Tensor stdv = at::empty({n}, opts);
  if (n > 0) filter_stats_rows(filter_rows(weight).rows, max_abs, l1, mean, stdv, gamma, var, eps);
  return {max_abs, l1, mean, stdv};
}

}  // namespace

}  // namespace cuda
}  // namespace craft_ext

TORCH_LIBRARY_IMPL(CRAFT_EXT_OPS_LIBRARY, CRAFT_EXT_OPS_KEY, m) {  // craft_ext, CUDA
  m.impl("filter_stats", &craft_ext::cuda::filter_stats_cuda);
}
