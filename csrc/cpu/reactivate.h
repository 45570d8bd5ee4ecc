// The CPU kernel of craft_ext::reactivate_ (csrc/cpu/reactivate.cpp), for other CPU kernels
// that call it directly rather than through the dispatcher (reactivate_and_reset.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/util/FunctionRef.h>

#include <optional>
#include <tuple>
#include <utility>

namespace craft_ext {

// The kernel of the op: order_key, fallback_u float [N] (any floating dtype, converted).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reactivate_cpu(
    const at::Tensor& weight, const at::Tensor& used, const at::Tensor& order_key,
    const at::Tensor& fallback_u, const std::optional<at::Tensor>& noise, double threshold,
    c10::string_view method_name);

// (order_key, fallback_u) as float32 [N] host pointers, valid until the kernel returns; asked
// for only when the CRAFT pairing runs (some filter is inactive).
using KeySource = c10::function_ref<std::pair<const float*, const float*>()>;

// The same kernel with the random keys supplied by `keys`.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reactivate_cpu_keys(
    const at::Tensor& weight, const at::Tensor& used, KeySource keys,
    const std::optional<at::Tensor>& noise, double threshold, c10::string_view method_name);

// Fresh (inactive bool [n], reactivated bool [n], donor int64 [n], count int64 []) outputs,
// filled by fill(inactive, reactivated, donor) -> count (host pointers). Allocated with
// at::detail::empty_cpu: no dispatcher round trip.
template <typename Fill>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> make_outputs(int64_t n, Fill&& fill) {
  at::Tensor inactive = at::detail::empty_cpu({n}, at::kBool);
  at::Tensor reactivated = at::detail::empty_cpu({n}, at::kBool);
  at::Tensor donor = at::detail::empty_cpu({n}, at::kLong);
  at::Tensor count = at::detail::empty_cpu({}, at::kLong);
  *count.mutable_data_ptr<int64_t>() =
      fill(inactive.mutable_data_ptr<bool>(), reactivated.mutable_data_ptr<bool>(),
           donor.mutable_data_ptr<int64_t>());
  return {inactive, reactivated, donor, count};
}

// The same kernel writing its outputs to host arrays of N elements (inactive may be null);
// returns the count. Allocates nothing when no filter is inactive.
int64_t reactivate_cpu_into(const at::Tensor& weight, const at::Tensor& used, KeySource keys,
                            const std::optional<at::Tensor>& noise, double threshold,
                            c10::string_view method_name, bool* inactive, bool* reactivated,
                            int64_t* donor);

}  // namespace craft_ext
