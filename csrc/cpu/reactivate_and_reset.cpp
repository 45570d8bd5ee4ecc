// CPU kernel of craft_ext::reactivate_and_reset_ (schema in csrc/ops.cpp, semantics in
// craft_ext/reference.py::reactivate_and_reset_).
//
// One reactivation of one watched weight as craft_ext.Reactivator runs it after an optimizer
// step (CRAFT, Bhatta et al., arXiv 2312.00072), in a single call from Python:
//   order_key, fallback_u = rand(N), rand(N)          (float32, from `generator`; one rand(2, N))
//   noise = randn(weight.shape)                        (float32; scaled_gaussian / random only)
//   (inactive, reactivated, donor, count) = reactivate_(weight, used, order_key, fallback_u,
//                                                       noise, ...)   (reactivate.cpp)
//   buf[i, ...] = 0 for every reactivated i, for every buf in `state` shaped like weight
//   total += count
// The draws are the same ATen calls, in the same order, as the Python composition in
// craft_ext/ops.py, so both consume the generator identically and give bit-identical results.
// With interval=1 this runs after every optimizer step, usually on a first conv layer of a few
// dozen filters, where a Python composition of ~8 small ATen calls costs several times the
// work itself. Everything here is host memory, so branching on the count is not a device sync.

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "reactivate.h"

namespace craft_ext {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs reactivate_and_reset_cpu(const at::Tensor& weight, const at::Tensor& used,
                                 const at::Tensor& total, at::TensorList state,
                                 std::optional<at::Generator> generator, double threshold,
                                 c10::string_view method) {
  TORCH_CHECK(weight.dim() >= 1, "craft_ext::reactivate_and_reset_: weight needs a filter dim 0");
  TORCH_CHECK(total.scalar_type() == at::kLong && total.numel() == 1 && total.device() == weight.device(),
              "craft_ext::reactivate_and_reset_: total must be an int64 scalar on ", weight.device(),
              ", got ", total.scalar_type(), " of shape ", total.sizes(), " on ", total.device());
  const int64_t n = weight.size(0);
  TORCH_CHECK(used.scalar_type() == at::kBool && used.dim() == 1 && used.size(0) == n &&
                  used.device() == weight.device(),
              "craft_ext::reactivate_and_reset_: used must be a bool tensor of shape (", n,
              ",) on ", weight.device(), ", got ", used.scalar_type(), " of shape ", used.sizes(),
              " on ", used.device());
  const auto f32 = weight.options().dtype(at::kFloat);
  // rand(2, N) is rand(N) twice: the CPU generator fills a tensor element by element, in order
  // (tests/test_reactivate_and_reset.py checks the values and the generator state afterwards)
  // (at::rand is exactly empty + uniform_(0, 1, generator); empty_cpu skips one dispatch)
  at::Tensor keys = at::detail::empty_cpu({2, n}, at::kFloat);
  keys.uniform_(0.0, 1.0, generator);
  const float* key_p = keys.const_data_ptr<float>();
  std::optional<at::Tensor> noise;
  if (method != "craft") noise = at::randn(weight.sizes(), generator, f32);

  const auto key_source = [&]() -> std::pair<const float*, const float*> {
    return {key_p, key_p + n};
  };
  Outputs out = reactivate_cpu_keys(weight, used, key_source, noise, threshold, method);

  const int64_t count = *std::get<3>(out).const_data_ptr<int64_t>();  // host memory, no sync
  if (count > 0) {
    // The rows to clear as an index list (index_fill_ touches only those rows; a broadcast
    // masked_fill_ walks the whole tensor, ~16 ms for an r50 [512, 512, 3, 3] buffer on CPU).
    at::Tensor rows = at::detail::empty_cpu({count}, at::kLong);
    int64_t* row = rows.mutable_data_ptr<int64_t>();
    const bool* reactivated = std::get<1>(out).const_data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i) {
      if (reactivated[i]) *row++ = i;
    }
    for (const at::Tensor& buf : state) {
      if (buf.defined() && buf.sizes() == weight.sizes() && buf.device() == weight.device()) {
        // const Tensor& still writes the shared storage: the list is declared mutable (d!);
        // filling (not multiplying by 0) also clears NaN / Inf
        const_cast<at::Tensor&>(buf).index_fill_(0, rows, 0);
      }
    }
    const_cast<at::Tensor&>(total).add_(count);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(craft_ext, CPU, m) {
  m.impl("reactivate_and_reset_", &reactivate_and_reset_cpu);
}

}  // namespace craft_ext
