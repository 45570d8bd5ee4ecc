// The CPU kernel of craft_ext::reactivate_ (csrc/cpu/reactivate.cpp), for other CPU kernels
// that call it directly rather than through the dispatcher (reactivate_and_reset.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <optional>
#include <tuple>
#include <utility>

#include "common.h"

namespace craft_ext {

// The argument checks shared by the CPU kernels of reactivate_ and reactivate_and_reset_
// (`op` names the operator in messages); returns the parsed method. They come before any
// draw or write, so a rejected call changes nothing.
Method check_reactivate_args(const at::Tensor& weight, const at::Tensor& used,
                             c10::string_view method, const char* op);

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

// The reactivate_ kernel on checked arguments (check_reactivate_args), writing its outputs to
// host arrays of N elements (inactive may be null) and returning the count. order_key and
// fallback_u are float32 [N] host arrays (read only when some filter is inactive); noise is
// required unless method is craft; `channel` (checked with check_channel) holds the entries
// rewritten with the filters and the folded-detection switch. Allocates nothing when no filter
// is inactive (and N <= 512).
int64_t reactivate_cpu_into(const at::Tensor& weight, const at::Tensor& used,
                            const float* order_key, const float* fallback_u,
                            const std::optional<at::Tensor>& noise, double threshold,
                            Method method, const Channel& channel, bool* inactive,
                            bool* reactivated, int64_t* donor);

}  // namespace craft_ext
