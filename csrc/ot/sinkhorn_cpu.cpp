// CPU kernels of log-domain Sinkhorn on a given (materialized) cost
// (fastdistill/ot.py's ``sinkhorn`` and the tensorized ``sinkhorn_divergence``;
// the spec is ot.py's ``_iterate`` / ``_iterate_symmetric``).
//
// C is (B, N, M) row-major, float32, bfloat16 or float16, read in its dtype;
// everything else (potentials, exponents, sums) is float32, row sums of the
// plan in double. With l_i = f_i/ε + log a_i and h_j = g_j/ε + log b_j:
//   f update (row pass):    f_i = −ε LSE_j(h_j − C_ij/ε)
//   g update (column pass): g_j = −ε LSE_i(l_i − C_ij/ε)
// Both passes walk C row by row, once per half-step:
//   rows:    each row is read once from memory into an L1 buffer of its
//            exponents (max in the same sweep), then Σ exp(e − max);
//   columns: blocks of kR rows are swept together, per column vector first
//            the block's max, then the running max m_j and sum s_j of the
//            thread's rows are updated (s_j rescaled by exp(m_old − m_new):
//            1/kR extra exponential per entry), the block's rows are re-read
//            from L1. Each task owns a slice of kSlice rows and its own (m, s);
//            the slices are merged per column at the end. No transposed copy:
//            measured at 4096², the column pass costs ~1.3x a row pass, so a
//            copy (one more N×M buffer) would save ~10% of a solve.
// From the second round on, each half-step is ONE sweep: the previous
// potential gives the shift (−f_old/ε ≈ the new LSE), and the exact
// max-shifted passes above only run where that shifted sum leaves [2⁻⁶⁰, 2⁶⁰]
// (early rounds, ε-scaling jumps).
// The whole loop runs in one op (sinkhorn_solve): no Python per half-step and
// nothing for torch.compile to trace but one node. With tol > 0 each problem
// stops (its f, g frozen) at the first round whose row-marginal L1 error
// Σ_i |a_i exp((f_i − f_new_i)/ε) − a_i| is below tol, exactly as ot.py's
// reference; the op returns once every problem has stopped.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/vec.h"

namespace fastdistill {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kR = 16;       // rows per block of the column pass
constexpr int64_t kSlice = 256;  // rows per (task-owned) slice of the column pass
constexpr float kInf = std::numeric_limits<float>::infinity();

// kVec costs from p as floats.
template <typename T>
inline Vec load_f(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float<T>(p, out);
    return out;
  }
}

// The exponential of the log-sum-exp sums (arguments <= 0 except the column
// pass's rescaling): ATen's 20-ULP polynomial, ~2e-6 relative, which moves a
// potential by ~ε·2e-6; the plan and the value use the Sleef exp (1 ULP).
inline Vec lse_exp(const Vec& x) { return x.exp_u20(); }

// A running max with its -inf lanes (columns with no mass yet) set to 0, so
// that exp(x − m) never computes −inf − (−inf).
inline Vec finite_or_zero(const Vec& m) { return Vec::blendv(m, Vec(0.f), m == Vec(-kInf)); }

// LSE_j(h_j − c_j/ε) over one row of M costs; e: M floats of scratch.
template <typename T>
float row_lse(const T* c, const float* h, int64_t M, float inv_eps, float* e) {
  const Vec ie(inv_eps);
  Vec vm(-kInf);
  int64_t j = 0;
  for (; j + kVec <= M; j += kVec) {
    const Vec x = Vec::loadu(h + j) - load_f(c + j) * ie;
    x.store(e + j);
    vm = at::vec::maximum(vm, x);
  }
  float m = hmax(vm);
  for (; j < M; ++j) {
    e[j] = h[j] - static_cast<float>(c[j]) * inv_eps;
    m = nan_max(m, e[j]);
  }
  if (!std::isfinite(m)) return m;  // -inf: no mass at all; NaN / inf propagate
  const Vec vmm(m);
  Vec s0(0.f), s1(0.f);
  for (j = 0; j + 2 * kVec <= M; j += 2 * kVec) {
    s0 = s0 + lse_exp(Vec::loadu(e + j) - vmm);
    s1 = s1 + lse_exp(Vec::loadu(e + j + kVec) - vmm);
  }
  for (; j + kVec <= M; j += kVec) s0 = s0 + lse_exp(Vec::loadu(e + j) - vmm);
  float s = hsum(s0 + s1);
  for (; j < M; ++j) s += std::exp(e[j] - m);
  return m + std::log(s);
}

