// CPU kernels of the KD divergence family (fastdistill/kd/loss.py).
//
// One fused kernel per row of (N, V) logits, with two rows of float scratch
// per thread (they stay in cache):
//   pass 1  reads z and z_t once: online max / sum-exp of u = z/T and
//           v = z_t/T (or of the TAID mixture), stores the exponentials, and
//           sums the closed-form loss of forward_kl / reverse_kl / taid;
//   pass 2  (jsd, tvd, skew_*) the loss and the row constant K of the gradient;
//   pass 3  writes d loss / d z from the scratch rows, without an exp.
// Rows are spread over threads; when there are fewer rows than threads each
// row's vocabulary is split instead. The formulas are those of
// shared/notes/kd-math.md §1, with every gradient taken w.r.t. u and then
// chained through 1/T.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common/memory.h"
#include "common/divergences.h"
#include "common/vec.h"

namespace fastdistill {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kBlock = 2048;  // elements per block; the block buffers live in L1/L2
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Params {
  int64_t div;
  float inv_t;       // 1 / temperature
  float param;       // beta (jsd), skew (skew_*), t (taid)
  float log_wp;      // log weight of p in the mixture m (jsd, skew_*)
  float log_wq;      // log weight of q in the mixture m
  bool ce;           // hard_weight > 0
  bool ce_own_lse;   // the CE term needs softmax(z) at T=1, distinct from q
  float c_soft;      // d row_loss/d u  ->  d loss/d z : grad_scale*soft_scale*(1-hw)/T
  float c_hard;      // grad_scale * hard_weight
};

// The exponentials of pass 1 (two per element, the kernel's main cost) use
// ATen's exp_u20: within 20 ulp (~1e-6 relative), 1.5x faster than Sleef's
// exp here; it flushes results below FLT_MIN (probabilities < 1e-38) to 0.

// Online log-sum-exp: max m, s = sum e^{x-m}, a = sum e^{x-m} * d for a side term d.
struct Lse {
  double m = -kInf;
  double s = 0.0;
  double a = 0.0;
  void merge(const Lse& o) {
    if (o.m == -kInf) return;
    if (m == -kInf) {
      *this = o;
      return;
    }
    if (o.m > m) {
      const double r = std::exp(m - o.m);
      s = s * r + o.s;
      a = a * r + o.a;
      m = o.m;
    } else {
      const double r = std::exp(o.m - m);
      s += o.s * r;
      a += o.a * r;
    }
  }
  double lse() const { return m + std::log(s); }
};

struct Pass1 {
  Lse u, v, w, z;  // student/T, teacher/T, TAID mixture, student at T=1
  // The raw maxima of both rows, NaN-propagating: a non-finite one marks a
  // row that is no distribution (the non-finite rule, fastdistill/reference/kd.py).
  float max_s = -kInf, max_t = -kInf;
  void merge(const Pass1& o) {
    u.merge(o.u);
    v.merge(o.v);
    w.merge(o.w);
    z.merge(o.z);
    max_s = nan_max(max_s, o.max_s);
    max_t = nan_max(max_t, o.max_t);
  }
};

// Row constants fixed after pass 1 (and pass 2).
struct RowConst {
  float lse_u, lse_v, lse_w, lse_z;
  float k;  // the row sum the gradient subtracts (see pass3)
  float shift;  // reverse_kl: lse_v - lse_u, taken in double before rounding
};

// Loads `count` (< kVec) floats, the rest -inf: probability 0 everywhere below.
inline Vec load_tail(const float* p, int64_t count) {
  alignas(64) float b[kVec];
  for (int64_t i = 0; i < kVec; ++i) b[i] = i < count ? p[i] : -kInf;
  return Vec::loadu(b);
}

inline Vec load(const float* p, int64_t count) {
  return count == kVec ? Vec::loadu(p) : load_tail(p, count);
}

// x where keep is set, else 0: removes 0 * inf from terms whose weight is 0.
inline Vec keep_where(const Vec& x, const Vec& keep) {
  return Vec::blendv(Vec(0.f), x, keep);
}

// log(e^a + e^b) without underflow; -inf when both are -inf.
inline Vec logaddexp(const Vec& a, const Vec& b) {
  const Vec hi = at::vec::maximum(a, b);
  const Vec lo = at::vec::minimum(a, b);
  const Vec r = hi + (lo - hi).exp().log1p();
  return Vec::blendv(r, hi, hi == Vec(-kInf));
}

// Scratch rows of one row's worth of floats: A holds e^{u - M} (M = the
// running max when its block was seen), B a per-divergence quantity (see
// pass1/pass2). They stay in cache between the passes, so the exponentials of
// pass 1 are never recomputed.
struct Scratch {
  std::vector<float> a, b;
  std::vector<float> mu, mb;  // per block: the running maxima A and B are relative to
  Scratch(int64_t V) : a(V), b(V), mu((V + kBlock - 1) / kBlock), mb((V + kBlock - 1) / kBlock) {}
};

// TAID's interpolated logits (1 - t)·z + t·z_t (before 1/T); t = 0 or 1
// takes one side whole, so a -inf logit never meets a 0 weight (NaN).
inline Vec taid_mix(const Vec& xs, const Vec& xt, float t) {
  if (t == 0.f) return xs;
  if (t == 1.f) return xt;
  return Vec(1.f - t) * xs + Vec(t) * xt;
}

// ---------------------------------------------------------------- pass 1
// One block: block maxima first (the block is in L1), then the exponentials
// relative to the raised running maxima, stored in A and B.
//   B = e^{v - M_v} (forward_kl, jsd, tvd, skew_*), e^{w - M_w} (taid), u - v (reverse_kl)
__attribute__((noinline)) void pass1_block(
    const float* zs, const float* zt, int64_t n, const Params& P, Pass1& run, float* A, float* B,
    float& mu_block, float& mb_block) {
  const Vec inv_t(P.inv_t), zero(0.f);
  const bool taid = P.div == kTAID, rev = P.div == kReverseKL, fwd = P.div == kForwardKL;
  // Locals, not loads through P: the stores to A and B could alias P's fields.
  const bool ce_own = P.ce_own_lse;
  const float t_mix = P.param;
  Vec mzs(-kInf), mzt(-kInf), mw(-kInf);
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t c = std::min(kVec, n - i);
    const Vec xs = load(zs + i, c), xt = load(zt + i, c);
    mzs = at::vec::maximum(mzs, xs);
    mzt = at::vec::maximum(mzt, xt);
    if (taid) mw = at::vec::maximum(mw, taid_mix(xs, xt, t_mix) * inv_t);
  }
  auto raise = [](Lse& l, double m) {
    if (m > l.m) {
      if (l.m != -kInf) {
        const double r = std::exp(l.m - m);
        l.s *= r;
        l.a *= r;
      }
      l.m = m;
    }
  };
  // Maxima rounded exactly like the vector path (float z * float 1/T), so
  // the max element gets u - M = 0 exactly.
  const float bmz = hmax(mzs), bmt = hmax(mzt);
  run.max_s = nan_max(run.max_s, bmz);
  run.max_t = nan_max(run.max_t, bmt);
  raise(run.u, bmz * P.inv_t);
  if (taid) {
    raise(run.w, hmax(mw));
  } else {
    raise(run.v, bmt * P.inv_t);
  }
  if (P.ce_own_lse) raise(run.z, bmz);
  mu_block = float(run.u.m);
  mb_block = float(taid ? run.w.m : run.v.m);

