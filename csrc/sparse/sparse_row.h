// The row kernel of the sparse-teacher KD loss (fastdistill/kd/sparse.py), shared
// by the sparse op (ids + log-prob tensors, sparse_cpu.cpp) and the packed
// soft-label op (csrc/softlabels/softlabels_cpu.cpp): only the teacher source differs.
//
// The teacher of a row is K (id, log-probability) pairs; the student row is
// dense logits z. Per row, with u = z/T and q = softmax(u):
//   gather  u at the K ids (padding entries, log-prob -inf, are skipped);
//   pass A  one vectorized read of z, block by block through an L1 copy in
//           which the ids are masked to -inf: the log-sum-exp of the tail
//           (every u_j off the ids) with its own running max, and of z at
//           T = 1 when the cross-entropy term needs its own softmax. The tail
//           mass is thus a sum of its own, never 1 − Σ q_k: it keeps its
//           relative precision however small it is (and never underflows);
//   bins    the bin math in double: the bin log-probabilities of both sides
//           (see fastdistill/reference/sparse.py), the loss, the gradient at
//           each id, and the one row coefficient c that the gradient is
//           everywhere else (c·q_j);
//   pass B  one vectorized write of the gradient row, c·q_j, then the K id
//           positions (and the label) are overwritten with their own values.
//           With a float gradient row (and no separate CE softmax) pass A
//           already left e^{u_j − m_b} there (m_b: its running max after
//           block b), so pass B is a multiply by sign(c)·e^{log|c| − log Σ +
//           m_b − max} per block: one exponential per element in all.
//           Otherwise it computes sign(c)·exp((u_j − max) + log|c| − log Σ).
// No dense teacher row and no N×V temporary besides the gradient itself;
// the in-place variant writes the gradient over the student row (every value
// read after pass A — z at the ids and at the label — is kept from before it),
// and then there is no N×V buffer at all.
//
// Gradient (shared/notes/kd-math.md §3): with bins ℓ_k = u_{i_k} − LSE,
// ℓ_tail = log Σ_{j∉ids} q_j and G_b = ∂D/∂ℓ_b = Q_b ∂D/∂Q_b,
//   ∂L/∂u_j = [j = i_k] G_k + [j ∉ ids] r·q_j − q_j S,  S = Σ_b G_b,
// where r = ∂D/∂Q_tail (= G_tail/Q_tail, taken without the division).
// renormalize: ∂L/∂u_{i_k} = G_k − Q̃_k S and 0 elsewhere; none (forward KL
// on a sampled teacher): ∂L/∂u_j = q_j ΣP − [j = i_k] P_k.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common/divergences.h"
#include "common/vec.h"

