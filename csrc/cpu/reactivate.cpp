// CPU kernel of craft_ext::reactivate_ (schema in csrc/ops.cpp, semantics in
// craft_ext/reference.py::reactivate_ and craft_donors).
//
// CRAFT filter reactivation (Bhatta et al., arXiv 2312.00072, sec. 4.3) of weight [N, ...] in
// place. With per-filter float32 max_abs / l1 / mean / std and t = float32(threshold):
//   inactive[i] = max_abs[i] <= t;   active[i] = !inactive[i] && isfinite(l1[i]).
// * craft: inactive filters, ordered by (order_key, index), take the unspent active filters
//   (active & !used) ranked by (-l1, index), one each; the rest take the spent active filter
//   S[min(floor(fallback_u[i] * |S|), |S| - 1)] (float32 product, S in index order). A filter
//   becomes the negative of its donor; used |= donors spent here.
// * scaled_gaussian: inactive filters become mean[s] + std[s] * noise[i] (float32, then cast),
//   s the active filter of largest l1 (lowest index on ties).
// * random: inactive filters become noise[i] * float32(sqrt(2 / K)) (He / Kaiming, fan-in K).
// craft and scaled_gaussian change nothing without an active filter. Returns (inactive bool [N],
// reactivated bool [N], donor int64 [N] (-1 where none), count int64 []).
// Channel (optional [N] entries after the filters: conv bias, BN weight / bias / running stats,
// PReLU slope): with `folded`, max_abs and l1 above are those of the filter folded with its BN,
// times a[i] = |bn_weight[i] / sqrt(running_var[i] + eps)| (float32); given entries of the
// reactivated channels are rewritten by channel_rule (reference.CHANNEL_RULES).
//
// The statistics are the reference's own ATen reductions (see reactivate_cpu), the pairing is
// O(N log N) serial work on [N] vectors, and only the reactivated filters are written, in
// parallel. Filters that are dense blocks are written through a strided view of `weight`;
// other layouts are computed on a contiguous copy that is copied back.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include <c10/util/SmallVector.h>

#include "common.h"
#include "reactivate.h"

namespace craft_ext {
namespace {

// Ascending order of torch.sort on floats: NaN after everything, NaNs equal to each other.
inline bool sort_less(float a, float b) { return a < b || (!std::isnan(a) && std::isnan(b)); }

// Indices 0..n-1 stably sorted by key (torch.sort(key, stable=True).indices).
std::vector<int64_t> stable_argsort(const std::vector<float>& key) {
  std::vector<int64_t> idx(key.size());
  std::iota(idx.begin(), idx.end(), int64_t{0});
  std::stable_sort(idx.begin(), idx.end(),
                   [&](int64_t a, int64_t b) { return sort_less(key[a], key[b]); });
  return idx;
}

// craft_donors of reference.py: fills donor (-1 where none) and newly_used.
void craft_donors(const std::vector<uint8_t>& inactive, const std::vector<uint8_t>& active,
                  const std::vector<uint8_t>& used, const std::vector<float>& l1,
                  const float* order_key, const float* fallback_u, int64_t* donor,
                  std::vector<uint8_t>& newly_used) {
  const int64_t n = static_cast<int64_t>(inactive.size());
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> donor_key(n), target_key(n);
  int64_t n_cand = 0, n_inactive = 0;
  bool any_active = false;
  for (int64_t i = 0; i < n; ++i) {
    const bool cand = active[i] && !used[i];
    n_cand += cand;
    n_inactive += inactive[i] != 0;
    any_active = any_active || active[i];
    donor_key[i] = cand ? -l1[i] : inf;
    target_key[i] = inactive[i] ? order_key[i] : inf;
  }
  const std::vector<int64_t> donor_order = stable_argsort(donor_key);
  const std::vector<int64_t> target_order = stable_argsort(target_key);

  newly_used.assign(n, 0);
  for (int64_t p = 0; p < std::min(n_cand, n_inactive); ++p) newly_used[donor_order[p]] = 1;

  // Spent active filters in index order, then the rest (a stable sort of !spent).
  std::vector<int64_t> spent_list;
  spent_list.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (active[i] && (used[i] || newly_used[i])) spent_list.push_back(i);
  }
  const int64_t n_spent = static_cast<int64_t>(spent_list.size());
  for (int64_t i = 0; i < n; ++i) {
    if (!(active[i] && (used[i] || newly_used[i]))) spent_list.push_back(i);
  }