  const Vec Mu(mu_block), Mb(mb_block), Mz(float(run.z.m));
  Vec su(0.f), au(0.f), sb(0.f), ab(0.f), sz(0.f);
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t c = std::min(kVec, n - i);
    const Vec xs = load(zs + i, c), xt = load(zt + i, c);
    const Vec u = xs * inv_t;
    const Vec eu = (u - Mu).exp_u20();
    su = su + eu;
    Vec b;
    if (taid) {
      const Vec w = taid_mix(xs, xt, t_mix) * inv_t;
      b = (w - Mb).exp_u20();
      sb = sb + b;
      ab = ab + keep_where(b * (w - u), b > zero);  // for KL(p_t || q)
    } else {
      const Vec v = xt * inv_t;
      const Vec ev = (v - Mb).exp_u20();
      sb = sb + ev;
      if (rev) {
        b = u - v;
        au = au + keep_where(eu * b, eu > zero);  // for KL(q || p)
      } else {
        b = ev;
        if (fwd) ab = ab + keep_where(ev * (v - u), ev > zero);  // for KL(p || q)
      }
    }
    if (ce_own) sz = sz + (xs - Mz).exp();
    if (c == kVec) {
      eu.store(A + i);
      b.store(B + i);
    } else {
      eu.store(A + i, c);
      b.store(B + i, c);
    }
  }
  Lse& lb = taid ? run.w : run.v;
  if (run.u.m != -kInf) {
    run.u.s += hsum(su);
    run.u.a += hsum(au);
  }
  if (lb.m != -kInf) {
    lb.s += hsum(sb);
    lb.a += hsum(ab);
  }
  if (P.ce_own_lse && run.z.m != -kInf) run.z.s += hsum(sz);
}

