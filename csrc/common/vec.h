// Horizontal reductions of ATen's float vectors, shared by the CPU kernels.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace fastdistill {

inline float hsum(const at::vec::Vectorized<float>& x) {
  constexpr int64_t n = at::vec::Vectorized<float>::size();
  alignas(64) float b[n];
  x.store(b);
  float r = 0.f;
  for (int64_t i = 0; i < n; ++i) r += b[i];
  return r;
}

inline float hmax(const at::vec::Vectorized<float>& x) {
  constexpr int64_t n = at::vec::Vectorized<float>::size();
  alignas(64) float b[n];
  x.store(b);
  float r = b[0];
  for (int64_t i = 1; i < n; ++i) r = std::max(r, b[i]);
  return r;
}

}  // namespace fastdistill