  for (int64_t p = 0; p < n; ++p) {
    const int64_t i = target_order[p];
    int64_t d = p < n_cand ? donor_order[p] : -1;
    if (d < 0) {
      // r = min(floor(u * |S|), |S| - 1), the product in float32. Clamping to [0, n) first
      // only guards fallback_u outside [0, 1) (NaN included) against out-of-range reads.
      const float fl = std::floor(fallback_u[i] * static_cast<float>(n_spent));
      int64_t r = 0;
      if (fl >= static_cast<float>(n)) {
        r = n - 1;
      } else if (fl > 0.0f) {
        r = static_cast<int64_t>(fl);
      }
      r = std::min(r, std::max<int64_t>(n_spent - 1, 0));
      d = spent_list[r];
    }
    donor[i] = inactive[i] && any_active ? d : -1;
  }
}

template <typename scalar_t>
void write_rows(scalar_t* rows, int64_t row_stride, int64_t n, int64_t k, Method method,
                const uint8_t* reactivated, const int64_t* donor, const float* noise, float mean_s,
                float std_s, float kaiming) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / k);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      if (!reactivated[i]) continue;
      scalar_t* dst = rows + i * row_stride;
      if (method == Method::kCraft) {
        // Donors are active, so never written here: reading them while writing is safe.
        const scalar_t* src = rows + donor[i] * row_stride;
        for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<scalar_t>(-src[j]);
      } else if (method == Method::kScaledGaussian) {
        const float* z = noise + i * k;
        for (int64_t j = 0; j < k; ++j) {
          const float scaled = std_s * z[j];  // rounded like torch: multiply, then add
          dst[j] = static_cast<scalar_t>(mean_s + scaled);
        }
      } else {
        const float* z = noise + i * k;
        for (int64_t j = 0; j < k; ++j) dst[j] = static_cast<scalar_t>(z[j] * kaiming);
      }
    }
  });
}

// Float32 max |x| and sum |x| of every filter, bit-identical to reference.filter_stats: the
// same ATen ops (to float32, abs, amax, sum over dim 1) on the same logical-order rows. The
// donor ranking by l1 decides the pairing, and near-ties flip under any other summation order
// (about 1 in 100 random 512-filter layers pairs a filter differently with a correctly rounded
// double sum), so bit-identical pairing needs bit-identical l1.
//
// Blocks of filters are reduced in parallel, each from a cache-sized float32 buffer. Inside
// at::parallel_for ATen reduces serially, one full row at a time, which is how it reduces the
// rows of a multi-row [N, K] matrix too, so every row's sum is rounded as in the reference.
// A single filter (N = 1) is reduced in one call, as the reference does (ATen may then split
// the row across threads).
void reference_max_abs_l1(const at::Tensor& weight, int64_t n, int64_t k, float* max_abs,
                          float* l1) {
  const int64_t block = std::max<int64_t>(1, (int64_t{1} << 15) / k);  // ~128 KiB of float32
  auto reduce = [&](int64_t begin, int64_t end) {
    // Worker threads start with default grad mode; these temporaries need no autograd graph.
    const at::NoGradGuard no_grad;
    for (int64_t b = begin; b < end; b += block) {
      const int64_t m = std::min(block, end - b);
      const at::Tensor a = at::abs(weight.narrow(0, b, m).reshape({m, k}).to(at::kFloat));
      const at::Tensor block_max = a.amax(1).contiguous();
      const at::Tensor block_l1 = a.sum(1).contiguous();
      std::copy_n(block_max.const_data_ptr<float>(), m, max_abs + b);
      std::copy_n(block_l1.const_data_ptr<float>(), m, l1 + b);
    }
  };
  if (n == 1) {
    reduce(0, 1);
    return;
  }
  at::parallel_for(0, n, block, reduce);
}

