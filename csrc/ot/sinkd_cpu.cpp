// CPU kernels of SinKD's L1 cost (fastdistill/ot.py, sinkhorn_kd_loss): the hot
// part of the loss, O(B²V), where the B×B OT problem itself is tiny.
//   forward   q = softmax(z/T), p = softmax(z_t/T) (rows, in parallel), then
//             W_ij = Σ_v |q_iv − p_jv|
//   backward  dq_iv = Σ_j G_ij sign(q_iv − p_jv)   (sign(0) = 0, as torch's abs),
//             then through the softmax: dz_iv = q_iv (dq_iv − Σ_v q_iv dq_iv) / T
// Logits and probabilities are float32 (Bq, V) and (Bp, V). The cost passes walk
// V in chunks of kChunk so that the chunk of every row of p stays in L2 while
// four rows of q share each load of p; no B×B×V difference tensor exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "common/vec.h"

namespace fastdistill {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kChunk = 1024;  // columns of V per pass (Bp × 4 KB of p in L2)
constexpr int64_t kRowsQ = 4;     // rows of q sharing each load of p

void check_rows(const char* op, const at::Tensor& q, const at::Tensor& p) {
  TORCH_CHECK(q.dim() == 2 && p.dim() == 2 && q.size(1) == p.size(1), op,
              ": the rows must be (Bq, V) and (Bp, V), got ", q.sizes(), " and ", p.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && p.scalar_type() == at::kFloat, op, ": the rows must be float32");
  TORCH_CHECK(q.is_contiguous() && p.is_contiguous(), op, ": the rows must be contiguous");
}

// Pointers to kRowsQ rows of q from row i0 (rows past the end repeat the last: computed, never stored).
inline void q_rows(const float* q, int64_t V, int64_t i0, int64_t nr, const float* out[kRowsQ]) {
  for (int64_t r = 0; r < kRowsQ; ++r) out[r] = q + (i0 + std::min(r, nr - 1)) * V;
}

at::Tensor l1_cost(const at::Tensor& q, const at::Tensor& p) {
  const int64_t Bq = q.size(0), Bp = p.size(0), V = q.size(1);
  auto W = at::zeros({Bq, Bp}, q.options());
  if (Bq == 0 || Bp == 0 || V == 0) return W;
  const float* qp = q.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  float* wp = W.data_ptr<float>();
  const int64_t blocks = (Bq + kRowsQ - 1) / kRowsQ;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> acc(kRowsQ * Bp);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i0 = blk * kRowsQ, nr = std::min(kRowsQ, Bq - i0);
      const float* qr[kRowsQ];
      q_rows(qp, V, i0, nr, qr);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t v0 = 0; v0 < V; v0 += kChunk) {
        const int64_t v1 = std::min(V, v0 + kChunk);
        for (int64_t j = 0; j < Bp; ++j) {
          const float* pj = pp + j * V;
          Vec s[kRowsQ] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
          for (int64_t v = v0; v < v1; v += kVec) {
            const int64_t n = std::min(kVec, v1 - v);  // a partial load fills with 0 on both sides: |0 − 0|
            const Vec pv = Vec::loadu(pj + v, n);
            for (int64_t r = 0; r < kRowsQ; ++r) s[r] = s[r] + (Vec::loadu(qr[r] + v, n) - pv).abs();
          }
          for (int64_t r = 0; r < kRowsQ; ++r) acc[r * Bp + j] += hsum(s[r]);
        }
      }
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t j = 0; j < Bp; ++j) wp[(i0 + r) * Bp + j] = float(acc[r * Bp + j]);
    }
  });
  return W;
}

at::Tensor l1_cost_backward(const at::Tensor& q, const at::Tensor& p, const at::Tensor& grad) {
  const int64_t Bq = q.size(0), Bp = p.size(0), V = q.size(1);
  auto dq = at::zeros_like(q);
  if (Bq == 0 || Bp == 0 || V == 0) return dq;
  const float* qp = q.data_ptr<float>();
  const float* pp = p.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  float* dp = dq.data_ptr<float>();
  const int64_t blocks = (Bq + kRowsQ - 1) / kRowsQ;
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  // (row block, V chunk) tasks: enough of them for every thread even at small B
  at::parallel_for(0, blocks * chunks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t / chunks, v0 = (t % chunks) * kChunk, v1 = std::min(V, v0 + kChunk);
      const int64_t i0 = blk * kRowsQ, nr = std::min(kRowsQ, Bq - i0);
      const float* qr[kRowsQ];
      q_rows(qp, V, i0, nr, qr);
      const float* gr[kRowsQ];
      q_rows(gp, Bp, i0, nr, gr);
      const Vec zero(0.f);
      for (int64_t v = v0; v < v1; v += kVec) {
        const int64_t n = std::min(kVec, v1 - v);
        Vec qv[kRowsQ], s[kRowsQ];
        for (int64_t r = 0; r < kRowsQ; ++r) {
          qv[r] = Vec::loadu(qr[r] + v, n);
          s[r] = zero;
        }
        for (int64_t j = 0; j < Bp; ++j) {
          const Vec pv = Vec::loadu(pp + j * V + v, n);
          for (int64_t r = 0; r < kRowsQ; ++r) {
            const Vec d = qv[r] - pv, g(gr[r][j]);
            // + G where q > p, − G where q < p, 0 where equal
            s[r] = s[r] + (g & (d > zero)) - (g & (d < zero));
          }
        }
        for (int64_t r = 0; r < nr; ++r) s[r].store(dp + (i0 + r) * V + v, n);
      }
    }
  });
  return dq;
}