// A shifted sum Σ exp(x − shift) is used as it is when it lands in [kLo, kHi]:
// then no term overflowed, the largest terms are normal floats, and
// LSE = shift + log(sum) exactly as with the max as shift; otherwise the pass
// is redone with the max (two sweeps).
constexpr float kLo = 0x1p-60f, kHi = 0x1p60f;
inline bool in_range(float s) { return s >= kLo && s <= kHi; }  // NaN: false

// Σ_j exp(h_j − c_j/ε − shift) over one row, one sweep.
template <typename T>
float row_sum_shifted(const T* c, const float* h, int64_t M, float inv_eps, float shift) {
  const Vec ie(inv_eps), vsh(shift);
  Vec s0(0.f), s1(0.f);
  int64_t j = 0;
  for (; j + 2 * kVec <= M; j += 2 * kVec) {
    s0 = s0 + lse_exp(Vec::loadu(h + j) - at::vec::fmadd(load_f(c + j), ie, vsh));
    s1 = s1 + lse_exp(Vec::loadu(h + j + kVec) - at::vec::fmadd(load_f(c + j + kVec), ie, vsh));
  }
  for (; j + kVec <= M; j += kVec) s0 = s0 + lse_exp(Vec::loadu(h + j) - at::vec::fmadd(load_f(c + j), ie, vsh));
  float s = hsum(s0 + s1);
  for (; j < M; ++j) s += std::exp(h[j] - (static_cast<float>(c[j]) * inv_eps + shift));
  return s;
}

// The column pass with a fixed per-column shift sh (one sweep): s_j =
// Σ_i exp(l_i − C_ij/ε − sh_j) over rows [r0, r1) of one problem.
template <typename T>
void col_sums_shifted(const T* C, const float* l, int64_t r0, int64_t r1, int64_t M, float inv_eps,
                      const float* sh, float* s) {
  std::fill(s, s + M, 0.f);
  const Vec ie(inv_eps);
  const T* cp[kR];
  float lv[kR];
  for (int64_t i0 = r0; i0 < r1; i0 += kR) {
    int64_t k = 0;
    for (int64_t i = i0; i < std::min(r1, i0 + kR); ++i) {
      if (l[i] == -kInf) continue;
      cp[k] = C + i * M;
      lv[k++] = l[i];
    }
    if (k == 0) continue;
    int64_t j = 0;
    for (; j + kVec <= M; j += kVec) {
      const Vec vsh = Vec::loadu(sh + j);
      Vec acc = Vec::loadu(s + j);
      for (int64_t q = 0; q < k; ++q) acc = acc + lse_exp(Vec(lv[q]) - at::vec::fmadd(load_f(cp[q] + j), ie, vsh));
      acc.store(s + j);
    }
    for (; j < M; ++j) {
      float acc = s[j];
      for (int64_t q = 0; q < k; ++q) acc += std::exp(lv[q] - (static_cast<float>(cp[q][j]) * inv_eps + sh[j]));
      s[j] = acc;
    }
  }
}

