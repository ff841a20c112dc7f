// Unpacking one packed soft-label row (fastdistill/softlabels/codec.py says
// the format). Plain functions of bytes, the same for the CPU kernels and the
// CUDA decode kernel (softlabels_cuda.cu): FD_HD marks them host + device.
//
// Row (little-endian): [tail float32, topk only] [k values] [k ids of id_bits,
// bit-packed LSB-first]. Values: topk 16-bit float16 log-probs; topk 8-bit
// codes c (0: probability 0, else raw = 4·log(c/255)); sampled: counts of
// value_bits bits (0: padding, else lp = log(c/k)). A top-k row's raw values
// are renormalized to sum to 1 − tail: lp = raw + log(1 − tail) − lse(raw).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fastdistill {
namespace packed {

// Must match fastdistill.softlabels.codec.METHODS.
enum Method : int64_t { kTopK = 0, kSampled = 1 };

// Codec.layout() in Python: the numbers a kernel needs, in this order.
struct Layout {
  int64_t method, vocab_size, k, value_bits, id_bits, values_offset, ids_offset, row_bytes;
};
constexpr int kLayoutFields = 8;

FD_HD double neg_inf() { return -HUGE_VAL; }  // a plain constant: also in device code

// Bits [bit, bit + width) of a little-endian bit stream (width ≤ 31); reads
// only the bytes those bits touch.
FD_HD uint32_t read_bits(const uint8_t* p, int64_t bit, int width) {
  const uint8_t* q = p + (bit >> 3);
  const int shift = int(bit & 7);
  const int nbytes = (shift + width + 7) >> 3;
  uint64_t v = 0;
  for (int i = 0; i < nbytes; ++i) v |= uint64_t(q[i]) << (8 * i);
  return uint32_t((v >> shift) & ((uint64_t(1) << width) - 1));
}

FD_HD float read_f32(const uint8_t* p) {
  float f;
  memcpy(&f, p, sizeof f);
  return f;
}

// IEEE binary16 → float, exactly (normals, subnormals, ±inf, NaN).
FD_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

FD_HD int64_t id_at(const Layout& L, const uint8_t* row, int64_t i) {
  return int64_t(read_bits(row + L.ids_offset, i * L.id_bits, int(L.id_bits)));
}

FD_HD float tail_of(const Layout& L, const uint8_t* row) {
  return L.method == kTopK ? read_f32(row) : 0.f;
}

// Entry i's value before renormalization; -inf: padding or probability 0.
FD_HD double raw_value(const Layout& L, const uint8_t* row, int64_t i) {
  const uint8_t* vals = row + L.values_offset;
  if (L.method == kSampled) {
    const uint32_t c = read_bits(vals, i * L.value_bits, int(L.value_bits));
    return c ? log(double(c) / double(L.k)) : neg_inf();
  }
  if (L.value_bits == 16) {
    const uint16_t h = uint16_t(vals[2 * i]) | uint16_t(uint16_t(vals[2 * i + 1]) << 8);
    return double(half_bits_to_float(h));
  }
  const uint8_t c = vals[i];
  return c ? 4.0 * log(double(c) / 255.0) : neg_inf();
}

// What to add to every raw value of the row: log(1 − tail) − lse(raw) for
// top-k (0 when no entry has mass); 0 for sampled rows (counts are exact).
FD_HD double row_shift(const Layout& L, const uint8_t* row) {
  if (L.method != kTopK) return 0.0;
  double m = neg_inf();
  for (int64_t i = 0; i < L.k; ++i) {
    const double r = raw_value(L, row, i);
    m = r > m ? r : m;
  }
  if (!(m > neg_inf())) return 0.0;
  double s = 0.0;
  for (int64_t i = 0; i < L.k; ++i) s += exp(raw_value(L, row, i) - m);
  return log1p(-double(tail_of(L, row))) - (m + log(s));
}

}  // namespace packed
}  // namespace fastdistill
