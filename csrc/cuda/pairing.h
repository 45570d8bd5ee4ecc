// Filter pairing of craft_ext::reactivate_ with ATen ops only (no kernels of its own, no host
// synchronisation): which filters are inactive, which get reactivated and from which donor,
// exactly as craft_ext/reference.py (reactivate_ and craft_donors; Bhatta et al., arXiv
// 2312.00072, sec. 4.3). Device-agnostic: csrc/cuda/reactivate.cu runs it on the current CUDA
// stream, and the CPU build of the backend in tests/test_cuda_kernels.py (kernels emulated)
// checks it against the reference without a GPU.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "common.h"

namespace craft_ext {
namespace cuda {

// reference.craft_donors with ATen ops: (donor int64 [N], newly_used bool [N]).
inline std::tuple<at::Tensor, at::Tensor> craft_donors(const at::Tensor& inactive,
                                                       const at::Tensor& active,
                                                       const at::Tensor& used,
                                                       const at::Tensor& l1,
                                                       const at::Tensor& order_key,
                                                       const at::Tensor& fallback_u) {
  const int64_t n = inactive.size(0);
  const double inf = std::numeric_limits<double>::infinity();
  const at::Tensor pos = at::arange(n, inactive.options().dtype(at::kLong));

  const at::Tensor cand = active.logical_and(used.logical_not());
  const at::Tensor n_cand = cand.sum();
  const at::Tensor n_inactive = inactive.sum();
  const at::Tensor donor_order =
      std::get<1>(at::sort(at::where(cand, l1.neg(), inf), /*stable=*/true, 0, false));
  const at::Tensor target_order =
      std::get<1>(at::sort(at::where(inactive, order_key, inf), /*stable=*/true, 0, false));

  const at::Tensor slot_paired = pos.lt(n_cand).logical_and(pos.lt(n_inactive));
  const at::Tensor newly_used = at::zeros_like(used).scatter(0, donor_order, slot_paired);

  const at::Tensor spent = active.logical_and(used.logical_or(newly_used));
  const at::Tensor n_spent = spent.sum();
  const at::Tensor spent_list = std::get<1>(
      at::sort(spent.logical_not().to(at::kByte), /*stable=*/true, 0, false));
  at::Tensor r = at::floor(fallback_u * n_spent.to(at::kFloat)).to(at::kLong);
  r = at::minimum(r, (n_spent - 1).clamp_min(0));
  const at::Tensor fallback = spent_list.index_select(0, r);

  const at::Tensor slot_donor = at::where(pos.lt(n_cand), donor_order, -1);
  at::Tensor donor = at::empty_like(pos).scatter(0, target_order, slot_donor);
  donor = at::where(donor.lt(0), fallback, donor);
  donor = at::where(inactive.logical_and(active.any()), donor, -1);
  return {donor, newly_used};
}

// What reactivate_ does to each filter, all [N] on the weight's device.
struct Pairing {
  at::Tensor inactive;     // bool: max_abs <= float32(threshold)
  at::Tensor reactivated;  // bool: rows to rewrite
  at::Tensor donor;        // int64: source filter of each reactivated row, -1 elsewhere
};

// From float32 [N] max_abs and l1 (the reference's L1 norms): inactive, active (not inactive
// and finite l1) and, per method, the rows to rewrite and their donors. craft: donors from
// craft_donors, `used` |= the donors it spends; scaled_gaussian: every reactivated row takes
// the active filter of largest l1 (lowest index on ties); random: every inactive row, no donor.
// craft and scaled_gaussian reactivate nothing without an active filter.
inline Pairing pair_filters(Method method, const at::Tensor& max_abs, const at::Tensor& l1,
                            double threshold, at::Tensor& used, const at::Tensor& order_key,
                            const at::Tensor& fallback_u) {
  const int64_t n = max_abs.size(0);
  Pairing p;
  p.inactive = max_abs.le(static_cast<double>(static_cast<float>(threshold)));
  const at::Tensor active = p.inactive.logical_not().logical_and(at::isfinite(l1));
  const at::Tensor any_active = active.any();
  if (method == Method::kCraft) {
    at::Tensor newly_used;
    std::tie(p.donor, newly_used) =
        craft_donors(p.inactive, active, used, l1, order_key, fallback_u);
    p.reactivated = p.inactive.logical_and(any_active);
    used.logical_or_(newly_used);
  } else if (method == Method::kScaledGaussian) {
    const at::Tensor source =
        at::argmax(at::where(active, l1, -std::numeric_limits<double>::infinity()));
    p.reactivated = p.inactive.logical_and(any_active);
    p.donor = at::where(p.reactivated, source, -1);
  } else {
    p.reactivated = p.inactive.clone();  // outputs must not alias each other
    p.donor = at::full({n}, -1, max_abs.options().dtype(at::kLong));
  }
  return p;
}

// a = |bn_weight / sqrt(running_var + eps)|, float32 [N] (reference.folded_scale; bn_weight
// absent: 1): folded detection multiplies max_abs and l1 by it.
inline at::Tensor folded_abs_scale(const Channel& ch) {
  const at::Tensor var = ch.running_var()->to(at::kFloat);
  // the scalar is rounded to float32 by the float32 add, as in the reference's `var + eps`
  const at::Tensor denom = at::sqrt(var + ch.eps);
  const at::Tensor gamma =
      ch.bn_weight().has_value() ? ch.bn_weight()->to(at::kFloat) : at::ones_like(denom);
  const at::Tensor finite = at::isfinite(gamma).logical_and(at::isfinite(var));
  return at::where(finite, (gamma / denom).abs_(), std::numeric_limits<double>::quiet_NaN());
}

// reference.rewrite_channel_ with ATen ops: every given channel entry t of a reactivated filter
// i becomes t[d], -t[d], 0 or 1 (channel_rule), d = donor[i]; others are unchanged.
inline void rewrite_channel(const Channel& ch, Method method, const at::Tensor& reactivated,
                            const at::Tensor& donor) {
  const at::Tensor src = donor.clamp_min(0);
  for (int e = 0; e < Channel::kEntries; ++e) {
    const ChannelRule rule = channel_rule(e, method);
    if (!ch.entries[e].has_value() || rule == ChannelRule::kKeep) continue;
    at::Tensor t = *ch.entries[e];
    at::Tensor fresh;
    switch (rule) {
      case ChannelRule::kCopy: fresh = t.index_select(0, src); break;
      case ChannelRule::kNeg: fresh = t.index_select(0, src).neg_(); break;
      case ChannelRule::kZero: fresh = at::zeros_like(t); break;
      default: fresh = at::ones_like(t); break;
    }
    t.copy_(at::where(reactivated, fresh, t));
  }
}

}  // namespace cuda
}  // namespace craft_ext
