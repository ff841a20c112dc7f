// CPU kernels of entropic OT between point clouds (fastdistill/ot.py).
//
// The cost C_ij = |x_i − y_j|^p / p is never stored: each thread walks a
// block of kRows rows of x against tiles of kCols points of y and builds the
// tile of costs in a kRows×kCols float buffer (256 KB, in L2), then reduces it
// at once. Extra memory is O(N + M) (per-point norms and row accumulators)
// plus one tile per thread, whatever N and M are.
//   p = 2: C = ½|x|² + ½|y|² − x·y (clamped at 0), the dot products by one
//          sgemm per tile (at::mm_out on views of the clouds: MKL here), so a tile costs d FMAs
//          per entry at GEMM speed and one exponential;
//   p = 1: C = |x − y| from exact differences (the expanded form would lose
//          |x − y| near 0 to the square root of rounding), vectorized over y.
// ot_softmin is the Sinkhorn half-step (the c-transform):
//   out_i = −ε · LSE_j(h_j − C_ij/ε),   h_j = g_j/ε + log b_j,
// an online log-sum-exp across the tiles of a row. ot_transport_grad is the
// envelope gradient: out_i = Σ_j P_ij ∇_x C(x_i, y_j), P_ij = exp(l_i + h_j − C_ij/ε):
//   p = 2: (Σ_j P_ij) x_i − Σ_j P_ij y_j   (the second sum one sgemm per tile)
//   p = 1: (Σ_j W_ij) x_i − Σ_j W_ij y_j,  W_ij = P_ij / C_ij (0 where x_i = y_j).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/vec.h"

namespace fastdistill {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kRows = 256;  // rows of x per task
constexpr int64_t kCols = 256;  // points of y per tile
constexpr float kInf = std::numeric_limits<float>::infinity();

// One problem of the batch: x (N, d), y (M, d), row-major floats.
struct Clouds {
  const float* x;
  const float* y;
  int64_t N, M, d;
  int p;
  float inv_eps;
};

// A row-major (rows, cols) float tensor over memory the caller owns (no copy).
inline at::Tensor blob(const float* p, int64_t rows, int64_t cols) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, at::kFloat);
}

// ½|v|² of each of n points (p = 2 only), accumulated in double.
std::vector<float> half_sq_norms(const float* v, int64_t n, int64_t d) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t k = 0; k < d; ++k) s += double(v[i * d + k]) * v[i * d + k];
    out[i] = float(0.5 * s);
  }
  return out;
}

// ½|x_i|², ½|y_j|² of every problem of the batch (p = 2).
void per_problem_norms(const at::Tensor& x, const at::Tensor& y, std::vector<std::vector<float>>& hx,
                       std::vector<std::vector<float>>& hy) {
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), d = x.size(2);
  hx.resize(B);
  hy.resize(B);
  for (int64_t b = 0; b < B; ++b) {
    hx[b] = half_sq_norms(x.data_ptr<float>() + b * N * d, N, d);
    hy[b] = half_sq_norms(y.data_ptr<float>() + b * M * d, M, d);
  }
}

// Fills tile[r * kCols + c], r < nr, c < nc, for x_{i0+r} and y_{j0+c}: with
// p = 1 the cost |x − y|, with p = 2 the dot product x·y (see RowCosts).
// yt: scratch of d × kCols floats (p = 1: the tile of y transposed).
void cost_tile(const Clouds& P, int64_t i0, int64_t nr, int64_t j0, int64_t nc, float* tile, float* yt) {
  const int64_t d = P.d;
  if (P.p == 2) {
    // tile[r][c] = x_r · y_c: one sgemm into the strided tile (row stride
    // kCols); RowCosts turns it into costs where it is read
    at::Tensor out = at::from_blob(tile, {nr, nc}, {kCols, 1}, at::kFloat);
    at::mm_out(out, blob(P.x + i0 * d, nr, d), blob(P.y + j0 * d, nc, d).t());
    return;
  }
  // p = 1: exact squared distances, four rows at a time sharing each load of y.
  for (int64_t k = 0; k < d; ++k)
    for (int64_t c = 0; c < nc; ++c) yt[k * kCols + c] = P.y[(j0 + c) * d + k];
  for (int64_t r = 0; r < nr; r += 4) {
    const int64_t rr = std::min<int64_t>(4, nr - r);
    const float* xr[4];
    for (int64_t q = 0; q < 4; ++q) xr[q] = P.x + (i0 + r + std::min(q, rr - 1)) * d;
    for (int64_t c = 0; c < nc; c += kVec) {
      const int64_t n = std::min(kVec, nc - c);
      Vec acc[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
      for (int64_t k = 0; k < d; ++k) {
        const Vec yv = Vec::loadu(yt + k * kCols + c, n);
        for (int64_t q = 0; q < 4; ++q) {
          const Vec diff = Vec(xr[q][k]) - yv;
          acc[q] = at::vec::fmadd(diff, diff, acc[q]);
        }
      }
      for (int64_t q = 0; q < rr; ++q) acc[q].sqrt().store(tile + (r + q) * kCols + c, n);
    }
  }
}

// The costs of a tile row from what cost_tile left there: p = 2 from the dot
// products, ½|x_r|² + ½|y_c|² − x_r·y_c clamped at 0 (the clamp only
// removes rounding below 0); p = 1 as they are. hx_r = ½|x_r|², hy[c] = ½|y_c|².
struct RowCosts {
  const float* t;
  const float* hy;  // p = 2 only
  float hx_r;
  int p;
  Vec at(int64_t c) const {
    const Vec v = Vec::loadu(t + c);
    return p == 2 ? at::vec::maximum(Vec(hx_r) + Vec::loadu(hy + c) - v, Vec(0.f)) : v;
  }
  float at1(int64_t c) const { return p == 2 ? std::max(0.f, hx_r + hy[c] - t[c]) : t[c]; }
};

// Calls body(b, i0, nr) for every block of kRows rows of every problem, in parallel.
template <typename F>
void over_row_blocks(int64_t B, int64_t N, F&& body) {
  const int64_t per = (N + kRows - 1) / kRows;
  at::parallel_for(0, B * per, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / per, i0 = (t % per) * kRows;
      body(b, i0, std::min(kRows, N - i0));
    }
  });
}