// Whether some filter is inactive: every |float32(w)| <= t (NaN compares false, so a filter
// holding NaN is never inactive, as with the reference's amax). Reads a filter only until its
// first element above t, so a layer without inactive filters (the usual case at a reactivation)
// costs about one element per filter. Needs the dense [n, k] row view of filter_rows_view.
// With a per-row scale (folded detection), element j counts as small when
// fl(|float32(w_j)| * scale[i]) <= t: rounding is monotonic, so that holds for every element
// exactly when fl(max_abs * scale) <= t, the reference's rule (a NaN scale compares false).
template <typename scalar_t>
bool any_inactive_rows(const scalar_t* rows, int64_t row_stride, int64_t n, int64_t k, float t,
                       const float* scale) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* row = rows + i * row_stride;
    int64_t j = 0;
    if (scale == nullptr) {
      while (j < k && std::abs(static_cast<float>(row[j])) <= t) ++j;
    } else {
      const float a = scale[i];
      while (j < k && std::abs(static_cast<float>(row[j])) * a <= t) ++j;
    }
    if (j == k) return true;
  }
  return false;
}

// Values of a 1-D floating tensor as float32 (rounded as Tensor.to(float32) rounds them).
void read_floats(const at::Tensor& t, float* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "read_floats", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    for (int64_t i = 0; i < t.size(0); ++i) out[i] = static_cast<float>(p[i * stride]);
  });
}

// a[i] = |bn_weight[i] / sqrt(running_var[i] + eps)| in float32, as reference.folded_scale
// (bn_weight absent: 1), for folded detection; NaN where gamma or var is not finite.
void folded_abs_scale(const Channel& ch, int64_t n, float* a) {
  c10::SmallVector<float, 512> var(n);
  read_floats(*ch.running_var(), var.data());
  const float eps = static_cast<float>(ch.eps);
  if (ch.bn_weight().has_value()) read_floats(*ch.bn_weight(), a);
  for (int64_t i = 0; i < n; ++i) {
    const float gamma = ch.bn_weight().has_value() ? a[i] : 1.0f;
    a[i] = std::isfinite(gamma) && std::isfinite(var[i])
               ? std::fabs(gamma / std::sqrt(var[i] + eps))
               : std::numeric_limits<float>::quiet_NaN();
  }
}

// Entries of the reactivated channels (reactivated[i]), rewritten in place by channel_rule
// with d = donor[i]. Donors / sources are never reactivated, so no entry is both read and
// written.
void rewrite_channel(const Channel& ch, Method method, int64_t n, const uint8_t* reactivated,
                     const int64_t* donor) {
  for (int e = 0; e < Channel::kEntries; ++e) {
    const ChannelRule rule = channel_rule(e, method);
    if (!ch.entries[e].has_value() || rule == ChannelRule::kKeep) continue;
    at::Tensor t = *ch.entries[e];
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, t.scalar_type(), "craft_ext::reactivate_ channel", [&] {
          scalar_t* p = t.mutable_data_ptr<scalar_t>();
          const int64_t stride = t.stride(0);
          for (int64_t i = 0; i < n; ++i) {
            if (!reactivated[i]) continue;
            const scalar_t src = p[std::max<int64_t>(donor[i], 0) * stride];
            scalar_t& dst = p[i * stride];
            switch (rule) {
              case ChannelRule::kCopy: dst = src; break;
              case ChannelRule::kNeg: dst = static_cast<scalar_t>(-src); break;
              case ChannelRule::kZero: dst = static_cast<scalar_t>(0); break;
              case ChannelRule::kOne: dst = static_cast<scalar_t>(1); break;
              case ChannelRule::kKeep: break;
            }
          }
        });
  }
}

}  // namespace