// Row softmax of z / T (float32 rows of length V), in parallel over rows.
at::Tensor softmax_rows(const at::Tensor& z, double temperature) {
  auto out = at::empty_like(z);
  const int64_t B = z.size(0), V = z.size(1);
  const float inv_t = float(1.0 / temperature);
  const float* zp = z.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* zr = zp + r * V;
      float* orow = op + r * V;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t v = 0; v < V; ++v) m = std::max(m, zr[v] * inv_t);
      const Vec vm(m), vt(inv_t);
      double sum = 0.0;
      for (int64_t v = 0; v < V; v += kVec) {
        const int64_t n = std::min(kVec, V - v);
        const Vec e = (Vec::loadu(zr + v, n) * vt - vm).exp_u20();
        e.store(orow + v, n);
        alignas(64) float b[kVec];
        e.store(b);
        for (int64_t k = 0; k < n; ++k) sum += b[k];
      }
      const Vec scale(static_cast<float>(1.0 / sum));
      for (int64_t v = 0; v < V; v += kVec) {
        const int64_t n = std::min(kVec, V - v);
        (Vec::loadu(orow + v, n) * scale).store(orow + v, n);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkd_l1_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                                   double temperature) {
  check_rows("sinkd_l1_forward", student, teacher);
  TORCH_CHECK(temperature > 0, "sinkd_l1_forward: temperature must be > 0");
  auto q = softmax_rows(student, temperature);
  auto p = softmax_rows(teacher, temperature);
  return {l1_cost(q, p), q, p};
}

at::Tensor sinkd_l1_backward_cpu(const at::Tensor& q, const at::Tensor& p, const at::Tensor& grad, double temperature) {
  check_rows("sinkd_l1_backward", q, p);
  const int64_t Bq = q.size(0), V = q.size(1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == Bq && grad.size(1) == p.size(0) &&
                  grad.scalar_type() == at::kFloat && grad.is_contiguous(),
              "sinkd_l1_backward: grad must be a contiguous float32 (", Bq, ", ", p.size(0), ") tensor");
  TORCH_CHECK(temperature > 0, "sinkd_l1_backward: temperature must be > 0");
  auto dz = l1_cost_backward(q, p, grad);  // dq, turned into dz in place below
  const float* qp = q.data_ptr<float>();
  float* dp = dz.data_ptr<float>();
  const float inv_t = float(1.0 / temperature);
  at::parallel_for(0, Bq, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* qr = qp + r * V;
      float* dr = dp + r * V;
      double c = 0.0;
      for (int64_t v = 0; v < V; ++v) c += double(qr[v]) * dr[v];
      const Vec vc(static_cast<float>(c)), vt(inv_t);
      for (int64_t v = 0; v < V; v += kVec) {
        const int64_t n = std::min(kVec, V - v);
        (Vec::loadu(qr + v, n) * (Vec::loadu(dr + v, n) - vc) * vt).store(dr + v, n);
      }
    }
  });
  return dz;
}

}  // namespace

// Shapes only, so that sinkhorn_kd_loss traces under torch.compile.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkd_l1_forward_meta(const at::Tensor& student, const at::Tensor& teacher,
                                                                    double) {
  return {at::empty_symint({student.sym_size(0), teacher.sym_size(0)}, student.options()),
          at::empty_like(student, at::MemoryFormat::Contiguous), at::empty_like(teacher, at::MemoryFormat::Contiguous)};
}

at::Tensor sinkd_l1_backward_meta(const at::Tensor& q, const at::Tensor&, const at::Tensor&, double) {
  return at::empty_like(q, at::MemoryFormat::Contiguous);
}

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("sinkd_l1_forward", &sinkd_l1_forward_cpu);
  m.impl("sinkd_l1_backward", &sinkd_l1_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastdistill, Meta, m) {
  m.impl("sinkd_l1_forward", &sinkd_l1_forward_meta);
  m.impl("sinkd_l1_backward", &sinkd_l1_backward_meta);
}

}  // namespace fastdistill
