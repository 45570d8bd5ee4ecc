// Shared helpers for craft_ext's C++ and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

namespace craft_ext {

// Methods of reactivate_, as passed in the schema's `str method`.
enum class Method { kCraft = 0, kScaledGaussian = 1, kRandom = 2 };

inline Method parse_method(c10::string_view method) {
  if (method == "craft") return Method::kCraft;
  if (method == "scaled_gaussian") return Method::kScaledGaussian;
  if (method == "random") return Method::kRandom;
  TORCH_CHECK(false, "craft_ext: method must be one of 'craft', 'scaled_gaussian', 'random'; got '",
              std::string(method), "'");
}

// The channel that follows the filters of a watched weight [N, ...] (reference.CHANNEL_ENTRIES):
// optional [N] tensors, in schema order, that reactivate_ rewrites for reactivated filters,
// plus the BN eps and whether detection folds the BN scale into the filters.
struct Channel {
  static constexpr int kEntries = 6;
  // bias, bn_weight, bn_bias, running_mean, running_var, prelu
  std::array<std::optional<at::Tensor>, kEntries> entries;
  double eps = 1e-5;
  bool folded = false;

  const std::optional<at::Tensor>& bn_weight() const { return entries[1]; }
  const std::optional<at::Tensor>& running_var() const { return entries[4]; }
  bool any() const {
    for (const auto& e : entries) {
      if (e.has_value() && e->defined()) return true;
    }
    return false;
  }
};

inline Channel make_channel(const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& bn_weight,
                            const std::optional<at::Tensor>& bn_bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var,
                            const std::optional<at::Tensor>& prelu, double eps, bool folded) {
  Channel ch;
  ch.entries = {bias, bn_weight, bn_bias, running_mean, running_var, prelu};
  for (auto& e : ch.entries) {
    if (e.has_value() && !e->defined()) e.reset();
  }
  ch.eps = eps;
  ch.folded = folded;
  return ch;
}

inline const char* channel_entry_name(int entry) {
  static const char* names[Channel::kEntries] = {"bias",         "bn_weight",   "bn_bias",
                                                 "running_mean", "running_var", "prelu"};
  return names[entry];
}

// How reactivation rewrites entry t[i] of a reactivated channel i with donor / source d
// (reference.CHANNEL_RULES): keep, t[d], -t[d], 0 or 1.
enum class ChannelRule { kKeep, kCopy, kNeg, kZero, kOne };

inline ChannelRule channel_rule(int entry, Method method) {
  using R = ChannelRule;
  //                                        craft     scaled_gaussian  random
  static const R rules[Channel::kEntries][3] = {{R::kNeg, R::kCopy, R::kZero},    // bias
                                                {R::kCopy, R::kCopy, R::kOne},    // bn_weight
                                                {R::kNeg, R::kZero, R::kZero},    // bn_bias
                                                {R::kNeg, R::kCopy, R::kZero},    // running_mean
                                                {R::kCopy, R::kCopy, R::kOne},    // running_var
                                                {R::kCopy, R::kCopy, R::kKeep}};  // prelu
  return rules[entry][static_cast<int>(method)];
}

// The channel's entries are [N] floating tensors on the weight's device, and folded detection
// has a running variance. Checked before anything is drawn or written.
inline void check_channel(const Channel& ch, const at::Tensor& weight, const char* op) {
  const int64_t n = weight.size(0);
  for (int e = 0; e < Channel::kEntries; ++e) {
    const auto& t = ch.entries[e];
    if (!t.has_value()) continue;
    const auto dtype = t->scalar_type();
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->device() == weight.device() &&
                    (dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                     dtype == at::kBFloat16),
                op, ": ", channel_entry_name(e), " must be a float [", n, "] tensor on ",
                weight.device(), " (one entry per filter), got ", dtype, " of shape ",
                t->sizes(), " on ", t->device());
  }
  TORCH_CHECK(!ch.folded || ch.running_var().has_value(), op,
              ": folded detection needs running_var (the BatchNorm that follows the filters)");
}

// Permutation of the dims of `t` (dim 0 first, then dims 1.. by decreasing stride) under which
// every filter t[i] is, if at all possible, one dense row-major block. channels_last conv
// weights, for example, become [N, kh, kw, C].
inline std::vector<int64_t> filter_major_perm(const at::Tensor& t) {
  std::vector<int64_t> perm(t.dim());
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin() + 1, perm.end(), [&](int64_t a, int64_t b) {
    return t.stride(a) > t.stride(b);
  });
  return perm;
}

// Whether every filter t[i] is a dense block of K elements (in filter_major_perm order) and the
// filters do not overlap; if so, *row_stride is the element distance between filters. Creates
// no tensor (the CPU reactivate_ kernel asks this at every optimizer step).
inline bool filter_rows_dense(const at::Tensor& t, int64_t* row_stride) {
  const int64_t n = t.size(0);
  const int64_t k = n == 0 ? 0 : t.numel() / n;
  auto perm = filter_major_perm(t);
  int64_t expected = 1;
  for (int64_t j = t.dim() - 1; j >= 1; --j) {
    const int64_t d = perm[j];
    if (t.size(d) == 1) continue;
    if (t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  if (n > 1 && t.stride(0) < k) return false;  // rows would overlap
  *row_stride = n > 1 ? t.stride(0) : k;
  return true;
}

// A [N, K] view of `t` sharing its storage (row stride t.stride(0), unit column stride), in
// which row i holds the elements of filter t[i] in the order given by filter_major_perm(t);
// undefined if the filters of `t` are not dense blocks (e.g. a slice along dim 1).
inline at::Tensor filter_rows_view(const at::Tensor& t) {
  const int64_t n = t.size(0);
  const int64_t k = n == 0 ? 0 : t.numel() / n;
  int64_t row_stride = 0;
  if (!filter_rows_dense(t, &row_stride)) return at::Tensor();
  return t.as_strided({n, k}, {row_stride, 1}, t.storage_offset());
}

// The filters of `t` [N, ...] as [N, K] rows with unit column stride, for a kernel to read or
// write: filter_rows_view(t) where the filters are dense blocks (is_view: writes go to `t`),
// otherwise a contiguous copy in logical order (t.reshape({N, K}).contiguous(); a caller that
// already holds t.reshape({N, K}) passes it as `logical`, which then is not copied again where
// reshape made a copy already).
struct FilterRows {
  at::Tensor rows;
  bool is_view;
};

inline FilterRows filter_rows(const at::Tensor& t, const at::Tensor& logical = at::Tensor()) {
  at::Tensor view = filter_rows_view(t);
  if (view.defined()) return {view, true};
  if (logical.defined()) return {logical.contiguous(), false};
  const int64_t n = t.size(0);
  return {t.reshape({n, n == 0 ? 0 : t.numel() / n}).contiguous(), false};
}

// The elements of `other` (same shape as `t`) as [N, K] rows in the same element order as
// filter_rows_view(t) (a copy when needed), so element (i, j) of both refers to the same index.
inline at::Tensor rows_like(const at::Tensor& other, const at::Tensor& t) {
  const int64_t n = t.size(0);
  return other.permute(filter_major_perm(t)).reshape({n, n == 0 ? 0 : t.numel() / n});
}

}  // namespace craft_ext