namespace fastdistill {
namespace sparse_row {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kBlock = 2048;  // elements per conversion/max block (stays in L1)
constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr double kInf = std::numeric_limits<double>::infinity();

// Must match fastdistill.sparse.TAILS.
enum Tail : int64_t { kBucket = 0, kRenormalize, kNone, kNumTails };

struct Params {
  int64_t div, tail;
  float inv_t;     // 1 / temperature
  double param;    // beta (jsd), skew (skew_*)
  double log_wp;   // log weight of p in the mixture m (jsd, skew_*)
  double log_wq;   // log weight of q in the mixture m
  bool ce;         // hard_weight > 0
  bool ce_own;     // the CE term needs softmax(z) at T = 1, distinct from q
  double c_soft;   // d row_loss / d u -> d loss / d z: grad_scale·soft_scale·(1 − hw)/T
  double c_hard;   // grad_scale·hard_weight
  double hard_weight, soft_scale;
};

// `count` (≤ kVec) floats, the rest -inf (probability 0).
inline Vec load(const float* p, int64_t count) {
  if (count == kVec) return Vec::loadu(p);
  alignas(64) float b[kVec];
  for (int64_t i = 0; i < kVec; ++i) b[i] = i < count ? p[i] : -kInfF;
  return Vec::loadu(b);
}

inline double logaddexp(double a, double b) {
  const double hi = std::max(a, b), lo = std::min(a, b);
  if (hi == -kInf) return -kInf;
  return hi + std::log1p(std::exp(lo - hi));
}

// Online log-sum-exp in double: running max m (a float, as the vector path
// rounds it) and s = Σ e^{x − m}.
struct Lse {
  float m = -kInfF;
  double s = 0.0;
  void raise(float nm) {
    if (nm > m) {
      if (m != -kInfF) s *= std::exp(double(m) - double(nm));
      m = nm;
    }
  }
  double log_s() const { return std::log(s); }
  double lse() const { return double(m) + std::log(s); }
};

// ------------------------------------------------------------------ bins
// One bin's share of the divergence D between teacher P and student Q (bin
// log-probabilities lp, lq; either may be -inf), G = Q ∂D/∂Q and dq = ∂D/∂Q.
// A bin that is 0 on both sides is dead: all three are 0.
struct Bin {
  double term = 0.0, g = 0.0, dq = 0.0;
};

inline Bin bin(double lp, double lq, const Params& P) {
  Bin b;
  if (lp == -kInf && lq == -kInf) return b;
  const double p = std::exp(lp), q = std::exp(lq);
  const double lam = P.param;
  switch (P.div) {
    case kForwardKL:  // Σ P (lp − lq)
      if (p > 0) {
        b.term = p * (lp - lq);
        b.dq = -std::exp(lp - lq);
      }
      b.g = -p;
      break;
    case kReverseKL:  // Σ Q (lq − lp)
      if (q > 0) {
        b.term = q * (lq - lp);
        b.dq = lq - lp + 1.0;
        b.g = q * b.dq;
      }
      break;
    case kJSD: {  // β KL(P‖M) + (1 − β) KL(Q‖M), M = βP + (1 − β)Q
      const double lm = logaddexp(P.log_wp + lp, P.log_wq + lq);
      if (p > 0) b.term += lam * p * (lp - lm);
      if (q > 0) {
        b.term += (1.0 - lam) * q * (lq - lm);
        b.dq = (1.0 - lam) * (lq - lm);
        b.g = q * b.dq;
      }
      break;
    }
    case kTVD: {  // ½ Σ |Q − P|, sign(0) = 0
      const double d = q - p;
      b.term = 0.5 * std::abs(d);
      b.dq = d > 0 ? 0.5 : (d < 0 ? -0.5 : 0.0);
      b.g = q * b.dq;
      break;
    }
    case kSkewForwardKL: {  // KL(P‖M), M = λP + (1 − λ)Q
      const double lm = logaddexp(P.log_wp + lp, P.log_wq + lq);
      if (p > 0) {
        b.term = p * (lp - lm);
        b.dq = -(1.0 - lam) * std::exp(lp - lm);
        // Q·P/M in the log domain; M = 0 only when λ = 0 and Q = 0 (then KL(P‖Q) = ∞)
        b.g = lm == -kInf ? -p : -(1.0 - lam) * std::exp(lq + lp - lm);
      }
      break;
    }
    case kSkewReverseKL: {  // KL(Q‖M), M = (1 − λ)P + λQ
      const double lm = logaddexp(P.log_wp + lp, P.log_wq + lq);
      if (q > 0) {
        b.term = q * (lq - lm);
        b.dq = (lq - lm) + 1.0 - lam * std::exp(lq - lm);
        b.g = q * b.dq;
      }
      break;
    }
    default:
      break;
  }
  return b;
}

// Per-row scratch: the valid entries of the row (K at most).
struct Scratch {
  std::vector<int64_t> id, sid;  // ids in entry order, and sorted (for masking)
  std::vector<float> z, u;       // z and u = z/T at the ids (kept: pass B may overwrite z)
  std::vector<double> lp, lu, gk;
  std::vector<float> block_max;  // pass A's running max after each block (see RowKernel::row)
  bool bad_teacher = false;      // a NaN or +inf log-prob in the row (set by the teacher source)
  Scratch(int64_t K, int64_t V)
      : id(K), sid(K), z(K), u(K), lp(K), lu(K), gk(K), block_max((V + kBlock - 1) / kBlock) {}
};

// The bin math of one row. In: n valid entries (lp = teacher log-prob, lu =
// log q at the id), lse_q = log Σ_k q_k and lq_tail = log Q_tail (both from
// separate sums, so a small tail keeps its relative precision). Out: the soft
// loss, gk = d soft/d u at each id, and c_row with d soft/d u_j = c_row·q_j at
// every other j.
struct SoftRow {
  double loss = 0.0;
  double c_row = 0.0;
};

inline SoftRow soft_row(int64_t n, int64_t V, Scratch& sc, const Params& P, double lse_q, double lq_tail) {
  SoftRow out;
  const double* lp = sc.lp.data();
  const double* lu = sc.lu.data();
  double* gk = sc.gk.data();
  if (P.tail == kNone) {
    // Σ P_k (lp_k − lu_k); d/du_j = q_j ΣP − [j = i_k] P_k
    double sum_p = 0.0;
    for (int64_t k = 0; k < n; ++k) {
      const double p = std::exp(lp[k]);
      if (p > 0) out.loss += p * (lp[k] - lu[k]);
      sum_p += p;
      gk[k] = p;
    }
    for (int64_t k = 0; k < n; ++k) gk[k] = std::exp(lu[k]) * sum_p - gk[k];
    out.c_row = sum_p;
    return out;
  }
  if (n == 0) return out;  // no valid entry: every bin dead (bucket: both tails 1)
  double mp = -kInf, sum_p = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    mp = std::max(mp, lp[k]);
    sum_p += std::exp(lp[k]);
  }
  double S = 0.0;
  if (P.tail == kRenormalize) {
    double sp = 0.0;
    for (int64_t k = 0; k < n; ++k) sp += std::exp(lp[k] - mp);
    const double lse_p = mp + std::log(sp);
    for (int64_t k = 0; k < n; ++k) {
      const Bin b = bin(lp[k] - lse_p, lu[k] - lse_q, P);
      out.loss += b.term;
      gk[k] = b.g;
      S += b.g;
    }
    for (int64_t k = 0; k < n; ++k) gk[k] -= std::exp(lu[k] - lse_q) * S;
    out.c_row = 0.0;
    return out;
  }
  // bucket: K + 1 bins; no tail bin when the ids cover the vocabulary
  const bool covered = n == V;
  const double lp_tail = (covered || sum_p >= 1.0) ? -kInf : std::log1p(-sum_p);
  if (covered) lq_tail = -kInf;
  for (int64_t k = 0; k < n; ++k) {
    const Bin b = bin(lp[k], lu[k], P);
    out.loss += b.term;
    gk[k] = b.g;
    S += b.g;
  }
  const Bin t = bin(lp_tail, lq_tail, P);
  out.loss += t.term;
  S += t.g;
  for (int64_t k = 0; k < n; ++k) gk[k] -= std::exp(lu[k]) * S;
  // without student tail mass there is nothing off the ids to push
  out.c_row = (lq_tail == -kInf ? 0.0 : t.dq) - S;
  return out;
}

// ------------------------------------------------------------------ rows
// A teacher row source fills sc.id, sc.sid and sc.lp with the valid entries
// of row r (at most K) and returns how many there are:
//   int64_t gather(int64_t r, Scratch& sc) const;
// ListTeacher (ids + log-probs tensors) is below; the packed soft labels'
// source is csrc/softlabels/packed_row.h.
template <typename LP>
struct ListTeacher {
  const int64_t* ids;  // (N, K)
  const LP* logprobs;  // (N, K), -inf at padding
  int64_t K;
  int64_t gather(int64_t r, Scratch& sc) const {
    int64_t n = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double lp = static_cast<double>(logprobs[r * K + k]);
      if (std::isnan(lp) || lp == kInf) sc.bad_teacher = true;  // the row becomes NaN
      if (!(lp > -kInf) || lp == kInf) continue;  // padding: no bin, its id is never read
      const int64_t id = ids[r * K + k];
      sc.id[n] = id;
      sc.sid[n] = id;
      sc.lp[n] = lp;
      ++n;
    }
    return n;
  }
};