// The column pass over rows [r0, r1) of one problem: running per-column max
// m and sum s (M floats each, owned by the caller) of exp(l_i − C_ij/ε).
template <typename T>
void col_lse_rows(const T* C, const float* l, int64_t r0, int64_t r1, int64_t M, float inv_eps, float* m,
                  float* s) {
  std::fill(m, m + M, -kInf);
  std::fill(s, s + M, 0.f);
  const Vec ie(inv_eps);
  const T* cp[kR];
  float lv[kR];
  for (int64_t i0 = r0; i0 < r1; i0 += kR) {
    int64_t k = 0;
    for (int64_t i = i0; i < std::min(r1, i0 + kR); ++i) {
      if (l[i] == -kInf) continue;  // a zero weight: nothing to add
      cp[k] = C + i * M;
      lv[k++] = l[i];
    }
    if (k == 0) continue;
    int64_t j = 0;
    for (; j + kVec <= M; j += kVec) {
      Vec bm(-kInf);
      for (int64_t q = 0; q < k; ++q) bm = at::vec::maximum(bm, Vec(lv[q]) - load_f(cp[q] + j) * ie);
      const Vec mo = Vec::loadu(m + j);
      const Vec mn = finite_or_zero(at::vec::maximum(mo, bm));
      Vec acc = Vec::loadu(s + j) * lse_exp(mo - mn);
      for (int64_t q = 0; q < k; ++q) acc = acc + lse_exp(Vec(lv[q]) - load_f(cp[q] + j) * ie - mn);
      mn.store(m + j);
      acc.store(s + j);
    }
    for (; j < M; ++j) {
      float bm = -kInf;
      for (int64_t q = 0; q < k; ++q) bm = nan_max(bm, lv[q] - static_cast<float>(cp[q][j]) * inv_eps);
      float mn = nan_max(m[j], bm);
      if (mn == -kInf) mn = 0.f;
      float acc = s[j] * std::exp(m[j] - mn);
      for (int64_t q = 0; q < k; ++q) acc += std::exp(lv[q] - static_cast<float>(cp[q][j]) * inv_eps - mn);
      m[j] = mn;
      s[j] = acc;
    }
  }
}

// Calls fn(T{}) with T the C++ type of a float32 / bfloat16 / float16 dtype.
template <typename F>
void dispatch_cost(at::ScalarType t, const char* op, F&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    case at::kHalf: return fn(c10::Half{});
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

void check_cost(const char* op, const at::Tensor& C) {
  TORCH_CHECK(C.dim() == 3, op, ": cost must be (B, N, M), got ", C.sizes());
  TORCH_CHECK(C.scalar_type() == at::kFloat || C.scalar_type() == at::kBFloat16 || C.scalar_type() == at::kHalf,
              op, ": cost must be float32, bfloat16 or float16, got ", C.scalar_type());
  TORCH_CHECK(C.is_contiguous(), op, ": cost must be contiguous");
  TORCH_CHECK(C.device().is_cpu(), op, ": cost must be a CPU tensor");
}

void check_vec(const char* op, const char* name, const at::Tensor& t, int64_t B, int64_t n) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == n && t.scalar_type() == at::kFloat &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous float32 (", B, ", ", n, ") tensor, got ", t.sizes(), " ",
              t.scalar_type());
}

std::vector<double> schedule(const char* op, const at::Tensor& eps) {
  TORCH_CHECK(eps.dim() == 1 && eps.size(0) >= 1 && eps.device().is_cpu(), op,
              ": eps must be a 1-d CPU tensor of at least one ε per round, got ", eps.sizes());
  const at::Tensor e = eps.to(at::kDouble).contiguous();
  std::vector<double> out(e.data_ptr<double>(), e.data_ptr<double>() + e.numel());
  for (double v : out) TORCH_CHECK(v > 0 && std::isfinite(v), op, ": every ε must be finite and > 0, got ", v);
  return out;
}

// fn(i) for i in [0, n), tasks handed out one by one to the threads (an
// atomic counter): on a machine shared with other jobs a preempted thread
// delays one small task, not a static half of the pass.
template <typename F>
void dynamic_for(int64_t n, F&& fn) {
  const int64_t T = std::min<int64_t>(at::get_num_threads(), n);
  if (T <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, T, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i);
  });
}

