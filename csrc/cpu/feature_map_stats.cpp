// CPU kernel of craft_ext::feature_map_stats (Diba & Khosravi, IASC 2023): per-sample map
// sums, emptiness (Eq. 2), Pearson correlations of the maps (Eqs. 5-9, computed on the raw
// maps, which equals the min-max normalised ones) and redundancy (Eq. 10). Semantics:
// craft_ext/reference.py::feature_map_stats.
//
// With x_bi the n = H*W values of map i of sample b: one parallel pass over the (b, i) rows
// gives sum (double accumulator), min and max and writes the centred maps d_bi = x_bi - mean_bi
// to a scratch [B, C, n]; at::bmm gives the Gram matrices G_b = D_b D_b^T (no nested
// parallelism); a second parallel pass gives corr[b, i, k] = G_bik / sqrt(G_bii G_bkk).
// Constant maps (min == max) get correlation 0 with every other map; the diagonal is exactly 1.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace craft_ext {
namespace {

struct RowSummary {
  double sum;
  float lo;
  float hi;
};

// Sum (float64), min and max of x[0 .. n), NaN propagating like torch's amin / amax (so a map
// holding NaN is never constant, as in the reference). kLanes independent accumulators, so the
// compiler vectorises the loop (one serial float64 accumulator is a chain of dependent adds,
// ~4 cycles per element, and made this pass slower than ATen's sum + amin + amax).
RowSummary summarise_row(const float* x, int64_t n) {
  constexpr int64_t kLanes = 16;
  double acc[kLanes] = {};
  float lo[kLanes];
  float hi[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lo[l] = hi[l] = x[0];
  int64_t p = 0;
  for (; p + kLanes <= n; p += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = x[p + l];
      acc[l] += static_cast<double>(v);
      lo[l] = v < lo[l] ? v : lo[l];
      hi[l] = v > hi[l] ? v : hi[l];
    }
  }
  for (int64_t l = 0; p < n; ++p, ++l) {
    const float v = x[p];
    acc[l] += static_cast<double>(v);
    lo[l] = v < lo[l] ? v : lo[l];
    hi[l] = v > hi[l] ? v : hi[l];
  }
  RowSummary out{0.0, lo[0], hi[0]};
  for (int64_t l = 0; l < kLanes; ++l) {
    out.sum += acc[l];
    out.lo = lo[l] < out.lo ? lo[l] : out.lo;
    out.hi = hi[l] > out.hi ? hi[l] : out.hi;
  }
  // NaN: the lanes' min / max skip it (`v < lo ? v : lo` is exactly x86's minps, which keeps
  // the loop vectorised; a NaN test in it does not). A NaN element makes the sum NaN, so only
  // then look for one, and report min = max = NaN as torch's amin / amax would.
  if (std::isnan(out.sum)) {
    for (int64_t q = 0; q < n; ++q) {
      if (std::isnan(x[q])) {
        out.lo = out.hi = x[q];
        break;
      }
    }
  }
  return out;
}

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

  // Pass 1 over (sample, map) rows: sum, min, max and the centred row.
  at::Tensor centred = at::empty({batch, chans, n}, x.options());
  at::Tensor constant_t = at::empty({batch, chans}, fmap.options().dtype(at::kBool));
  float* dp = centred.data_ptr<float>();
  bool* kp = constant_t.mutable_data_ptr<bool>();
  const int64_t rows = batch * chans;
  const int64_t grain = std::max<int64_t>(1, 32768 / n);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xi = xp + r * n;
      const RowSummary row = summarise_row(xi, n);
      const float total = static_cast<float>(row.sum);
      sp[r] = total;
      ep[r] = std::abs(total) <= s_thr;
      kp[r] = row.lo == row.hi;
      const float mean = total / static_cast<float>(n);
      float* di = dp + r * n;
      for (int64_t p = 0; p < n; ++p) di[p] = xi[p] - mean;
    }
  });

  // Gram matrices of the centred maps, one per sample (BLAS, parallel on its own).
  const at::Tensor gram = at::bmm(centred, centred.transpose(1, 2)).contiguous();
  const float* gp = gram.data_ptr<float>();

  // 1 / sqrt(G_bii) per map (0 for a map without variance), once rather than per pair.
  std::vector<float> inv(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const float ss = gp[(r / chans) * chans * chans + (r % chans) * (chans + 1)];
    inv[r] = ss > 0.0f ? 1.0f / std::sqrt(ss) : 0.0f;
  }

  // Pass 2 over (sample, map) rows: correlations and redundancy.
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / chans), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / chans;
      const int64_t i = r % chans;
      const float* g = gp + b * chans * chans + i * chans;
      const bool* kb = kp + b * chans;
      const float* inv_b = inv.data() + b * chans;
      const float inv_i = inv[r];
      bool red = false;
      for (int64_t k = 0; k < chans; ++k) {
        float c;
        if (k == i) {
          c = 1.0f;
        } else if (kb[i] || kb[k]) {
          c = 0.0f;
        } else {
          c = g[k] * inv_i * inv_b[k];
          if (!std::isnan(c)) c = std::min(1.0f, std::max(-1.0f, c));  // clamp keeps NaN
        }
        if (k < i && c >= c_thr) red = true;
        if (cp != nullptr) cp[r * chans + k] = c;
      }
      rp[r] = red;
    }
  });
  return {sums, corr, empty, redundant};
}

}  // namespace

TORCH_LIBRARY_IMPL(craft_ext, CPU, m) {
  m.impl("feature_map_stats", &feature_map_stats_cpu);
}

}  // namespace craft_ext
