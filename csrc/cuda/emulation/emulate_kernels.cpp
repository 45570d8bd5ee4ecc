// Runs the launchers of csrc/cuda/*_kernels.cuh under the host emulation (host_emulation.h)
// and checks their results against a direct C++ computation of the same formulas:
//   filter_stats: max_abs exact, l1 / mean / std within 2^-20 relative (+ tiny absolute),
//                 NaN rows all-NaN, Inf rows Inf max_abs and l1;
//   write_reactivated: craft rows the exact negatives of their donors, scaled_gaussian and
//                 random rows as given by the float32 formulas, other rows bit-identical.
// Cases: float, double, half, bfloat16; K across the warp / block and vector / scalar paths;
// row strides larger than K; a misaligned base pointer. Exit status 0 when every check passes.
#include "host_emulation.h"

#include <cstdio>
#include <cstring>
#include <random>
#include <string>

#include "../filter_stats_kernels.cuh"
#include "../reactivate_kernels.cuh"

using craft_ext::cuda::launch_filter_stats;
using craft_ext::cuda::launch_write_reactivated;
using craft_ext::cuda::ReactivateMethod;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    if (failures <= 20) std::printf("  FAIL %s\n", what.c_str());
  }
}

template <typename T>
T from_double(double x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

template <typename T>
double as_double(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return static_cast<double>(x);
  }
}

bool close(double got, double want, double rel) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= rel * std::fabs(want) + 1e-30;
}

// Filter statistics of rows [n, k] (row_stride apart, starting `offset` elements into an
// allocation aligned to 16 bytes) against long-double two-pass formulas.
template <typename T>
void stats_case(const char* type, int64_t n, int64_t k, int64_t row_stride, int64_t offset,
                std::mt19937& gen) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<T> storage(offset + n * row_stride + 16);  // operator new: 16-byte aligned
  T* w = storage.data() + offset;
  for (int64_t i = 0; i < n; ++i) {
    const double centre = (i % 4 == 3) ? 100.0 : 0.0;  // some rows far from zero
    const double scale = (i % 4 == 3) ? 1e-2 : 0.1;
    for (int64_t j = 0; j < k; ++j) {
      w[i * row_stride + j] = from_double<T>(centre + scale * normal(gen));
    }
  }
  if (n > 2) w[1 * row_stride + k / 2] = from_double<T>(NAN);
  if (n > 2) w[2 * row_stride + (k - 1)] = from_double<T>(INFINITY);
  std::vector<float> max_abs(n, -1.0f), l1(n, -1.0f), mean(n, -1.0f), stdv(n, -1.0f);
  launch_filter_stats<T>(w, n, k, row_stride, max_abs.data(), l1.data(), mean.data(),
                         stdv.data(), nullptr);
  const std::string tag = std::string(type) + " n=" + std::to_string(n) + " k=" +
                          std::to_string(k) + " stride=" + std::to_string(row_stride) +
                          " offset=" + std::to_string(offset);
  for (int64_t i = 0; i < n; ++i) {
    long double mx = 0, sa = 0, s = 0;
    bool has_nan = false;
    for (int64_t j = 0; j < k; ++j) {
      const long double x = as_double(w[i * row_stride + j]);
      has_nan |= std::isnan(static_cast<double>(x));
      mx = std::fabs(x) > mx ? std::fabs(x) : mx;
      sa += std::fabs(x);
      s += x;
    }
    const long double m = s / k;
    long double ss = 0;
    for (int64_t j = 0; j < k; ++j) {
      const long double d = as_double(w[i * row_stride + j]) - m;
      ss += d * d;
    }
    const double want_max = has_nan ? NAN : static_cast<double>(static_cast<float>(mx));
    const double want_std = std::sqrt(static_cast<double>(ss / k));
    const std::string row = tag + " row " + std::to_string(i);
    check(close(max_abs[i], want_max, 0.0), row + " max_abs");
    check(close(l1[i], has_nan ? NAN : static_cast<double>(sa), 1e-6), row + " l1");
    if (std::isinf(static_cast<double>(sa)) || has_nan) {
      check(!has_nan || (std::isnan(mean[i]) && std::isnan(stdv[i])), row + " NaN mean/std");
      continue;
    }
    const double tol = 1e-6 * (std::fabs(static_cast<double>(m)) + want_std) + 1e-12;
    check(std::fabs(mean[i] - static_cast<double>(m)) <= tol, row + " mean");
    check(std::fabs(stdv[i] - want_std) <= 1e-6 * want_std + 1e-12, row + " std");
  }
}