// ---------------------------------------------------------------- pass 2
// jsd, tvd, skew_*: the loss and the constant K of the gradient need the
// whole row first. Overwrites B with the per-element factor h of the gradient
// g = c · q · (h − K):
//   jsd   h = log q − log m,  K = KL(q‖m),        c = 1 − beta
//   tvd   h = ½ sign(q − p),  K = Σ q h,          c = 1
//   skew_forward_kl  h = p/m, K = Σ q p/m,        c = −(1 − skew)
//   skew_reverse_kl  h = log(q/m) + 1 − skew q/m, K = Σ q h, c = 1
struct Sums {
  double loss = 0.0;
  double k = 0.0;
  void merge(const Sums& o) {
    loss += o.loss;
    k += o.k;
  }
};

__attribute__((noinline)) void pass2_block(
    const float* zs, const float* zt, int64_t n, const Params& P, const RowConst& R, float fu,
    float fv, const float* A, float* B, Sums& out) {
  const Vec inv_t(P.inv_t), lse_u(R.lse_u), lse_v(R.lse_v), zero(0.f), vfu(fu), vfv(fv);
  const Vec log_wp(P.log_wp), log_wq(P.log_wq);
  const Vec par(P.param), one_m_par(1.f - P.param), half(0.5f), one(1.f);
  Vec L(0.f), K(0.f);
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t c = std::min(kVec, n - i);
    const Vec q = Vec::loadu(A + i, c) * vfu, p = Vec::loadu(B + i, c) * vfv;
    const Vec has_q = q > zero, has_p = p > zero;
    Vec h;
    if (P.div == kTVD) {
      const Vec d = q - p;
      h = (half & (d > zero)) - (half & (d < zero));
      L = L + half * d.abs();
      K = K + q * h;
    } else {
      const Vec logq = load(zs + i, c) * inv_t - lse_u;
      const Vec logp = load(zt + i, c) * inv_t - lse_v;
      const Vec logm = logaddexp(log_wp + logp, log_wq + logq);
      if (P.div == kJSD) {
        h = logq - logm;
        const Vec tq = keep_where(q * h, has_q);
        L = L + par * keep_where(p * (logp - logm), has_p) + one_m_par * tq;
        K = K + tq;
      } else if (P.div == kSkewForwardKL) {
        L = L + keep_where(p * (logp - logm), has_p);
        h = keep_where((logp - logm).exp(), has_p);
        K = K + q * h;
      } else {  // kSkewReverseKL
        h = logq - logm;
        L = L + keep_where(q * h, has_q);
        h = h + one - par * h.exp();
        K = K + keep_where(q * h, has_q);
      }
    }
    if (c == kVec) {
      h.store(B + i);
    } else {
      h.store(B + i, c);
    }
  }
  out.loss += hsum(L);
  out.k += hsum(K);
}

// ---------------------------------------------------------------- pass 3
// Writes d loss / d z into `out` (which may alias zs: each element of zs is
// read before the same element of out is written).
__attribute__((noinline)) void pass3_block(
    const float* zs, float* out, int64_t n, const Params& P, const RowConst& R, float fu, float fb,
    const float* A, const float* B) {
  const Vec vfu(fu), vfb(fb), K(R.k), zero(0.f), lse_z(R.lse_z);
  const Vec c_soft(P.c_soft), c_hard(P.c_hard);
  Vec coef(1.f);  // c in g = c · q · (h − K)
  if (P.div == kJSD) coef = Vec(1.f - P.param);
  if (P.div == kSkewForwardKL) coef = Vec(P.param - 1.f);
  const Vec shift(R.shift);
  const bool ce = P.ce, ce_own = P.ce_own_lse;  // locals: `out` could alias P
  const int64_t div = P.div;
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t c = std::min(kVec, n - i);
    const Vec q = Vec::loadu(A + i, c) * vfu;
    const Vec b = Vec::loadu(B + i, c);
    Vec g;  // d divergence / d u
    switch (div) {
      case kForwardKL:
      case kTAID:
        g = q - b * vfb;  // q - p, q - p_t
        break;
      case kReverseKL:  // q (log q - log p - K), log q - log p = (u - v) - lse_u + lse_v
        g = keep_where(q * (b + shift - K), q > zero);
        break;
      default:
        g = keep_where(coef * q * (b - K), q > zero);
    }
    Vec dz = c_soft * g;
    if (ce) dz = dz + c_hard * (ce_own ? (load(zs + i, c) - lse_z).exp() : q);
    if (c == kVec) {
      dz.store(out + i);
    } else {
      dz.store(out + i, c);
    }
  }
}