// The solver state of one call: the cost and the per-problem work buffers.
template <typename T>
struct Solver {
  const T* C;
  int64_t B, N, M;
  std::vector<char> live;  // problems still iterating
  std::vector<float> ms;   // column pass: (B, chunks, 2, M) running max and sum
  std::vector<float> shv;  // column pass: (B, M) shifts of the one-sweep pass
  int64_t chunks = 1;

  Solver(const T* C_, int64_t B_, int64_t N_, int64_t M_) : C(C_), B(B_), N(N_), M(M_), live(B_, 1) {}

  // out_b,i = −ε LSE_j(h_b,j − C_b,ij/ε) for the live problems (h: (B, M)).
  // prev (or null): the previous values of out, whose −prev/ε is the shift
  // of a one-sweep sum (see kLo, kHi); rows where it fails take two sweeps.
  void rows(const float* h, double eps, float* out, const float* prev) const {
    const float inv_eps = static_cast<float>(1.0 / eps);
    const int64_t grain = std::max<int64_t>(1, 16384 / M);  // rows per task
    dynamic_for((B * N + grain - 1) / grain, [&](int64_t task) {
      thread_local std::vector<float> e;
      for (int64_t t = task * grain; t < std::min(B * N, (task + 1) * grain); ++t) {
        if (!live[t / N]) continue;
        const T* c = C + t * M;
        const float* hb = h + (t / N) * M;
        float lse;
        const float sh = prev ? -prev[t] * inv_eps : 0.f;
        const float sm = prev && std::isfinite(sh) ? row_sum_shifted(c, hb, M, inv_eps, sh) : 0.f;
        if (in_range(sm)) {
          lse = sh + std::log(sm);
        } else {
          e.resize(M);
          lse = row_lse(c, hb, M, inv_eps, e.data());
        }
        out[t] = static_cast<float>(-eps * lse);
      }
    });
  }

  // out_b,j = −ε LSE_i(l_b,i − C_b,ij/ε) for the live problems (l: (B, N)).
  // prev (or null): the previous values of out (may be out itself), whose
  // −prev/ε shifts a one-sweep pass; a problem with a column where that
  // fails is redone with the running max (see col_lse_rows).
  void cols(const float* l, double eps, float* out, const float* prev) {
    if (ms.empty()) {
      // slices of kSlice rows, whatever the batch and the thread count: the
      // sums (and so the results) are the same for a problem alone or in a batch
      chunks = (N + kSlice - 1) / kSlice;
      ms.resize(static_cast<size_t>(B * chunks * 2 * M));
      shv.resize(static_cast<size_t>(B * M));
    }
    const float inv_eps = static_cast<float>(1.0 / eps);
    std::vector<char> exact(B, prev ? 0 : 1);
    if (prev) {
      for (int64_t b = 0; b < B; ++b) {
        if (!live[b]) continue;
        for (int64_t j = b * M; j < (b + 1) * M; ++j) {
          shv[j] = -prev[j] * inv_eps;
          if (!std::isfinite(shv[j])) exact[b] = 1;
        }
      }
      dynamic_for(B * chunks, [&](int64_t t) {
        const int64_t b = t / chunks, c = t % chunks;
        if (!live[b] || exact[b]) return;
        const int64_t r0 = std::min(N, c * kSlice), r1 = std::min(N, (c + 1) * kSlice);
        col_sums_shifted(C + b * N * M, l + b * N, r0, r1, M, inv_eps, shv.data() + b * M, ms.data() + t * 2 * M);
      });
      for (int64_t b = 0; b < B; ++b) {
        if (!live[b] || exact[b]) continue;
        const float* base = ms.data() + b * chunks * 2 * M;
        float* ob = out + b * M;
        for (int64_t j = 0; j < M && !exact[b]; ++j) {
          float sm = 0.f;
          for (int64_t c = 0; c < chunks; ++c) sm += base[c * 2 * M + j];
          if (!in_range(sm)) exact[b] = 1;
          ob[j] = sm;  // the sums for now; the potentials once every column passed
        }
        if (!exact[b]) {
          for (int64_t j = 0; j < M; ++j) ob[j] = static_cast<float>(-eps * (shv[b * M + j] + std::log(ob[j])));
        }
      }
    }
    dynamic_for(B * chunks, [&](int64_t t) {
      const int64_t b = t / chunks, c = t % chunks;
      if (!live[b] || !exact[b]) return;
      float* m = ms.data() + t * 2 * M;
      const int64_t r0 = std::min(N, c * kSlice), r1 = std::min(N, (c + 1) * kSlice);
      col_lse_rows(C + b * N * M, l + b * N, r0, r1, M, inv_eps, m, m + M);
    });
    // merge the slices of each problem, per column
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if (!live[b] || !exact[b]) continue;
        const float* base = ms.data() + b * chunks * 2 * M;
        for (int64_t j = 0; j < M; ++j) {
          float mx = -kInf;
          for (int64_t c = 0; c < chunks; ++c) mx = nan_max(mx, base[c * 2 * M + j]);
          const float sh = mx == -kInf ? 0.f : mx;
          float sm = 0.f;
          for (int64_t c = 0; c < chunks; ++c) sm += base[c * 2 * M + M + j] * std::exp(base[c * 2 * M + j] - sh);
          out[b * M + j] = static_cast<float>(-eps * (mx + std::log(sm)));
        }
      }
    });
  }
};

