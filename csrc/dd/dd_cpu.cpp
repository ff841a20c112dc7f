// CPU kernels of the gradient-matching distance (fastdistill/dd/losses.py):
// every (group, layer, output row) cosine of DC — or every group's cosine of
// "cos" — as one op over the gradients packed into two flat buffers, cut into
// S segments by offsets (S + 1, int64):
//   forward   per segment s: dot_s = ⟨a_s, b_s⟩, |a_s|, |b_s| (float64 sums)
//             the distance is Σ_s (1 − dot_s / (|a_s||b_s| + eps)), summed by the caller
//   backward  with D = |a||b| + eps and upstream g:
//             ∂/∂a = −g (b / D − dot |b| a / (|a| D²)),  ∂/∂b likewise (0 / 0 terms: 0)
// Segments run in parallel; each is a vectorized pass (forward) or two (backward).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>

#include "common/vec.h"

namespace fastdistill {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

void check(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  TORCH_CHECK(a.dim() == 1 && b.dim() == 1 && a.size(0) == b.size(0), op,
              ": a and b must be flat tensors of the same length, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat, op, ": a and b must be float32");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), op, ": a and b must be contiguous");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1 && offsets.scalar_type() == at::kLong &&
                  offsets.is_contiguous(),
              op, ": offsets must be a contiguous int64 (S + 1,) tensor");
  const int64_t* o = offsets.data_ptr<int64_t>();
  const int64_t S = offsets.size(0) - 1;
  TORCH_CHECK(o[0] >= 0 && o[S] <= a.size(0), op, ": offsets out of range");
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(o[s] <= o[s + 1], op, ": offsets must be non-decreasing");
}

at::Tensor segment_cosine_forward_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets) {
  check("segment_cosine_forward", a, b, offsets);
  const int64_t S = offsets.size(0) - 1;
  auto stats = at::empty({S, 3}, a.options().dtype(at::kDouble));  // dot, |a|, |b|
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const int64_t* o = offsets.data_ptr<int64_t>();
  double* st = stats.data_ptr<double>();
  at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t lo = o[s], n = o[s + 1] - o[s];
      Vec dot(0.f), aa(0.f), bb(0.f);
      for (int64_t i = 0; i < n; i += kVec) {
        const int64_t c = std::min(kVec, n - i);
        const Vec x = Vec::loadu(ap + lo + i, c), y = Vec::loadu(bp + lo + i, c);
        dot = at::vec::fmadd(x, y, dot);
        aa = at::vec::fmadd(x, x, aa);
        bb = at::vec::fmadd(y, y, bb);
      }
      st[3 * s] = hsum(dot);
      st[3 * s + 1] = std::sqrt(double(hsum(aa)));
      st[3 * s + 2] = std::sqrt(double(hsum(bb)));
    }
  });
  return stats;
}

std::tuple<at::Tensor, at::Tensor> segment_cosine_backward_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets, const at::Tensor& stats,
    const at::Tensor& grad, double eps) {
  check("segment_cosine_backward", a, b, offsets);
  const int64_t S = offsets.size(0) - 1;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == S && stats.size(1) == 3 && stats.scalar_type() == at::kDouble &&
                  stats.is_contiguous(),
              "segment_cosine_backward: stats must be the (S, 3) float64 output of the forward");
  TORCH_CHECK(grad.numel() == 1, "segment_cosine_backward: grad must hold one number");
  const double g = grad.to(at::kDouble).item<double>();
  auto da = at::zeros_like(a), db = at::zeros_like(b);  // outside every segment: 0
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* dap = da.data_ptr<float>();
  float* dbp = db.data_ptr<float>();
  const int64_t* o = offsets.data_ptr<int64_t>();
  const double* st = stats.data_ptr<double>();
  at::parallel_for(0, S, 16, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const double dot = st[3 * s], na = st[3 * s + 1], nb = st[3 * s + 2];
      const double D = na * nb + eps;
      // ∂/∂a = ka·b + ca·a, ∂/∂b = ka·a + cb·b
      const float k = float(-g / D);
      const float ca = na > 0 ? float(g * dot * nb / (na * D * D)) : 0.f;
      const float cb = nb > 0 ? float(g * dot * na / (nb * D * D)) : 0.f;
      const Vec vk(k), vca(ca), vcb(cb);
      const int64_t lo = o[s], n = o[s + 1] - o[s];
      for (int64_t i = 0; i < n; i += kVec) {
        const int64_t c = std::min(kVec, n - i);
        const Vec x = Vec::loadu(ap + lo + i, c), y = Vec::loadu(bp + lo + i, c);
        (vk * y + vca * x).store(dap + lo + i, c);
        (vk * x + vcb * y).store(dbp + lo + i, c);
      }
    }
  });
  return {da, db};
}

}  // namespace

// Shapes only, so that gradient_match_loss traces under torch.compile.
at::Tensor segment_cosine_forward_meta(const at::Tensor& a, const at::Tensor&, const at::Tensor& offsets) {
  return at::empty_symint({offsets.sym_size(0) - 1, 3}, a.options().dtype(at::kDouble));
}

std::tuple<at::Tensor, at::Tensor> segment_cosine_backward_meta(const at::Tensor& a, const at::Tensor& b, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, double) {
  return {at::empty_like(a), at::empty_like(b)};
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("segment_cosine_forward", &segment_cosine_forward_cpu);
  m.impl("segment_cosine_backward", &segment_cosine_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastdistill, Meta, m) {
  m.impl("segment_cosine_forward", &segment_cosine_forward_meta);
  m.impl("segment_cosine_backward", &segment_cosine_backward_meta);
}

}  // namespace fastdistill