template <typename S, typename Teacher>
struct RowKernel {
  const S* zs;            // (N, V) student logits
  Teacher teacher;        // the row's (id, log-prob) entries
  S* grad;                // (N, V), zs itself (in place), or null (loss only)
  const int64_t* labels;  // (N,) or null
  int64_t ignore_index, V, K;
  Params P;

  // f(block as float, n, offset) over the blocks of row r, converting
  // non-float dtypes through an L1 buffer.
  template <typename F>
  void read_blocks(int64_t r, F&& f) const {
    alignas(64) float buf[kBlock];
    const S* row = zs + r * V;
    for (int64_t b = 0; b < V; b += kBlock) {
      const int64_t n = std::min(kBlock, V - b);
      if constexpr (std::is_same_v<S, float>) {
        f(row + b, n, b);
      } else {
        for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[b + i]);
        f(static_cast<const float*>(buf), n, b);
      }
    }
  }

  static float block_max(const float* x, int64_t n) {
    Vec mx(-kInfF);
    for (int64_t i = 0; i < n; i += kVec) mx = at::vec::maximum(mx, load(x + i, std::min(kVec, n - i)));
    return hmax(mx);
  }

  // Σ e^{x·scale − M} over a block, in float lanes (the block is in L1).
  static float block_sum(const float* x, int64_t n, float scale, float M) {
    const Vec vs(scale), vm(M);
    Vec acc(0.f);
    for (int64_t i = 0; i < n; i += kVec) acc = acc + (load(x + i, std::min(kVec, n - i)) * vs - vm).exp_u20();
    return hsum(acc);
  }

  // block_sum that also stores each e^{x·scale − M} to out (float rows).
  static float block_sum_store(const float* x, int64_t n, float scale, float M, float* out) {
    const Vec vs(scale), vm(M);
    Vec acc(0.f);
    for (int64_t i = 0; i < n; i += kVec) {
      const int64_t c = std::min(kVec, n - i);
      const Vec e = (load(x + i, c) * vs - vm).exp_u20();
      acc = acc + e;
      if (c == kVec) {
        e.store(out + i);
      } else {
        e.store(out + i, c);
      }
    }
    return hsum(acc);
  }

  // out[i] *= f over a block.
  static void scale_block(float* out, int64_t n, float f) {
    const Vec vf(f);
    for (int64_t i = 0; i < n; i += kVec) {
      const int64_t c = std::min(kVec, n - i);
      const Vec y = Vec::loadu(out + i, c) * vf;
      if (c == kVec) {
        y.store(out + i);
      } else {
        y.store(out + i, c);
      }
    }
  }

  // pass B over one block: out = A·q_j + B·softmax(z)_j, each as
  // sign·exp((x − max) + off) (A = 0 or B = 0: that term is absent).
  void pass_b(const float* x, float* out, int64_t n, float Mu, float offA, float sgnA, bool hasA,
              float Mz, float offB, bool hasB) const {
    const Vec inv_t(P.inv_t), vMu(Mu), vOffA(offA), vSgnA(sgnA), vMz(Mz), vOffB(offB);
    for (int64_t i = 0; i < n; i += kVec) {
      const int64_t c = std::min(kVec, n - i);
      const Vec xs = load(x + i, c);
      Vec g(0.f);
      if (hasA) g = vSgnA * ((xs * inv_t - vMu) + vOffA).exp_u20();
      if (hasB) g = g + ((xs - vMz) + vOffB).exp_u20();
      if (c == kVec) {
        g.store(out + i);
      } else {
        g.store(out + i, c);
      }
    }
  }

  float row(int64_t r, Scratch& sc) const {
    const int64_t label = labels ? labels[r] : -1;
    S* grow = grad ? grad + r * V : nullptr;
    if (labels && label == ignore_index) {
      if (grow) std::fill(grow, grow + V, S(0));
      return 0.f;
    }
    const S* zrow = zs + r * V;
    // the valid entries: ids, teacher log-probs, z and u at the id
    sc.bad_teacher = false;
    const int64_t n = teacher.gather(r, sc);
    for (int64_t k = 0; k < n; ++k) {
      sc.z[k] = static_cast<float>(zrow[sc.id[k]]);
      sc.u[k] = sc.z[k] * P.inv_t;  // the rounding of x * inv_t below
    }
    std::sort(sc.sid.begin(), sc.sid.begin() + n);

    // z at the label, read before anything may overwrite the row (in place)
    const float z_label = P.ce ? static_cast<float>(zrow[label]) : 0.f;

    // pass A: the log-sum-exp of the tail (every u_j but the ids, which are
    // masked to -inf in the block copy) and, for CE at T ≠ 1, of all of z.
    // With a float gradient row and no separate CE softmax, pass A also keeps
    // each e^{u_j − m_b} (m_b: the running max after block b) in the gradient
    // row, so that pass B is one multiply per block instead of one exponential
    // per element: the row's exponentials are computed once.
    float* keep = nullptr;
    if constexpr (std::is_same_v<S, float>) {
      if (grow && !P.ce_own) keep = grow;
    }
    Lse lt, lz;
    float raw_max = -kInfF;  // of the whole row, NaN-propagating (the non-finite rule)
    for (int64_t k = 0; k < n; ++k) raw_max = nan_max(raw_max, sc.z[k]);
    {
      alignas(64) float buf[kBlock];
      int64_t next = 0;
      for (int64_t b = 0; b < V; b += kBlock) {
        const int64_t m = std::min(kBlock, V - b);
        for (int64_t i = 0; i < m; ++i) buf[i] = static_cast<float>(zrow[b + i]);
        if (P.ce_own) {
          lz.raise(block_max(buf, m));
          if (lz.m != -kInfF) lz.s += block_sum(buf, m, 1.f, lz.m);
        }
        for (; next < n && sc.sid[next] < b + m; ++next) buf[sc.sid[next] - b] = -kInfF;
        const float bm = block_max(buf, m);  // every entry off the ids
        raw_max = nan_max(raw_max, bm);
        lt.raise(bm * P.inv_t);
        if (keep) {
          if (lt.m != -kInfF) {
            lt.s += block_sum_store(buf, m, P.inv_t, lt.m, keep + b);
          } else {
            std::fill(keep + b, keep + b + m, 0.f);
          }
          sc.block_max[b / kBlock] = lt.m;
        } else if (lt.m != -kInfF) {
          lt.s += block_sum(buf, m, P.inv_t, lt.m);
        }
      }
    }
    if (nonfinite_max(raw_max) || sc.bad_teacher) {  // no distribution: NaN loss and gradient
      constexpr float nan = std::numeric_limits<float>::quiet_NaN();
      if (grow) std::fill(grow, grow + V, S(nan));
      return nan;
    }
    // everything relative to M = max u (a float, so that u − M is exact as in pass B)
    float M = lt.m;
    for (int64_t k = 0; k < n; ++k) M = std::max(M, sc.u[k]);
    double s_ids = 0.0;
    for (int64_t k = 0; k < n; ++k) s_ids += std::exp(double(sc.u[k]) - double(M));
    const double s_tail = lt.m == -kInfF ? 0.0 : lt.s * std::exp(double(lt.m) - double(M));
    const double log_s = std::log(s_ids + s_tail);
    for (int64_t k = 0; k < n; ++k) sc.lu[k] = (double(sc.u[k]) - double(M)) - log_s;
    const double lse_q = n > 0 ? std::log(s_ids) - log_s : -kInf;  // log Σ_k q_{i_k}
    const double lq_tail = s_tail > 0 ? (double(lt.m) - double(M)) + std::log(lt.s) - log_s : -kInf;
    const double lse_z = P.ce_own ? lz.lse() : double(M) + log_s;

    const SoftRow soft = soft_row(n, V, sc, P, lse_q, lq_tail);
    double loss = (1.0 - P.hard_weight) * P.soft_scale * soft.loss;
    if (P.ce) loss += P.hard_weight * (lse_z - static_cast<double>(z_label));
    if (!grow) return float(loss);

    // the row: A·q_j (+ B·softmax(z)_j when CE has its own softmax)
    double A = P.c_soft * soft.c_row;
    if (P.ce && !P.ce_own) A += P.c_hard;
    const double B = P.ce_own ? P.c_hard : 0.0;
    const bool hasA = A != 0.0, hasB = B != 0.0;
    const float offA = hasA ? float(std::log(std::abs(A)) - log_s) : 0.f;
    const float offB = hasB ? float(std::log(B) - lz.log_s()) : 0.f;
    const float sgnA = A < 0 ? -1.f : 1.f;
    if (!hasA && !hasB) {
      std::fill(grow, grow + V, S(0));
    } else if (keep) {  // A·q_j = sgnA·e^{offA + m_b − M}·e^{u_j − m_b}: a scale per block
      for (int64_t b = 0; b < V; b += kBlock) {
        const float mb = sc.block_max[b / kBlock];
        const float f = mb == -kInfF ? 0.f : sgnA * std::exp((mb - M) + offA);
        scale_block(keep + b, std::min(kBlock, V - b), f);
      }
    } else {
      alignas(64) float obuf[kBlock];
      read_blocks(r, [&](const float* x, int64_t m, int64_t off) {
        float* o = obuf;
        if constexpr (std::is_same_v<S, float>) o = grow + off;
        pass_b(x, o, m, M, offA, sgnA, hasA, lz.m, offB, hasB);
        if constexpr (!std::is_same_v<S, float>) {
          for (int64_t i = 0; i < m; ++i) grow[off + i] = static_cast<S>(obuf[i]);
        }
      });
    }
    // the softmax at T = 1 (for CE) at a position with logit z, given log q there
    // (z from before pass B: in place, the row now holds the gradient)
    auto sm_at = [&](float z, double log_q) {
      return P.ce_own ? std::exp(static_cast<double>(z) - lse_z) : std::exp(log_q);
    };
    // fix-ups, each an overwrite with the position's own value: the label, then the ids
    if (P.ce) {
      const float u = z_label * P.inv_t;
      const double lq = (double(u) - double(M)) - log_s;
      grow[label] = static_cast<S>(float(A * std::exp(lq) + B * sm_at(z_label, lq) - P.c_hard));
    }
    for (int64_t k = 0; k < n; ++k) {
      const int64_t id = sc.id[k];
      double v = P.c_soft * sc.gk[k];
      if (P.ce) v += P.c_hard * (sm_at(sc.z[k], sc.lu[k]) - (id == label ? 1.0 : 0.0));
      grow[id] = static_cast<S>(float(v));
    }
    return float(loss);
  }

  void run(float* loss_rows, int64_t N) const {
    at::parallel_for(0, N, 1, [&](int64_t r0, int64_t r1) {
      Scratch sc(std::max<int64_t>(K, 1), V);
      for (int64_t r = r0; r < r1; ++r) loss_rows[r] = row(r, sc);
    });
  }
};