// dst_b = lw_b + src_b / ε (the exponent shifts h or l) for the live problems.
void shift(const std::vector<char>& live, const float* lw, const float* src, double eps, float* dst, int64_t B,
           int64_t n) {
  const float inv = static_cast<float>(1.0 / eps);
  for (int64_t b = 0; b < B; ++b) {
    if (!live[b]) continue;
    for (int64_t i = b * n; i < (b + 1) * n; ++i) dst[i] = lw[i] + src[i] * inv;
  }
}

template <typename T>
void solve_impl(const T* C, const float* loga, const float* logb, const std::vector<double>& sched, double tol,
                int64_t B, int64_t N, int64_t M, float* f, float* g) {
  Solver<T> S(C, B, N, M);
  std::vector<float> h(B * M), l(B * N), fn(B * N);
  const int64_t R = static_cast<int64_t>(sched.size());
  std::fill(g, g + B * M, 0.f);
  shift(S.live, logb, g, sched[0], h.data(), B, M);
  S.rows(h.data(), sched[0], f, nullptr);
  for (int64_t it = 0; it < R; ++it) {
    shift(S.live, loga, f, sched[it], l.data(), B, N);
    S.cols(l.data(), sched[it], g, it == 0 ? nullptr : g);
    if (it == R - 1) break;
    const double e1 = sched[it + 1];
    shift(S.live, logb, g, e1, h.data(), B, M);
    S.rows(h.data(), e1, fn.data(), f);
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      if (!S.live[b]) continue;
      float* fb = f + b * N;
      const float* nb = fn.data() + b * N;
      bool stop = false;
      if (tol > 0) {
        // the row marginals of the plan of (f, g): a_i exp((f_i − f_new_i)/ε)
        const float inv = static_cast<float>(1.0 / e1);
        double err = 0.0;
        for (int64_t i = 0; i < N; ++i) {
          const float la = loga[b * N + i];
          err += std::abs(double(std::exp(la + (fb[i] - nb[i]) * inv)) - double(std::exp(la)));
        }
        stop = err < tol;  // NaN never stops
      }
      if (stop) {
        S.live[b] = 0;  // keeps the (f, g) the error was measured on
      } else {
        std::copy(nb, nb + N, fb);
        any = true;
      }
    }
    if (!any) break;
  }
}