Method check_reactivate_args(const at::Tensor& weight, const at::Tensor& used,
                             c10::string_view method, const char* op) {
  TORCH_CHECK(weight.dim() >= 1, op, ": weight needs a filter dim 0");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": weight must be float32, float64, float16 or bfloat16, got ", dtype);
  const int64_t n = weight.size(0);
  TORCH_CHECK(n == 0 || weight.numel() > 0, op,
              ": filters must hold at least one element, got weight of shape ", weight.sizes());
  TORCH_CHECK(used.scalar_type() == at::kBool && used.dim() == 1 && used.size(0) == n &&
                  used.device() == weight.device(),
              op, ": used must be a bool tensor of shape (", n, ",) on ", weight.device(),
              ", got ", used.scalar_type(), " of shape ", used.sizes(), " on ", used.device());
  return parse_method(method);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reactivate_cpu(
    const at::Tensor& weight, const at::Tensor& used, const at::Tensor& order_key,
    const at::Tensor& fallback_u, const std::optional<at::Tensor>& noise, double threshold,
    c10::string_view method_name, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& prelu, double eps, bool folded) {
  const Method method = check_reactivate_args(weight, used, method_name, "craft_ext::reactivate_");
  const Channel ch =
      make_channel(bias, bn_weight, bn_bias, running_mean, running_var, prelu, eps, folded);
  check_channel(ch, weight, "craft_ext::reactivate_");
  const int64_t n = weight.size(0);
  TORCH_CHECK(order_key.dim() == 1 && order_key.size(0) == n && fallback_u.dim() == 1 &&
                  fallback_u.size(0) == n,
              "craft_ext::reactivate_: order_key and fallback_u must be [", n, "]");
  const at::Tensor key = order_key.to(at::kFloat).contiguous();  // no copy for float32 keys
  const at::Tensor fu = fallback_u.to(at::kFloat).contiguous();
  return make_outputs(n, [&](bool* inactive, bool* reactivated, int64_t* donor) {
    return reactivate_cpu_into(weight, used, key.const_data_ptr<float>(),
                               fu.const_data_ptr<float>(), noise, threshold, method, ch,
                               inactive, reactivated, donor);
  });
}