// write_reactivated for every method on rows [n, k] with stride `row_stride`.
template <typename T>
void write_case(const char* type, int64_t n, int64_t k, int64_t row_stride, std::mt19937& gen) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int m = 0; m < 3; ++m) {
    const auto method = static_cast<ReactivateMethod>(m);
    std::vector<T> w(n * row_stride + 8);
    for (auto& x : w) x = from_double<T>(normal(gen));
    const std::vector<T> before = w;
    std::vector<float> noise(n * k), mean(n), stdv(n);
    for (auto& z : noise) z = normal(gen);
    for (int64_t i = 0; i < n; ++i) {
      mean[i] = 0.01f * normal(gen);
      stdv[i] = 0.5f + 0.1f * normal(gen);
    }
    // odd rows are reactivated; donors are even rows (active ones are never written)
    std::vector<unsigned char> flag_bytes(n);
    std::vector<int64_t> donor(n, -1);
    for (int64_t i = 0; i < n; ++i) {
      flag_bytes[i] = i % 2;
      if (i % 2) donor[i] = (i * 7 + 2) % n & ~int64_t{1};
    }
    bool* flags = reinterpret_cast<bool*>(flag_bytes.data());
    const float scale = static_cast<float>(std::sqrt(2.0 / static_cast<double>(k)));
    launch_write_reactivated<T>(w.data(), n, k, row_stride, flags, donor.data(), noise.data(),
                                mean.data(), stdv.data(), scale, method, nullptr);
    const std::string tag = std::string(type) + " method=" + std::to_string(m) +
                            " n=" + std::to_string(n) + " k=" + std::to_string(k);
    bool ok = true;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < row_stride && ok; ++j) {
        const int64_t at = i * row_stride + j;
        T want = before[at];
        if (flag_bytes[i] && j < k) {
          const int64_t d = donor[i];
          if (method == ReactivateMethod::kCraft) {
            want = from_double<T>(-as_double(before[d * row_stride + j]));
          } else if (method == ReactivateMethod::kScaledGaussian) {
            want = from_double<T>(static_cast<float>(mean[d] + stdv[d] * noise[i * k + j]));
          } else {
            want = from_double<T>(static_cast<float>(noise[i * k + j] * scale));
          }
        }
        ok = std::memcmp(&w[at], &want, sizeof(T)) == 0;
      }
    }
    check(ok, tag + " rows");
  }
}

template <typename T>
void all_cases(const char* type) {
  std::mt19937 gen(1234);
  constexpr int64_t kV = 16 / sizeof(T);
  for (int64_t k : {int64_t{1}, int64_t{3}, kV, int64_t{27}, int64_t{1024}, int64_t{1025},
                    int64_t{4608}}) {
    const int64_t n = k > 1024 ? 3 : 9;  // 9: a full block of 8 rows and a partial one
    stats_case<T>(type, n, k, k, 0, gen);       // contiguous (vector loads when aligned)
    stats_case<T>(type, n, k, k + kV, 0, gen);  // row slice: stride > K, still aligned
    stats_case<T>(type, n, k, k, 1, gen);       // misaligned base: scalar loads
    stats_case<T>(type, 1, k, k, 0, gen);       // a single filter
  }
  write_case<T>(type, 9, 27, 27, gen);
  write_case<T>(type, 6, 300, 310, gen);
}

}  // namespace

int main() {
  all_cases<float>("float");
  all_cases<double>("double");
  all_cases<__half>("half");
  all_cases<__nv_bfloat16>("bfloat16");
  std::printf("emulated kernel checks: %s (%d failures)\n", failures ? "FAILED" : "passed",
              failures);
  return failures ? 1 : 0;
}