template <typename T>
void solve_symmetric_impl(const T* C, const float* loga, const std::vector<double>& sched, int64_t B, int64_t N,
                          float* f) {
  Solver<T> S(C, B, N, N);
  std::vector<float> h(B * N), t(B * N, 0.f);
  shift(S.live, loga, t.data(), sched[0], h.data(), B, N);
  S.rows(h.data(), sched[0], f, nullptr);
  for (double e : sched) {
    shift(S.live, loga, f, e, h.data(), B, N);
    S.rows(h.data(), e, t.data(), f);  // T(f) ≈ f: its shift
    for (int64_t i = 0; i < B * N; ++i) f[i] = 0.5f * (f[i] + t[i]);
  }
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_solve_cpu(const at::Tensor& cost, const at::Tensor& loga,
                                                      const at::Tensor& logb, const at::Tensor& eps, double tol) {
  check_cost("sinkhorn_solve", cost);
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  check_vec("sinkhorn_solve", "loga", loga, B, N);
  check_vec("sinkhorn_solve", "logb", logb, B, M);
  const std::vector<double> sched = schedule("sinkhorn_solve", eps);
  auto f = at::empty({B, N}, loga.options());
  auto g = at::empty({B, M}, logb.options());
  if (B == 0 || N == 0 || M == 0) return {f, g};
  dispatch_cost(cost.scalar_type(), "sinkhorn_solve", [&](auto tag) {
    using scalar_t = decltype(tag);
    solve_impl<scalar_t>(cost.data_ptr<scalar_t>(), loga.data_ptr<float>(), logb.data_ptr<float>(), sched, tol, B,
                         N, M, f.data_ptr<float>(), g.data_ptr<float>());
  });
  return {f, g};
}

at::Tensor sinkhorn_solve_symmetric_cpu(const at::Tensor& cost, const at::Tensor& loga, const at::Tensor& eps) {
  check_cost("sinkhorn_solve_symmetric", cost);
  const int64_t B = cost.size(0), N = cost.size(1);
  TORCH_CHECK(cost.size(2) == N, "sinkhorn_solve_symmetric: cost must be square, got ", cost.sizes());
  check_vec("sinkhorn_solve_symmetric", "loga", loga, B, N);
  const std::vector<double> sched = schedule("sinkhorn_solve_symmetric", eps);
  auto f = at::empty({B, N}, loga.options());
  if (B == 0 || N == 0) return f;
  dispatch_cost(cost.scalar_type(), "sinkhorn_solve_symmetric", [&](auto tag) {
    using scalar_t = decltype(tag);
    solve_symmetric_impl<scalar_t>(cost.data_ptr<scalar_t>(), loga.data_ptr<float>(), sched, B, N,
                                   f.data_ptr<float>());
  });
  return f;
}

// One half-step: dim = 2 gives out (B, N) = −ε LSE_j(h_j − C_ij/ε) with h (B, M);
// dim = 1 gives out (B, M) = −ε LSE_i(h_i − C_ij/ε) with h (B, N).
at::Tensor sinkhorn_softmin_cpu(const at::Tensor& cost, const at::Tensor& h, double eps, int64_t dim) {
  check_cost("sinkhorn_softmin", cost);
  TORCH_CHECK(dim == 1 || dim == 2, "sinkhorn_softmin: dim must be 1 or 2, got ", dim);
  TORCH_CHECK(eps > 0, "sinkhorn_softmin: eps must be > 0");
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  check_vec("sinkhorn_softmin", "h", h, B, dim == 2 ? M : N);
  auto out = at::empty({B, dim == 2 ? N : M}, h.options());
  if (B == 0 || N == 0 || M == 0) return out;
  dispatch_cost(cost.scalar_type(), "sinkhorn_softmin", [&](auto tag) {
    using scalar_t = decltype(tag);
    Solver<scalar_t> S(cost.data_ptr<scalar_t>(), B, N, M);
    if (dim == 2) {
      S.rows(h.data_ptr<float>(), eps, out.data_ptr<float>(), nullptr);
    } else {
      S.cols(h.data_ptr<float>(), eps, out.data_ptr<float>(), nullptr);
    }
  });
  return out;
}

// Calls body(b, i, row of C, exponent row) for every row, in parallel, where
// the exponents x_j = (f_i + g_j − C_ij)/ε + log a_i + log b_j (kVec at a time,
// then the scalar tail) have been written into the row buffer.
template <typename T, typename F>
void plan_rows(const T* C, const float* f, const float* g, const float* loga, const float* logb, double eps,
               int64_t B, int64_t N, int64_t M, F&& body) {
  const float inv_eps = static_cast<float>(1.0 / eps);
  const int64_t grain = std::max<int64_t>(1, 16384 / M);
  at::parallel_for(0, B * N, grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> x(M);
    const Vec ie(inv_eps);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / N;
      const T* c = C + t * M;
      const float* gb = g + b * M;
      const float* lb = logb + b * M;
      const Vec fi(f[t]), lai(loga[t]);
      int64_t j = 0;
      for (; j + kVec <= M; j += kVec) {
        const Vec v = (fi + Vec::loadu(gb + j) - load_f(c + j)) * ie + (lai + Vec::loadu(lb + j));
        v.exp().store(x.data() + j);
      }
      for (; j < M; ++j) x[j] = std::exp((f[t] + gb[j] - static_cast<float>(c[j])) * inv_eps + (loga[t] + lb[j]));
      body(b, t, c, x.data());
    }
  });
}