int64_t reactivate_cpu_into(const at::Tensor& weight, const at::Tensor& used,
                            const float* order_key, const float* fallback_u,
                            const std::optional<at::Tensor>& noise, double threshold,
                            Method method, const Channel& ch, bool* out_inactive,
                            bool* out_reactivated, int64_t* donor) {
  const int64_t n = weight.size(0);
  const int64_t k = n == 0 ? 0 : weight.numel() / n;
  const bool needs_noise = method != Method::kCraft;
  if (needs_noise) {
    TORCH_CHECK(noise.has_value() && noise->defined() && noise->sizes() == weight.sizes(),
                "craft_ext::reactivate_: scaled_gaussian and random need noise shaped like "
                "weight");
  }

  const auto bool_opts = weight.options().dtype(at::kBool);
  if (out_inactive != nullptr) std::fill_n(out_inactive, n, false);
  std::fill_n(out_reactivated, n, false);
  std::fill_n(donor, n, int64_t{-1});
  if (n == 0) return 0;

  // Early exit (this CPU kernel may branch on the data it reads): no inactive filter means
  // nothing is written and the outputs are the all-false / -1 / 0 ones filled above. Filters
  // that are dense blocks are scanned in place, without creating a view.
  const float thr = static_cast<float>(threshold);
  // folded detection: |s_i| per filter (on the stack up to N = 512)
  c10::SmallVector<float, 512> scale;
  if (ch.folded) {
    scale.resize(n);
    folded_abs_scale(ch, n, scale.data());
  }
  const float* scale_ptr = ch.folded ? scale.data() : nullptr;
  int64_t dense_stride = 0;
  if (filter_rows_dense(weight, &dense_stride)) {
    bool any_inactive = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, weight.scalar_type(), "craft_ext::reactivate_ scan", [&] {
          any_inactive = any_inactive_rows(weight.const_data_ptr<scalar_t>(), dense_stride, n,
                                           k, thr, scale_ptr);
        });
    if (!any_inactive) return 0;
  }

  // Filters as [n, k] rows: a view written in place, or a logical-order copy written back.
  const FilterRows fr = filter_rows(weight);
  const at::Tensor& rows = fr.rows;
  const int64_t row_stride = n > 1 ? rows.stride(0) : k;

  std::vector<float> max_abs(n), l1(n);
  reference_max_abs_l1(weight, n, k, max_abs.data(), l1.data());
  if (scale_ptr != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      max_abs[i] *= scale_ptr[i];
      l1[i] *= scale_ptr[i];
    }
  }

  std::vector<uint8_t> inactive(n), active(n), reactivated(n), used_v(n), newly_used;
  bool any_active = false;
  for (int64_t i = 0; i < n; ++i) {
    inactive[i] = max_abs[i] <= thr;
    active[i] = !inactive[i] && std::isfinite(l1[i]);
    any_active = any_active || active[i];
  }
  {
    const at::Tensor used_c = used.contiguous();
    const bool* u = used_c.const_data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i) used_v[i] = u[i];
  }

  float mean_s = 0.0f, std_s = 0.0f;
  if (method == Method::kCraft) {
    craft_donors(inactive, active, used_v, l1, order_key, fallback_u, donor, newly_used);
    for (int64_t i = 0; i < n; ++i) reactivated[i] = inactive[i] && any_active;
  } else if (method == Method::kScaledGaussian) {
    // argmax of where(active, l1, -inf): the first maximum.
    int64_t source = 0;
    float best = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      const float v = active[i] ? l1[i] : -std::numeric_limits<float>::infinity();
      if (v > best) {
        best = v;
        source = i;
      }
    }
    // torch.std_mean(x32, dim=1, correction=0) as in the reference, read at the source row.
    const at::Tensor x32 = weight.reshape({n, k}).to(at::kFloat);
    const auto std_mean = at::std_mean(x32, at::IntArrayRef{1}, /*correction=*/at::Scalar(0),
                                       /*keepdim=*/false);
    mean_s = std::get<1>(std_mean).contiguous().const_data_ptr<float>()[source];
    std_s = std::get<0>(std_mean).contiguous().const_data_ptr<float>()[source];
    for (int64_t i = 0; i < n; ++i) {
      reactivated[i] = inactive[i] && any_active;
      donor[i] = reactivated[i] ? source : -1;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) reactivated[i] = inactive[i];
  }

  at::Tensor noise_rows;
  if (needs_noise) {
    const at::Tensor z = noise->to(at::kFloat);
    noise_rows = (fr.is_view ? rows_like(z, weight) : z.reshape({n, k})).contiguous();
  }
  const float kaiming = static_cast<float>(std::sqrt(2.0 / static_cast<double>(k)));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, weight.scalar_type(), "craft_ext::reactivate_ write", [&] {
        write_rows(rows.mutable_data_ptr<scalar_t>(), row_stride, n, k, method,
                   reactivated.data(), donor,
                   needs_noise ? noise_rows.const_data_ptr<float>() : nullptr, mean_s, std_s,
                   kaiming);
      });
  if (!fr.is_view) weight.copy_(rows.view(weight.sizes()));
  if (ch.any()) rewrite_channel(ch, method, n, reactivated.data(), donor);

  if (method == Method::kCraft) {
    at::Tensor newly = at::empty({n}, bool_opts);
    bool* nu = newly.mutable_data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i) nu[i] = newly_used[i] != 0;
    used.logical_or_(newly);
  }

  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (out_inactive != nullptr) out_inactive[i] = inactive[i] != 0;
    out_reactivated[i] = reactivated[i] != 0;
    count += reactivated[i];
  }
  return count;
}

TORCH_LIBRARY_IMPL(craft_ext, CPU, m) { m.impl("reactivate_", &reactivate_cpu); }

}  // namespace craft_ext
