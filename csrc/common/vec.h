// Horizontal reductions of ATen's float vectors, shared by the CPU kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace fastdistill {

inline float hsum(const at::vec::Vectorized<float>& x) {
  constexpr int64_t n = at::vec::Vectorized<float>::size();
  alignas(64) float b[n];
  x.store(b);
  float r = 0.f;
  for (int64_t i = 0; i < n; ++i) r += b[i];
  return r;
}

// The largest lane; NaN if any lane is NaN (as at::vec::maximum), so that a
// row's max tells whether the row holds a NaN.
inline float nan_max(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<float>::quiet_NaN();
  return b > a ? b : a;
}

inline float hmax(const at::vec::Vectorized<float>& x) {
  constexpr int64_t n = at::vec::Vectorized<float>::size();
  alignas(64) float b[n];
  x.store(b);
  float r = b[0];
  for (int64_t i = 1; i < n; ++i) r = nan_max(r, b[i]);
  return r;
}

// A row is no distribution when its max is NaN (a NaN somewhere), +inf, or
// -inf (every entry -inf): the kernels then give it a NaN loss and gradient.
inline bool nonfinite_max(float m) { return !std::isfinite(m); }

}  // namespace fastdistill