void check_plan_args(const char* op, const at::Tensor& cost, const at::Tensor& f, const at::Tensor& g,
                     const at::Tensor& loga, const at::Tensor& logb, double eps) {
  check_cost(op, cost);
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  check_vec(op, "f", f, B, N);
  check_vec(op, "g", g, B, M);
  check_vec(op, "loga", loga, B, N);
  check_vec(op, "logb", logb, B, M);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0");
}

// P (B, N, M) = scale_b · exp((f_i + g_j − C_ij)/ε + log a_i + log b_j), in dtype.
at::Tensor sinkhorn_plan_cpu(const at::Tensor& cost, const at::Tensor& f, const at::Tensor& g, const at::Tensor& loga,
                             const at::Tensor& logb, double eps, const std::optional<at::Tensor>& scale,
                             at::ScalarType dtype) {
  check_plan_args("sinkhorn_plan", cost, f, g, loga, logb, eps);
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "sinkhorn_plan: dtype must be float32, bfloat16 or float16, got ", dtype);
  const float* sp = nullptr;
  if (scale.has_value()) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == B && scale->scalar_type() == at::kFloat &&
                    scale->is_contiguous(),
                "sinkhorn_plan: scale must be a contiguous float32 (", B, ",) tensor");
    sp = scale->data_ptr<float>();
  }
  auto out = at::empty({B, N, M}, cost.options().dtype(dtype));
  if (out.numel() == 0) return out;
  dispatch_cost(cost.scalar_type(), "sinkhorn_plan", [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = scalar_t;
    dispatch_cost(dtype, "sinkhorn_plan_out", [&](auto tag) {
    using scalar_t = decltype(tag);
      using O = scalar_t;
      O* op = out.data_ptr<O>();
      plan_rows(cost.data_ptr<T>(), f.data_ptr<float>(), g.data_ptr<float>(), loga.data_ptr<float>(),
                logb.data_ptr<float>(), eps, B, N, M, [&](int64_t b, int64_t t, const T*, float* x) {
                  const float s = sp ? sp[b] : 1.f;
                  O* o = op + t * M;
                  int64_t j = 0;
                  if constexpr (std::is_same_v<O, float>) {
                    for (; j + kVec <= M; j += kVec) (Vec::loadu(x + j) * Vec(s)).store(o + j);
                  } else {
                    for (; j + 2 * kVec <= M; j += 2 * kVec) {
                      at::vec::convert_from_float<O>(Vec::loadu(x + j) * Vec(s), Vec::loadu(x + j + kVec) * Vec(s))
                          .store(o + j);
                    }
                  }
                  for (; j < M; ++j) o[j] = static_cast<O>(x[j] * s);
                });
    });
  });
  return out;
}

