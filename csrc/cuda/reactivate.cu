// CUDA kernel of craft_ext::reactivate_ (schema in csrc/ops.cpp, semantics in
// craft_ext/reference.py.reactivate_): in-place reactivation of the inactive filters of
// weight [N, ...] (Bhatta et al., arXiv 2312.00072, sec. 4.3).
//
//   1. statistics: filter_stats kernel -> max_abs, mean, std per filter;
//      inactive = max_abs <= float32(threshold), active = !inactive & isfinite(l1);
//   2. pairing on the device with ATen ops, step for step as reference.craft_donors
//      (stable sorts, scatters; no host synchronisation): pairing.h;
//   3. write_reactivated_kernel rewrites the reactivated rows in place (craft: negative of the
//      donor row; scaled_gaussian: mean[s] + std[s] * noise; random: noise * sqrt(2 / K)) and
//      `used` |= the donors spent by this call.
//
// The L1 norms that rank donors (and pick the scaled_gaussian source) are summed with the same
// ATen reduction as the reference (float32, logical element order), so the pairing is
// identical to the reference's on the same device even for filters whose norms differ only in
// the last bit; the kernel's double-accumulated l1 could break such near-ties differently.
//
// Everything is queued on the current stream; nothing is read back to the host, so the op runs
// under torch.cuda.set_sync_debug_mode("error") and inside CUDA-graph capture.

#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "cuda_glue.cuh"
#include "pairing.h"
#include "reactivate_kernels.cuh"

namespace craft_ext {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reactivate_cuda(
    at::Tensor& weight, at::Tensor& used, const at::Tensor& order_key,
    const at::Tensor& fallback_u, const std::optional<at::Tensor>& noise, double threshold,
    c10::string_view method_name) {
  check_weight(weight, "reactivate_");
  const Method method = parse_method(std::string(method_name));
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t n = weight.size(0);
  TORCH_CHECK(used.scalar_type() == at::kBool && used.dim() == 1 && used.size(0) == n &&
                  used.device() == weight.device(),
              "craft_ext::reactivate_: used must be a bool [N] tensor on the weight's device");
  TORCH_CHECK(order_key.numel() == n && fallback_u.numel() == n &&
                  order_key.device() == weight.device() &&
                  fallback_u.device() == weight.device(),
              "craft_ext::reactivate_: order_key and fallback_u must be [N] on the weight's "
              "device");
  TORCH_CHECK(method == Method::kCraft ||
                  (noise.has_value() && noise->sizes() == weight.sizes() &&
                   noise->device() == weight.device()),
              "craft_ext::reactivate_: scaled_gaussian and random need noise shaped like weight "
              "on its device");

  const auto opts = weight.options();
  if (n == 0) {
    const at::Tensor none = at::empty({0}, opts.dtype(at::kBool));
    return {none, none.clone(), at::empty({0}, opts.dtype(at::kLong)),
            at::zeros({}, opts.dtype(at::kLong))};
  }

  // 1. statistics
  WeightRows wr = weight_rows(weight);
  at::Tensor& rows = wr.rows;
  const int64_t k = rows.size(1);
  const auto fopts = opts.dtype(at::kFloat);
  at::Tensor max_abs = at::empty({n}, fopts);
  at::Tensor l1_kernel = at::empty({n}, fopts);
  at::Tensor mean = at::empty({n}, fopts);
  at::Tensor stdv = at::empty({n}, fopts);
  filter_stats_rows(rows, max_abs, l1_kernel, mean, stdv);
  // Donor ranking key: the reference's float32 L1 norms, bit for bit (see the file comment),
  // summed over contiguous logical-order rows.
  const at::Tensor l1 = weight.reshape({n, k}).to(at::kFloat).contiguous().abs().sum(1);

  // 2. pairing (ATen ops on the current stream)
  const Pairing p = pair_filters(method, max_abs, l1, threshold, used, order_key.view({n}),
                                 fallback_u.view({n}));
  const at::Tensor& reactivated = p.reactivated;
  const at::Tensor& donor = p.donor;
  const float scale =
      method == Method::kRandom ? static_cast<float>(std::sqrt(2.0 / static_cast<double>(k)))
                                : 0.0f;

  // 3. rewrite the reactivated rows in place
  at::Tensor z;  // float32 [N, K], contiguous, in the element order of `rows`
  if (method != Method::kCraft) {
    z = wr.is_view ? rows_like(*noise, weight) : noise->reshape({n, k});
    z = z.to(at::kFloat).contiguous();
  }
  const int64_t row_stride = n > 1 ? rows.stride(0) : k;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool* reactivated_ptr = reactivated.data_ptr<bool>();
  const int64_t* donor_ptr = donor.data_ptr<int64_t>();
  const float* noise_ptr = z.defined() ? z.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, rows.scalar_type(), "reactivate_cuda", [&] {
        launch_write_reactivated(
            device_ptr<scalar_t>(rows), n, k, row_stride, reactivated_ptr, donor_ptr, noise_ptr,
            mean.data_ptr<float>(), stdv.data_ptr<float>(), scale,
            static_cast<ReactivateMethod>(static_cast<int>(method)), stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  if (!wr.is_view) weight.copy_(rows.view(weight.sizes()));

  return {p.inactive, reactivated, donor, reactivated.sum()};
}

}  // namespace
}  // namespace cuda
}  // namespace craft_ext

TORCH_LIBRARY_IMPL(CRAFT_EXT_OPS_LIBRARY, CRAFT_EXT_OPS_KEY, m) {  // craft_ext, CUDA
  m.impl("reactivate_", &craft_ext::cuda::reactivate_cuda);
}
