// CUDA kernel of craft_ext::reactivate_ (schema in csrc/ops.cpp, semantics in
// craft_ext/reference.py.reactivate_): in-place reactivation of the inactive filters of
// weight [N, ...] (Bhatta et al., arXiv 2312.00072, sec. 4.3).
//
//   1. statistics with the reference's own ATen ops on its float32 rows
//      x = weight.reshape(N, K).to(float32): max_abs and l1 from |x| (amax, sum over dim 1);
//      mean and std from at::std_mean(x, 1, correction 0), for scaled_gaussian only;
//      inactive = max_abs <= float32(threshold), active = !inactive & isfinite(l1);
//   2. pairing on the device with ATen ops, step for step as reference.craft_donors
//      (stable sorts, scatters; no host synchronisation): pairing.h;
//   3. write_reactivated_kernel rewrites the reactivated rows in place (craft: negative of the
//      donor row; scaled_gaussian: mean[s] + std[s] * noise; random: noise * sqrt(2 / K)) and
//      `used` |= the donors spent by this call;
//   4. the channel entries given (conv bias, BN weight / bias / running stats, PReLU slope) of
//      the reactivated filters, rewritten by pairing.h's rewrite_channel (ATen, [N] vectors).
// With `folded`, max_abs and l1 are multiplied by |bn_weight / sqrt(running_var + eps)| before
// the pairing: the filters as the BatchNorm after them applies them.
//
// The statistics are the reference's, bit for bit (same ops, same device, same element order
// and layout), as in the CPU kernel (csrc/cpu/reactivate.cpp): the L1 norms rank donors and
// pick the scaled_gaussian source, and filters whose norms differ only in the last bit would
// pair differently under any other summation (e.g. the filter_stats kernel's double
// accumulators); mean[s] and std[s] make the scaled_gaussian rows.
//
// Everything is queued on the current stream; nothing is read back to the host, so the op runs
// under torch.cuda.set_sync_debug_mode("error") and inside CUDA-graph capture.

#include <cmath>
#include <optional>
#include <tuple>

#include "cuda_glue.cuh"
#include "pairing.h"
#include "reactivate_kernels.cuh"

namespace craft_ext {
namespace cuda {
namespace {

// reactivate_cuda passes its Method to the kernel launcher as a ReactivateMethod.
static_assert(static_cast<int>(ReactivateMethod::kCraft) == static_cast<int>(Method::kCraft) &&
                  static_cast<int>(ReactivateMethod::kScaledGaussian) ==
                      static_cast<int>(Method::kScaledGaussian) &&
                  static_cast<int>(ReactivateMethod::kRandom) == static_cast<int>(Method::kRandom),
              "ReactivateMethod (reactivate_kernels.cuh) must match Method (common.h)");

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reactivate_cuda(
    at::Tensor& weight, at::Tensor& used, const at::Tensor& order_key,
    const at::Tensor& fallback_u, const std::optional<at::Tensor>& noise, double threshold,
    c10::string_view method_name, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& prelu, double eps, bool folded) {
  check_weight(weight, "reactivate_");
  const Method method = parse_method(method_name);
  const Channel ch =
      make_channel(bias, bn_weight, bn_bias, running_mean, running_var, prelu, eps, folded);
  check_channel(ch, weight, "craft_ext::reactivate_");
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

  // 1. statistics: the reference's float32 rows and reductions (see the file comment)
  const int64_t k = weight.numel() / n;
  const at::Tensor logical = weight.reshape({n, k});  // reference._rows: a view, or a copy
  const at::Tensor x32 = logical.to(at::kFloat);
  const at::Tensor abs32 = x32.abs();
  at::Tensor max_abs = abs32.amax(1);
  at::Tensor l1 = abs32.sum(1);
  if (ch.folded) {  // detect and rank the filters folded with their BatchNorm
    const at::Tensor a = folded_abs_scale(ch);
    max_abs = max_abs * a;
    l1 = l1 * a;
  }
  at::Tensor mean, stdv;  // float32 [N], scaled_gaussian only (read at the source row)
  if (method == Method::kScaledGaussian) {
    std::tie(stdv, mean) =
        at::std_mean(x32, at::IntArrayRef{1}, /*correction=*/at::Scalar(0), /*keepdim=*/false);
    mean = mean.contiguous();
    stdv = stdv.contiguous();
  }
  // Rows the write kernel updates: a view of weight, or (filters that are not dense blocks)
  // `logical` in contiguous form, copied back at the end.
  const FilterRows fr = filter_rows(weight, logical);
  const at::Tensor& rows = fr.rows;

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
    z = fr.is_view ? rows_like(*noise, weight) : noise->reshape({n, k});
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
            mean.defined() ? mean.data_ptr<float>() : nullptr,
            stdv.defined() ? stdv.data_ptr<float>() : nullptr, scale,
            static_cast<ReactivateMethod>(static_cast<int>(method)), stream);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  if (!fr.is_view) weight.copy_(rows.view(weight.sizes()));
  if (ch.any()) rewrite_channel(ch, method, reactivated, donor);

  return {p.inactive, reactivated, donor, reactivated.sum()};
}

}  // namespace
}  // namespace cuda
}  // namespace craft_ext

TORCH_LIBRARY_IMPL(CRAFT_EXT_OPS_LIBRARY, CRAFT_EXT_OPS_KEY, m) {  // craft_ext, CUDA
  m.impl("reactivate_", &craft_ext::cuda::reactivate_cuda);
}