// value (B,) = Σ_ij P_ij C_ij, the plan never stored; row sums in double.
at::Tensor sinkhorn_value_cpu(const at::Tensor& cost, const at::Tensor& f, const at::Tensor& g, const at::Tensor& loga,
                              const at::Tensor& logb, double eps) {
  check_plan_args("sinkhorn_value", cost, f, g, loga, logb, eps);
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  auto out = at::zeros({B}, f.options());
  if (B == 0 || N == 0 || M == 0) return out;
  std::vector<double> rows(B * N, 0.0);
  dispatch_cost(cost.scalar_type(), "sinkhorn_value", [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = scalar_t;
    plan_rows(cost.data_ptr<T>(), f.data_ptr<float>(), g.data_ptr<float>(), loga.data_ptr<float>(),
              logb.data_ptr<float>(), eps, B, N, M, [&](int64_t, int64_t t, const T* c, float* x) {
                Vec acc(0.f);
                int64_t j = 0;
                for (; j + kVec <= M; j += kVec) acc = at::vec::fmadd(Vec::loadu(x + j), load_f(c + j), acc);
                double s = hsum(acc);
                for (; j < M; ++j) s += double(x[j]) * static_cast<float>(c[j]);
                rows[t] = s;
              });
  });
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    double s = 0.0;
    for (int64_t i = 0; i < N; ++i) s += rows[b * N + i];
    op[b] = static_cast<float>(s);
  }
  return out;
}

}  // namespace

// Shapes only, so that the ops trace under torch.compile.
std::tuple<at::Tensor, at::Tensor> sinkhorn_solve_meta(const at::Tensor& cost, const at::Tensor& loga,
                                                       const at::Tensor& logb, const at::Tensor&, double) {
  return {at::empty_symint({cost.sym_size(0), cost.sym_size(1)}, loga.options()),
          at::empty_symint({cost.sym_size(0), cost.sym_size(2)}, logb.options())};
}

at::Tensor sinkhorn_solve_symmetric_meta(const at::Tensor& cost, const at::Tensor& loga, const at::Tensor&) {
  return at::empty_symint({cost.sym_size(0), cost.sym_size(1)}, loga.options());
}

at::Tensor sinkhorn_softmin_meta(const at::Tensor& cost, const at::Tensor& h, double, int64_t dim) {
  return at::empty_symint({cost.sym_size(0), cost.sym_size(dim == 2 ? 1 : 2)}, h.options());
}

at::Tensor sinkhorn_plan_meta(const at::Tensor& cost, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, double, const std::optional<at::Tensor>&, at::ScalarType dtype) {
  return at::empty_symint(cost.sym_sizes(), cost.options().dtype(dtype));
}

at::Tensor sinkhorn_value_meta(const at::Tensor& cost, const at::Tensor& f, const at::Tensor&, const at::Tensor&,
                               const at::Tensor&, double) {
  return at::empty_symint({cost.sym_size(0)}, f.options());
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("sinkhorn_solve", &sinkhorn_solve_cpu);
  m.impl("sinkhorn_solve_symmetric", &sinkhorn_solve_symmetric_cpu);
  m.impl("sinkhorn_softmin", &sinkhorn_softmin_cpu);
  m.impl("sinkhorn_plan", &sinkhorn_plan_cpu);
  m.impl("sinkhorn_value", &sinkhorn_value_cpu);
}

TORCH_LIBRARY_IMPL(fastdistill, Meta, m) {
  m.impl("sinkhorn_solve", &sinkhorn_solve_meta);
  m.impl("sinkhorn_solve_symmetric", &sinkhorn_solve_symmetric_meta);
  m.impl("sinkhorn_softmin", &sinkhorn_softmin_meta);
  m.impl("sinkhorn_plan", &sinkhorn_plan_meta);
  m.impl("sinkhorn_value", &sinkhorn_value_meta);
}

}  // namespace fastdistill
