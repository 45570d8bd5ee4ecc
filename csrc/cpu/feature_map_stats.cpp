// CPU kernel of craft_ext::feature_map_stats (Diba & Khosravi, IASC 2023): per-sample map
// sums, emptiness (Eq. 2), Pearson correlations of the maps (Eqs. 5-9, computed on the raw
// maps, which equals the min-max normalised ones) and redundancy (Eq. 10). Semantics:
// craft_ext/reference.py::feature_map_stats.
//
// Samples are processed in parallel (at::parallel_for). For sample b, with x_i the n = H*W
// values of map i: one pass gives sum (double accumulator), min and max; the centred maps
// d_i = x_i - mean_i go to a per-sample scratch [C, n] whose Gram matrix G = D D^T (at::mm)
// gives corr[i, k] = G_ik / sqrt(G_ii G_kk). Constant maps (min == max) get correlation 0 with
// every other map; the diagonal is exactly 1.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common.h"

namespace craft_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> feature_map_stats_cpu(
    const at::Tensor& fmap, double sum_threshold, double corr_threshold, bool return_corr) {
  TORCH_CHECK(fmap.dim() == 4, "craft_ext::feature_map_stats: fmap must be [B, C, H, W], got ",
              fmap.sizes());
  TORCH_CHECK(at::isFloatingType(fmap.scalar_type()),
              "craft_ext::feature_map_stats: fmap must be floating, got ", fmap.scalar_type());
  const int64_t batch = fmap.size(0);
  const int64_t chans = fmap.size(1);
  const int64_t n = fmap.size(2) * fmap.size(3);
  TORCH_CHECK(batch > 0 && chans > 0 && n > 0,
              "craft_ext::feature_map_stats: fmap must be non-empty, got ", fmap.sizes());

  const at::Tensor x = fmap.reshape({batch, chans, n}).to(at::kFloat).contiguous();
  auto f32 = fmap.options().dtype(at::kFloat);
  at::Tensor sums = at::empty({batch, chans}, f32);
  at::Tensor empty = at::empty({batch, chans}, fmap.options().dtype(at::kBool));
  at::Tensor redundant = at::empty({batch, chans}, fmap.options().dtype(at::kBool));
  at::Tensor corr = return_corr ? at::empty({batch, chans, chans}, f32)
                                : at::empty({batch, 0, 0}, f32);

  const float s_thr = static_cast<float>(sum_threshold);
  const float c_thr = static_cast<float>(corr_threshold);
  const float* xp = x.data_ptr<float>();
  float* sp = sums.data_ptr<float>();
  bool* ep = empty.mutable_data_ptr<bool>();
  bool* rp = redundant.mutable_data_ptr<bool>();
  float* cp = return_corr ? corr.data_ptr<float>() : nullptr;

  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor centred = at::empty({chans, n}, x.options());
    std::vector<float> mean(chans);
    std::vector<float> inv_norm(chans);
    std::vector<char> constant(chans);
    std::vector<float> row(chans);
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = xp + b * chans * n;
      float* db = centred.data_ptr<float>();
      for (int64_t i = 0; i < chans; ++i) {
        const float* xi = xb + i * n;
        double acc = 0.0;
        float lo = xi[0];
        float hi = xi[0];
        for (int64_t p = 0; p < n; ++p) {
          acc += xi[p];
          lo = std::min(lo, xi[p]);
          hi = std::max(hi, xi[p]);
        }
        const float total = static_cast<float>(acc);
        sp[b * chans + i] = total;
        ep[b * chans + i] = std::abs(total) <= s_thr;
        mean[i] = total / static_cast<float>(n);
        constant[i] = lo == hi;
        float* di = db + i * n;
        for (int64_t p = 0; p < n; ++p) di[p] = xi[p] - mean[i];
      }
      const at::Tensor gram = at::mm(centred, centred.t()).contiguous();
      const float* g = gram.data_ptr<float>();
      for (int64_t i = 0; i < chans; ++i) {
        const float ss = g[i * chans + i];
        inv_norm[i] = ss > 0.0f ? 1.0f / std::sqrt(ss) : 0.0f;
      }
      for (int64_t i = 0; i < chans; ++i) {
        bool red = false;
        for (int64_t k = 0; k < chans; ++k) {
          float r;
          if (k == i) {
            r = 1.0f;
          } else if (constant[i] || constant[k]) {
            r = 0.0f;
          } else {
            r = g[i * chans + k] * inv_norm[i] * inv_norm[k];
            r = std::min(1.0f, std::max(-1.0f, r));
          }
          row[k] = r;
          if (k < i && r >= c_thr) red = true;
        }
        rp[b * chans + i] = red;
        if (cp != nullptr) std::copy(row.begin(), row.end(), cp + (b * chans + i) * chans);
      }
    }
  });
  return {sums, corr, empty, redundant};
}

}  // namespace

TORCH_LIBRARY_IMPL(craft_ext, CPU, m) {
  m.impl("feature_map_stats", &feature_map_stats_cpu);
}

}  // namespace craft_ext
