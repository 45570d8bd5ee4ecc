// CPU kernels of craft_ext::reactivate_and_reset_ and its overload .record (schemas in
// csrc/ops.cpp, semantics in craft_ext/reference.py::reactivate_and_reset_ and
// reactivate_and_record_).
//
// One reactivation of one watched weight as craft_ext.Reactivator runs it after an optimizer
// step (CRAFT, Bhatta et al., arXiv 2312.00072), in a single call from Python:
//   order_key, fallback_u = rand(N), rand(N)          (float32, from `generator`)
//   noise = randn(weight.shape)                        (float32; scaled_gaussian / random only)
//   (inactive, reactivated, donor, count) = reactivate_(weight, used, order_key, fallback_u,
//                                                       noise, ...)   (reactivate.cpp)
//   channel entries of reactivated filters rewritten (BN-aware; reactivate.cpp)
//   buf[i, ...] = 0 for every reactivated i, for every buf in `state` shaped like weight or [N]
//   total += count
// The draws are the same values, from the same generator calls in the same order, as the Python
// composition (craft_ext/reference.py::reactivation_inputs), so both consume the generator
// identically and give bit-identical results; the uniform ones are drawn straight from the CPU
// generator without a tensor (see draw_keys).
// With interval=1 this runs after every optimizer step, usually on a first conv layer of a few
// dozen filters, where a Python composition of ~8 small ATen calls costs several times the
// work itself. Everything here is host memory, so branching on the count is not a device sync.
//
// The overload .record is the same reactivation writing (reactivated, donor) into row `slot`
// of the caller's event logs [R, N] instead of returning fresh tensors: the
// Reactivator's per-step hook, which then creates no Python object and, for craft on up to 512
// filters with no filter inactive (the usual case after the first steps), allocates nothing.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/DistributionsHelper.h>
#include <torch/library.h>

#include <c10/util/SmallVector.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>

#include "common.h"
#include "reactivate.h"

namespace craft_ext {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Every argument check that does not need the draws, before anything is drawn or written
// (a rejected call leaves the generator, the weight and the logs as they were).
// check_reactivate_args plus total; returns the parsed method.
Method check_arguments(const at::Tensor& weight, const at::Tensor& used, const at::Tensor& total,
                       c10::string_view method, const char* op) {
  const Method parsed = check_reactivate_args(weight, used, method, op);
  TORCH_CHECK(total.scalar_type() == at::kLong && total.numel() == 1 && total.device() == weight.device(),
              op, ": total must be an int64 scalar on ", weight.device(), ", got ",
              total.scalar_type(), " of shape ", total.sizes(), " on ", total.device());
  return parsed;
}

// torch.rand(2, n, generator=generator) into keys[0 .. 2n): the CPU uniform_ kernel's own draw
// (ATen's uniform_real_distribution<float> on the generator, under its mutex, element by element,
// a value rounded up to 1 mapped to 0), without creating a tensor. tests/test_reactivate_and_reset.py
// checks the generator state after it against torch.rand(2, N), and the values through the
// CRAFT pairings they order (against the reference, which draws with torch.rand).
void draw_keys(const std::optional<at::Generator>& generator, float* keys, int64_t count) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  at::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int64_t i = 0; i < count; ++i) {
    const float v = static_cast<float>(uniform(gen));
    keys[i] = v == 1.0f ? 0.0f : v;
  }
}

// The draws, reactivate_ and the state reset; outputs to host arrays of N (inactive may be
// null). Returns the count.
int64_t reactivate_reset_into(const at::Tensor& weight, const at::Tensor& used,
                              const at::Tensor& total, at::TensorList state,
                              const std::optional<at::Generator>& generator, double threshold,
                              Method method, const Channel& ch, bool* inactive,
                              bool* reactivated, int64_t* donor) {
  const int64_t n = weight.size(0);
  // rand(2, N) is rand(N) twice (order_key, then fallback_u); on the stack up to N = 512
  c10::SmallVector<float, 1024> keys(2 * n);
  draw_keys(generator, keys.data(), 2 * n);
  std::optional<at::Tensor> noise;
  if (method != Method::kCraft) {
    noise = at::randn(weight.sizes(), generator, weight.options().dtype(at::kFloat));
  }
  const int64_t count = reactivate_cpu_into(weight, used, keys.data(), keys.data() + n, noise,
                                            threshold, method, ch, inactive, reactivated, donor);
  if (count > 0) {
    // The rows to clear as an index list (index_fill_ touches only those rows; a broadcast
    // masked_fill_ walks the whole tensor, ~16 ms for an r50 [512, 512, 3, 3] buffer on CPU).
    at::Tensor rows = at::detail::empty_cpu({count}, at::kLong);
    int64_t* row = rows.mutable_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (reactivated[i]) *row++ = i;
    }
    for (const at::Tensor& buf : state) {
      // the weight's state, and the [N] state of the channel entries (gamma, beta, slope...)
      const bool rows_of_weight = buf.sizes() == weight.sizes();
      const bool rows_of_channel = buf.dim() == 1 && buf.size(0) == n;
      if (buf.defined() && (rows_of_weight || rows_of_channel) &&
          buf.device() == weight.device()) {
        // const Tensor& still writes the shared storage: the list is declared mutable (d!);
        // filling (not multiplying by 0) also clears NaN / Inf
        const_cast<at::Tensor&>(buf).index_fill_(0, rows, 0);
      }
    }
    const_cast<at::Tensor&>(total).add_(count);
  }
  return count;
}