void check_clouds(const char* op, const at::Tensor& x, const at::Tensor& y, int64_t p, double eps) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.size(0) == y.size(0) && x.size(2) == y.size(2), op,
              ": x and y must be (B, N, d) and (B, M, d), got ", x.sizes(), " and ", y.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat, op, ": x and y must be float32");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous(), op, ": x and y must be contiguous");
  TORCH_CHECK(p == 1 || p == 2, op, ": p must be 1 or 2, got ", p);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0");
}

void check_potential(const char* op, const char* name, const at::Tensor& t, int64_t B, int64_t n) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == n && t.scalar_type() == at::kFloat &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous float32 (", B, ", ", n, ") tensor, got ", t.sizes());
}

Clouds problem(const at::Tensor& x, const at::Tensor& y, int64_t b, int64_t p, double eps) {
  const int64_t N = x.size(1), M = y.size(1), d = x.size(2);
  return {x.data_ptr<float>() + b * N * d, y.data_ptr<float>() + b * M * d, N, M, d, int(p), float(1.0 / eps)};
}

// Walks the tiles of one block of rows of problem b: builds each tile's costs,
// calls row(r, j0, nc, costs, t) for each of its rows (t: the row's floats, free
// to overwrite), then tile_done(j0, nc, tile) once the tile's rows are done.
template <typename Row, typename Done>
void walk_tiles(const Clouds& P, const std::vector<std::vector<float>>& hx, const std::vector<std::vector<float>>& hy,
                int64_t b, int64_t i0, int64_t nr, Row&& row, Done&& tile_done) {
  std::vector<float> tile(kRows * kCols), yt(P.p == 1 ? P.d * kCols : 0);
  for (int64_t j0 = 0; j0 < P.M; j0 += kCols) {
    const int64_t nc = std::min(kCols, P.M - j0);
    cost_tile(P, i0, nr, j0, nc, tile.data(), yt.data());
    for (int64_t r = 0; r < nr; ++r) {
      float* t = tile.data() + r * kCols;
      const RowCosts rc{t, P.p == 2 ? hy[b].data() + j0 : nullptr, P.p == 2 ? hx[b][i0 + r] : 0.f, P.p};
      row(r, j0, nc, rc, t);
    }
    tile_done(j0, nc, tile.data());
  }
}