// ---------------------------------------------------------------- drivers
template <typename S, typename T>
struct RowKernel {
  const S* zs;      // (N, V) student logits
  const T* zt;      // (N, V) teacher logits
  S* grad;          // (N, V) gradient out; may equal zs (in place); null: loss only
  const int64_t* labels;  // (N,) or null
  int64_t ignore_index;
  int64_t V;
  Params P;
  float hard_weight, soft_scale;

  // Calls f(student block, teacher block, out block or null, n, offset) for
  // the blocks of [v0, v1) of row r (v0 a multiple of kBlock), converting
  // non-float dtypes through L1 buffers.
  template <bool kRead, bool kWrite, typename F>
  void for_blocks(int64_t r, int64_t v0, int64_t v1, F&& f) const {
    alignas(64) float bs[kBlock], bt[kRead ? kBlock : 1], bo[kWrite ? kBlock : 1];
    const S* srow = zs + r * V;
    const T* trow = zt + r * V;
    S* orow = grad + r * V;
    for (int64_t b = v0; b < v1; b += kBlock) {
      const int64_t n = std::min(kBlock, v1 - b);
      const float* ps = nullptr;
      const float* pt = nullptr;
      if constexpr (kRead) {
        if constexpr (std::is_same_v<S, float>) {
          ps = srow + b;
        } else {
          for (int64_t i = 0; i < n; ++i) bs[i] = static_cast<float>(srow[b + i]);
          ps = bs;
        }
        if constexpr (std::is_same_v<T, float>) {
          pt = trow + b;
        } else {
          for (int64_t i = 0; i < n; ++i) bt[i] = static_cast<float>(trow[b + i]);
          pt = bt;
        }
      }
      if constexpr (kWrite) {
        if constexpr (std::is_same_v<S, float>) {
          f(ps, pt, orow + b, n, b);
        } else {
          if (P.ce_own_lse) {  // pass 3 reads z only for this
            for (int64_t i = 0; i < n; ++i) bs[i] = static_cast<float>(srow[b + i]);
            ps = bs;
          }
          f(ps, pt, bo, n, b);
          for (int64_t i = 0; i < n; ++i) orow[b + i] = static_cast<S>(bo[i]);
        }
      } else {
        f(ps, pt, nullptr, n, b);
      }
    }
  }