Outputs reactivate_and_reset_cpu(const at::Tensor& weight, const at::Tensor& used,
                                 const at::Tensor& total, at::TensorList state,
                                 std::optional<at::Generator> generator, double threshold,
                                 c10::string_view method, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& bn_weight,
                                 const std::optional<at::Tensor>& bn_bias,
                                 const std::optional<at::Tensor>& running_mean,
                                 const std::optional<at::Tensor>& running_var,
                                 const std::optional<at::Tensor>& prelu, double eps, bool folded) {
  constexpr const char* op = "craft_ext::reactivate_and_reset_";
  const Method parsed = check_arguments(weight, used, total, method, op);
  const Channel ch =
      make_channel(bias, bn_weight, bn_bias, running_mean, running_var, prelu, eps, folded);
  check_channel(ch, weight, op);
  return make_outputs(weight.size(0), [&](bool* inactive, bool* reactivated, int64_t* donor) {
    return reactivate_reset_into(weight, used, total, state, generator, threshold, parsed, ch,
                                 inactive, reactivated, donor);
  });
}

void reactivate_and_record_cpu(const at::Tensor& weight, const at::Tensor& used,
                               const at::Tensor& total, at::TensorList state,
                               const at::Tensor& reactivated_log, const at::Tensor& donor_log,
                               int64_t slot, std::optional<at::Generator> generator,
                               double threshold, c10::string_view method,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& bn_weight,
                               const std::optional<at::Tensor>& bn_bias,
                               const std::optional<at::Tensor>& running_mean,
                               const std::optional<at::Tensor>& running_var,
                               const std::optional<at::Tensor>& prelu, double eps, bool folded) {
  constexpr const char* op = "craft_ext::reactivate_and_reset_.record";
  const Method parsed = check_arguments(weight, used, total, method, op);
  const Channel ch =
      make_channel(bias, bn_weight, bn_bias, running_mean, running_var, prelu, eps, folded);
  check_channel(ch, weight, op);
  const int64_t n = weight.size(0);
  TORCH_CHECK(reactivated_log.scalar_type() == at::kBool && reactivated_log.dim() == 2 &&
                  reactivated_log.size(1) == n && reactivated_log.is_contiguous() &&
                  reactivated_log.device() == weight.device(),
              op, ": reactivated_log must be a contiguous bool [R, ", n, "] tensor on ",
              weight.device(), ", got ", reactivated_log.scalar_type(), " of shape ",
              reactivated_log.sizes(), " on ", reactivated_log.device(),
              reactivated_log.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(donor_log.scalar_type() == at::kLong && donor_log.dim() == 2 &&
                  donor_log.size(0) == reactivated_log.size(0) && donor_log.size(1) == n &&
                  donor_log.is_contiguous() && donor_log.device() == weight.device(),
              op, ": donor_log must be a contiguous int64 tensor shaped like reactivated_log (",
              reactivated_log.sizes(), ") on ", weight.device(), ", got ",
              donor_log.scalar_type(), " of shape ", donor_log.sizes(), " on ", donor_log.device(),
              donor_log.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(slot >= 0 && slot < reactivated_log.size(0), op, ": slot must be in [0, ",
              reactivated_log.size(0), "), got ", slot);
  reactivate_reset_into(weight, used, total, state, generator, threshold, parsed, ch, nullptr,
                        reactivated_log.mutable_data_ptr<bool>() + slot * n,
                        donor_log.mutable_data_ptr<int64_t>() + slot * n);
}

}  // namespace

TORCH_LIBRARY_IMPL(craft_ext, CPU, m) {
  m.impl("reactivate_and_reset_", &reactivate_and_reset_cpu);
  m.impl("reactivate_and_reset_.record", &reactivate_and_record_cpu);
}

}  // namespace craft_ext