at::Tensor ot_softmin_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& h, double eps, int64_t p) {
  check_clouds("ot_softmin", x, y, p, eps);
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), d = x.size(2);
  check_potential("ot_softmin", "h", h, B, M);
  auto out = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return out;
  std::vector<std::vector<float>> hx, hy;
  if (p == 2) per_problem_norms(x, y, hx, hy);
  const float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  over_row_blocks(B, N, [&](int64_t b, int64_t i0, int64_t nr) {
    const Clouds P = problem(x, y, b, p, eps);
    float m[kRows], s[kRows];
    std::fill(m, m + nr, -kInf);
    std::fill(s, s + nr, 0.f);
    const float* hb = hp + b * M;
    const Vec inv_eps(P.inv_eps);
    walk_tiles(P, hx, hy, b, i0, nr, [&](int64_t r, int64_t j0, int64_t nc, const RowCosts& rc, float* t) {
        // the tile row's exponents (over its costs, in place) and their max, then Σ e^{· − max}
        Vec vm(-kInf);
        int64_t c = 0;
        for (; c + kVec <= nc; c += kVec) {
          const Vec e = Vec::loadu(hb + j0 + c) - rc.at(c) * inv_eps;
          e.store(t + c);
          vm = at::vec::maximum(vm, e);
        }
        float tm = hmax(vm);
        for (; c < nc; ++c) {
          t[c] = hb[j0 + c] - rc.at1(c) * P.inv_eps;
          tm = std::max(tm, t[c]);
        }
        if (tm == -kInf) return;  // only zero weights in this tile
        const Vec vtm(tm);
        Vec vs(0.f);
        for (c = 0; c + kVec <= nc; c += kVec) vs = vs + (Vec::loadu(t + c) - vtm).exp_u20();
        float ts = hsum(vs);
        for (; c < nc; ++c) ts += std::exp(t[c] - tm);
        if (tm > m[r]) {
          s[r] = s[r] * std::exp(m[r] - tm) + ts;
          m[r] = tm;
        } else {
          s[r] += ts * std::exp(tm - m[r]);
        }
      }, [](int64_t, int64_t, const float*) {});
    for (int64_t r = 0; r < nr; ++r) op[b * N + i0 + r] = -(m[r] + std::log(s[r])) / P.inv_eps;
  });
  return out;
}

at::Tensor ot_transport_grad_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& l, const at::Tensor& h,
                                 double eps, int64_t p) {
  check_clouds("ot_transport_grad", x, y, p, eps);
  const int64_t B = x.size(0), N = x.size(1), M = y.size(1), d = x.size(2);
  check_potential("ot_transport_grad", "l", l, B, N);
  check_potential("ot_transport_grad", "h", h, B, M);
  auto out = at::zeros({B, N, d}, x.options());
  if (B == 0 || N == 0 || d == 0) return out;
  std::vector<std::vector<float>> hx, hy;
  if (p == 2) per_problem_norms(x, y, hx, hy);
  const float* lp = l.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  float* op = out.data_ptr<float>();
  over_row_blocks(B, N, [&](int64_t b, int64_t i0, int64_t nr) {
    const Clouds P = problem(x, y, b, p, eps);
    std::vector<double> rowsum(nr, 0.0);
    float* acc = op + (b * N + i0) * d;  // Σ_j W_ij y_j accumulates here, then becomes the result
    at::Tensor acc_t = blob(acc, nr, d);
    const float* hb = hp + b * M;
    const Vec inv_eps(P.inv_eps), zero(0.f);
    walk_tiles(P, hx, hy, b, i0, nr, [&](int64_t r, int64_t j0, int64_t nc, const RowCosts& rc, float* t) {
        const float lr = lp[b * N + i0 + r];
        const Vec vl(lr);
        Vec vs(0.f);
        int64_t c = 0;
        for (; c + kVec <= nc; c += kVec) {
          const Vec cost = rc.at(c);
          Vec w = (vl + Vec::loadu(hb + j0 + c) - cost * inv_eps).exp_u20();
          if (p == 1) w = Vec::blendv(zero, w / cost, cost > zero);
          w.store(t + c);
          vs = vs + w;
        }
        double rs = hsum(vs);
        for (; c < nc; ++c) {
          const float cost = rc.at1(c);
          float w = std::exp(lr + hb[j0 + c] - cost * P.inv_eps);
          if (p == 1) w = cost > 0.f ? w / cost : 0.f;
          t[c] = w;
          rs += w;
        }
        rowsum[r] += rs;
      }, [&](int64_t j0, int64_t nc, const float* tile) {
        // acc (nr × d) += W-tile (nr × nc) · Y-block (nc × d), one sgemm
        acc_t.addmm_(at::from_blob(const_cast<float*>(tile), {nr, nc}, {kCols, 1}, at::kFloat),
                     blob(P.y + j0 * d, nc, d));
      });
    for (int64_t r = 0; r < nr; ++r) {
      const float* xr = P.x + (i0 + r) * d;
      for (int64_t k = 0; k < d; ++k) acc[r * d + k] = float(rowsum[r] * xr[k] - acc[r * d + k]);
    }
  });
  return out;
}

}  // namespace

// Shapes only, so that the ops trace under torch.compile.
at::Tensor ot_softmin_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, double, int64_t) {
  return at::empty_symint({x.sym_size(0), x.sym_size(1)}, x.options());
}

at::Tensor ot_transport_grad_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                  int64_t) {
  return at::empty_like(x, at::MemoryFormat::Contiguous);
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("ot_softmin", &ot_softmin_cpu);
  m.impl("ot_transport_grad", &ot_transport_grad_cpu);
}

TORCH_LIBRARY_IMPL(fastdistill, Meta, m) {
  m.impl("ot_softmin", &ot_softmin_meta);
  m.impl("ot_transport_grad", &ot_transport_grad_meta);
}

}  // namespace fastdistill