  // Runs `body(part, v0, v1)` over `parts` block-aligned slices of the
  // vocabulary, in parallel when parts > 1 (rows with fewer of them than threads).
  template <typename F>
  void over_vocab(int64_t parts, F&& body) const {
    if (parts == 1) {
      body(0, 0, V);
      return;
    }
    const int64_t len = ((V + parts - 1) / parts + kBlock - 1) / kBlock * kBlock;
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) body(p, std::min(V, p * len), std::min(V, (p + 1) * len));
    });
  }

  // Loss of row r; writes its gradient. `parts` > 1 splits V across threads.
  float row(int64_t r, int64_t parts, Scratch& sc) const {
    const int64_t label = labels ? labels[r] : -1;
    if (labels && label == ignore_index) {
      if (grad) std::fill(grad + r * V, grad + (r + 1) * V, S(0));
      return 0.f;
    }
    const float z_label = P.ce ? static_cast<float>(zs[r * V + label]) : 0.f;
    float* A = sc.a.data();
    float* B = sc.b.data();

    std::vector<Pass1> p1(parts);
    over_vocab(parts, [&](int64_t p, int64_t v0, int64_t v1) {
      for_blocks<true, false>(r, v0, v1, [&](const float* s, const float* t, float*, int64_t n, int64_t off) {
        pass1_block(s, t, n, P, p1[p], A + off, B + off, sc.mu[off / kBlock], sc.mb[off / kBlock]);
      });
    });
    for (int64_t p = 1; p < parts; ++p) p1[0].merge(p1[p]);
    const Pass1& st = p1[0];
    if (nonfinite_max(st.max_s) || nonfinite_max(st.max_t)) {  // no distribution: NaN loss and gradient
      constexpr float nan = std::numeric_limits<float>::quiet_NaN();
      if (grad) std::fill(grad + r * V, grad + (r + 1) * V, S(nan));
      return nan;
    }
    const bool taid = P.div == kTAID;
    const Lse& lb = taid ? st.w : st.v;
    RowConst R;
    R.lse_u = float(st.u.lse());
    R.lse_v = float(st.v.lse());
    R.lse_w = taid ? float(st.w.lse()) : 0.f;
    R.lse_z = P.ce_own_lse ? float(st.z.lse()) : R.lse_u;
    R.k = 0.f;
    R.shift = float(st.v.lse() - st.u.lse());
    double loss = 0.0;
    // The closed forms of pass 1: E_x[d] - lse_x + lse_u for the KL divergences.
    if (P.div == kForwardKL) loss = st.v.a / st.v.s - st.v.lse() + st.u.lse();
    if (P.div == kTAID) loss = st.w.a / st.w.s - st.w.lse() + st.u.lse();
    if (P.div == kReverseKL) {
      loss = st.u.a / st.u.s - st.u.lse() + st.v.lse();
      R.k = float(loss);
    }
    // Per-block factors turning A, B into probabilities: e^{M_block - M_row} / s.
    auto factor = [&](float m_block, const Lse& l) {
      return m_block == -kInf ? 0.f : float(std::exp(double(m_block) - l.m) / l.s);
    };

    const bool needs_pass2 = P.div == kJSD || P.div == kTVD || P.div == kSkewForwardKL ||
        P.div == kSkewReverseKL;
    if (needs_pass2) {
      std::vector<Sums> p2(parts);
      over_vocab(parts, [&](int64_t p, int64_t v0, int64_t v1) {
        for_blocks<true, false>(r, v0, v1, [&](const float* s, const float* t, float*, int64_t n, int64_t off) {
          const int64_t blk = off / kBlock;
          pass2_block(s, t, n, P, R, factor(sc.mu[blk], st.u), factor(sc.mb[blk], lb), A + off, B + off, p2[p]);
        });
      });
      for (int64_t p = 1; p < parts; ++p) p2[0].merge(p2[p]);
      loss = p2[0].loss;
      R.k = float(p2[0].k);
    }

    if (grad) {
      over_vocab(parts, [&](int64_t p, int64_t v0, int64_t v1) {
        for_blocks<false, true>(r, v0, v1, [&](const float* s, const float*, float* o, int64_t n, int64_t off) {
          const int64_t blk = off / kBlock;
          const float* zrow = s;
          if constexpr (std::is_same_v<S, float>) zrow = zs + r * V + off;
          pass3_block(zrow, o, n, P, R, factor(sc.mu[blk], st.u), factor(sc.mb[blk], lb), A + off, B + off);
          // The one-hot part of the CE gradient, before the block is stored.
          if (P.ce && label >= off && label < off + n) o[label - off] -= P.c_hard;
        });
      });
    }
    float out = (1.f - hard_weight) * soft_scale * float(loss);
    if (P.ce) out += hard_weight * (R.lse_z - z_label);
    return out;
  }

  void run(float* loss_rows, int64_t N) const {
    const int64_t threads = at::get_num_threads();
    if (N >= threads) {
      at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
        Scratch sc(V);
        for (int64_t r = r0; r < r1; ++r) loss_rows[r] = row(r, 1, sc);
      });
    } else {
      Scratch sc(V);
      const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, V / kBlock));
      for (int64_t r = 0; r < N; ++r) loss_rows[r] = row(r, parts, sc);
    }
  }
};

void check_inputs(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    int64_t ignore_index, int64_t divergence, double temperature, bool need_labels) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, "kd_forward: student and teacher must be 2-D (N, V)");
  TORCH_CHECK(student.sizes() == teacher.sizes(), "kd_forward: student ", student.sizes(),
              " and teacher ", teacher.sizes(), " must have the same shape");
  TORCH_CHECK(student.is_contiguous() && teacher.is_contiguous(), "kd_forward: inputs must be contiguous");
  TORCH_CHECK(divergence >= 0 && divergence < kNumDivergences, "kd_forward: unknown divergence ", divergence);
  TORCH_CHECK(temperature > 0, "kd_forward: temperature must be > 0");
  if (labels) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == student.size(0) && labels->is_contiguous() &&
                    labels->scalar_type() == at::kLong,
                "kd_forward: labels must be a contiguous int64 tensor of shape (N,)");
    if (need_labels) {
      const int64_t V = student.size(1);
      const int64_t* l = labels->data_ptr<int64_t>();
      for (int64_t i = 0; i < labels->size(0); ++i) {
        TORCH_CHECK(l[i] == ignore_index || (l[i] >= 0 && l[i] < V), "kd_forward: labels[", i, "] = ", l[i],
                    " is neither in [0, ", V, ") nor ignore_index");
      }
    }
  } else {
    TORCH_CHECK(!need_labels, "kd_forward: hard_weight > 0 needs labels");
  }
}