// The row parameters of one call (grad_scale: 1, or 1/#kept rows for the mean).
inline Params make_params(int64_t divergence, int64_t tail, double param, double temperature,
                          double hard_weight, double soft_scale, double grad_scale) {
  Params P;
  P.div = divergence;
  P.tail = tail;
  P.inv_t = float(1.0 / temperature);
  P.param = param;
  double wp = 0.0;  // weight of p in m
  if (divergence == kJSD || divergence == kSkewForwardKL) wp = param;
  if (divergence == kSkewReverseKL) wp = 1.0 - param;
  P.log_wp = wp > 0 ? std::log(wp) : -kInf;
  P.log_wq = wp < 1 ? std::log1p(-wp) : -kInf;
  P.ce = hard_weight > 0;
  P.ce_own = P.ce && temperature != 1.0;
  P.c_soft = grad_scale * soft_scale * (1.0 - hard_weight) / temperature;
  P.c_hard = grad_scale * hard_weight;
  P.hard_weight = hard_weight;
  P.soft_scale = soft_scale;
  return P;
}

// Runs the row kernel over every row with the given teacher source: the loss
// rows, and the gradient into `grad` when it is defined (the student itself
// when in place). Inputs are checked by the caller; `op` names it in errors.
template <typename Teacher>
at::Tensor run_rows(const at::Tensor& student, const Teacher& teacher, int64_t K, const at::Tensor& grad,
                    const std::optional<at::Tensor>& labels, int64_t ignore_index, int64_t divergence,
                    int64_t tail, double param, double temperature, double hard_weight, double soft_scale,
                    bool mean_scale, const char* op) {
  const int64_t N = student.size(0), V = student.size(1);
  auto loss_rows = at::empty({N}, student.options().dtype(at::kFloat));
  if (N == 0) return loss_rows;
  int64_t valid = N;
  if (labels) valid = labels->ne(ignore_index).sum().item<int64_t>();
  const double grad_scale = mean_scale ? 1.0 / double(std::max<int64_t>(valid, 1)) : 1.0;
  const Params P = make_params(divergence, tail, param, temperature, hard_weight, soft_scale, grad_scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "sparse_rows", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, op, ": the cpp backend takes float32, bfloat16 or float16 logits");
    } else {
      using S = scalar_t;
      RowKernel<S, Teacher> k{student.data_ptr<S>(), teacher, grad.defined() ? grad.data_ptr<S>() : nullptr,
                              labels ? labels->data_ptr<int64_t>() : nullptr, ignore_index, V, K, P};
      k.run(loss_rows.data_ptr<float>(), N);
    }
  });
  return loss_rows;
}

}  // namespace sparse_row
}  // namespace fastdistill
