// The CPU kernel of craft_ext::reactivate_ (csrc/cpu/reactivate.cpp), for other CPU kernels
// that call it directly rather than through the dispatcher (reactivate_and_reset.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace craft_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reactivate_cpu(
    const at::Tensor& weight, const at::Tensor& used, const at::Tensor& order_key,
    const at::Tensor& fallback_u, const std::optional<at::Tensor>& noise, double threshold,
    c10::string_view method_name);

}  // namespace craft_ext