template <typename S>
void launch(at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
            std::optional<at::Tensor>& grad, at::Tensor& loss_rows, const Params& P, int64_t ignore_index,
            float hard_weight, float soft_scale) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, teacher.scalar_type(), "kd_forward_teacher", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "kd_forward: the cpp backend takes float32, bfloat16 or float16 logits");
    } else {
      RowKernel<S, scalar_t> k{student.data_ptr<S>(), teacher.data_ptr<scalar_t>(), grad ? grad->data_ptr<S>() : nullptr,
                               labels ? labels->data_ptr<int64_t>() : nullptr, ignore_index,
                               student.size(1), P, hard_weight, soft_scale};
      k.run(loss_rows.data_ptr<float>(), student.size(0));
    }
  });
}

// Shared body of the out-of-place and in-place ops: `grad` may alias `student`.
at::Tensor kd_forward_into(
    at::Tensor student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    std::optional<at::Tensor> grad, int64_t ignore_index, int64_t divergence, double param,
    double temperature, double hard_weight, double soft_scale, bool mean_scale) {
  check_inputs(student, teacher, labels, ignore_index, divergence, temperature, hard_weight > 0);
  const int64_t N = student.size(0);
  auto loss_rows = at::empty({N}, student.options().dtype(at::kFloat));
  if (N == 0) return loss_rows;
  int64_t valid = N;
  if (labels) valid = labels->ne(ignore_index).sum().item<int64_t>();
  const double grad_scale = mean_scale ? 1.0 / double(std::max<int64_t>(valid, 1)) : 1.0;

  Params P;
  P.div = divergence;
  P.inv_t = float(1.0 / temperature);
  P.param = float(param);
  double wp = 0.0;  // weight of p in m
  if (divergence == kJSD || divergence == kSkewForwardKL) wp = param;
  if (divergence == kSkewReverseKL) wp = 1.0 - param;
  P.log_wp = wp > 0 ? float(std::log(wp)) : -kInf;
  P.log_wq = wp < 1 ? float(std::log1p(-wp)) : -kInf;
  P.ce = hard_weight > 0;
  P.ce_own_lse = P.ce && temperature != 1.0;
  P.c_soft = float(grad_scale * soft_scale * (1.0 - hard_weight) / temperature);
  P.c_hard = float(grad_scale * hard_weight);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "kd_forward", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "kd_forward: the cpp backend takes float32, bfloat16 or float16 logits");
    } else {
      launch<scalar_t>(student, teacher, labels, grad, loss_rows, P, ignore_index, float(hard_weight),
                       float(soft_scale));
    }
  });
  return loss_rows;
}

std::tuple<at::Tensor, at::Tensor> kd_forward_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    int64_t ignore_index, int64_t divergence, double param, double temperature, double hard_weight,
    double soft_scale, bool mean_scale, bool need_grad) {
  // Without need_grad (evaluation) no N×V buffer is allocated or written.
  auto grad = need_grad ? empty_gradient_like(student) : student.new_empty({0});
  std::optional<at::Tensor> out;
  if (need_grad) out = grad;
  auto loss = kd_forward_into(student, teacher, labels, out, ignore_index, divergence, param, temperature,
                              hard_weight, soft_scale, mean_scale);
  return {loss, grad};
}

at::Tensor kd_forward_inplace_cpu(
    at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    int64_t ignore_index, int64_t divergence, double param, double temperature, double hard_weight,
    double soft_scale, bool mean_scale) {
  return kd_forward_into(student, teacher, labels, std::optional<at::Tensor>(student), ignore_index, divergence, param, temperature,
                         hard_weight, soft_scale, mean_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("kd_forward", &kd_forward_cpu);
  m.impl("kd_forward_inplace", &kd_forward_inplace_cpu);
}

}  // namespace fastdistill
