// CPU kernels of the diffusion-distillation ops (fastdistill/diffusion/ops.py;
// the spec is fastdistill/reference/diffusion.py).
//
// Every op sees a batch of B samples of n elements each (the (B, ...) tensors
// flattened to (B, n), contiguous) and per-sample float32 coefficients (B,).
// Each loss is one fused sweep over the data that writes the gradient as it
// goes (no autograd graph, no temporaries), and returns one float32 number per
// sample, reduced by the caller:
//   dmd_forward          pass 1: N = max(Σ|x − x0_real| / n, eps); pass 2:
//                        g = (x0_fake − x0_real) / N, loss ½ w Σ g²,
//                        gradient scale·w·g (exactly w·g at scale 1)
//   denoising_forward    r = pred − target (ε, x0 or α ε − σ x0):
//                        loss w Σ r², gradient 2 w scale r
//   consistency_forward  r = c_skip x_t + c_out pred − target: "l2" loss w Σ r²,
//                        gradient 2 w c_out scale r; "pseudo_huber" (pass 1:
//                        D = Σ r²) loss w (√(D + c²) − c), gradient
//                        w c_out scale r / √(D + c²)
//   ddim_affine          out = a x + b y + c z per sample (a DDIM step and,
//                        with one term, each of its input gradients)
// The two-pass ops read a sample twice; when one thread owns the sample the
// second pass finds it in cache.
//
// Parallelism: samples are spread over threads; when there are few of them
// (fewer than 4 per thread) and they are large, each is cut into parts that
// run in parallel too (partial sums per part, merged per sample between the
// passes). Arithmetic is float32 on ATen's vectors; bf16/fp16 are read and
// written in their own dtype, converted block by block through L1 buffers;
// each block's float32 lane sums are merged in double.
//
// Non-finite values propagate as in the reference. DMD's loss there is
// ½ Σ g·w g + Σ (x − sg(x))·w g, whose second term is 0, or NaN where some x
// or some w g is not finite: the kernel adds w (Σ (x − x) + Σ (g − g)), the
// same 0-or-NaN, without reading x in pass 2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "common/memory.h"
#include "common/vec.h"

namespace fastdistill {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
constexpr int64_t kBlock = 1024;    // elements per block: a block's float buffers stay in L1
constexpr int64_t kMinPart = 8192;  // a sample is cut into parts of at least this many elements
constexpr int64_t kSerial = 32768;  // a batch smaller than this runs on one thread

// The codes of fastdistill.reference.diffusion.PREDICTIONS and METRICS.
enum Prediction : int64_t { kEps = 0, kX0 = 1, kV = 2 };
enum Metric : int64_t { kL2 = 0, kPseudoHuber = 1 };

// One input, read as float32 blocks: in place (float32) or converted into a buffer.
struct Src {
  const void* p = nullptr;
  at::ScalarType t = at::kFloat;
  Src() = default;
  explicit Src(const at::Tensor& x) : p(x.data_ptr()), t(x.scalar_type()) {}
  explicit Src(const std::optional<at::Tensor>& x) {
    if (x) *this = Src(*x);
  }
  const float* get(int64_t i, int64_t m, float* buf) const {
    if (t == at::kFloat) return static_cast<const float*>(p) + i;
    if (t == at::kBFloat16) {
      at::vec::convert(static_cast<const at::BFloat16*>(p) + i, buf, m);
    } else {
      at::vec::convert(static_cast<const at::Half*>(p) + i, buf, m);
    }
    return buf;
  }
};

// One output, written as float32 blocks: in place (float32), or into a buffer
// that put() converts into the tensor's dtype.
struct Dst {
  void* p = nullptr;
  at::ScalarType t = at::kFloat;
  Dst() = default;
  explicit Dst(const at::Tensor& x) : p(x.data_ptr()), t(x.scalar_type()) {}
  float* at(int64_t i, float* buf) const { return t == at::kFloat ? static_cast<float*>(p) + i : buf; }
  void put(int64_t i, int64_t m, const float* buf) const {
    if (t == at::kBFloat16) {
      at::vec::convert(buf, static_cast<at::BFloat16*>(p) + i, m);
    } else if (t == at::kHalf) {
      at::vec::convert(buf, static_cast<at::Half*>(p) + i, m);
    }
  }
};

// Loads/stores of `c` lanes (c < kVec: the tail of a block; missing lanes read 0).
inline Vec ld(const float* p, int64_t c) { return c == kVec ? Vec::loadu(p) : Vec::loadu(p, c); }
inline void st(const Vec& v, float* p, int64_t c) {
  if (c == kVec) {
    v.store(p);
  } else {
    v.store(p, c);
  }
}

// f(offset, lanes) for the vectors of a block of m elements.
template <typename F>
inline void lanes(int64_t m, F&& f) {
  for (int64_t j = 0; j < m; j += kVec) f(j, std::min(kVec, m - j));
}

// Two partial sums of one sample (or part of one).
struct Sums {
  double a = 0.0, b = 0.0;
  void add(const Sums& o) {
    a += o.a;
    b += o.b;
  }
};

// How a batch is cut: `parts` parts of `len` elements (a multiple of kBlock) per sample.
struct Plan {
  int64_t B, n, parts, len;
  int64_t lo(int64_t p) const { return p * len; }
  int64_t hi(int64_t p) const { return std::min(n, (p + 1) * len); }
};

Plan make_plan(int64_t B, int64_t n) {
  const int64_t threads = at::get_num_threads();
  int64_t parts = 1;
  if (threads > 1 && B < 4 * threads && n >= 2 * kMinPart) {
    parts = std::min(n / kMinPart, (4 * threads + B - 1) / B);
  }
  const int64_t len = ((n + parts - 1) / parts + kBlock - 1) / kBlock * kBlock;
  return {B, n, (n + len - 1) / len, len};
}

// f(task, sample, lo, hi) for every part of every sample, spread over threads
// unless the whole batch is small.
template <typename F>
void for_parts(const Plan& P, F&& f) {
  const int64_t grain = std::max<int64_t>(1, kSerial / std::min(P.len, P.n));
  at::parallel_for(0, P.B * P.parts, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / P.parts, p = t % P.parts;
      f(t, s, P.lo(p), P.hi(p));
    }
  });
}

// Per-sample sums of f(sample, lo, hi) -> Sums over the sample's parts.
template <typename F>
std::vector<Sums> one_pass(const Plan& P, F&& f) {
  std::vector<Sums> part(P.B * P.parts), out(P.B);
  for_parts(P, [&](int64_t t, int64_t s, int64_t lo, int64_t hi) { part[t] = f(s, lo, hi); });
  for (int64_t s = 0; s < P.B; ++s) {
    for (int64_t p = 0; p < P.parts; ++p) out[s].add(part[s * P.parts + p]);
  }
  return out;
}

// pass1 over each whole sample, mid(sample, its pass-1 sums) -> the sample's
// constant k, then pass2(sample, lo, hi, k). Whole samples owned by one
// thread run both passes back to back.
template <typename P1, typename M, typename P2>
void two_pass(const Plan& P, P1&& pass1, M&& mid, P2&& pass2, std::vector<Sums>& s1,
              std::vector<float>& k, std::vector<Sums>& s2) {
  if (P.parts == 1) {
    s1.assign(P.B, Sums{});
    s2.assign(P.B, Sums{});
    k.assign(P.B, 0.f);
    for_parts(P, [&](int64_t, int64_t s, int64_t lo, int64_t hi) {
      s1[s] = pass1(s, lo, hi);
      k[s] = mid(s, s1[s]);
      s2[s] = pass2(s, lo, hi, k[s]);
    });
    return;
  }
  s1 = one_pass(P, pass1);
  k.resize(P.B);
  for (int64_t s = 0; s < P.B; ++s) k[s] = mid(s, s1[s]);
  s2 = one_pass(P, [&](int64_t s, int64_t lo, int64_t hi) { return pass2(s, lo, hi, k[s]); });
}

// ------------------------------------------------------------------- DMD
struct Dmd {
  Src x, real, fake;
  const float* w;  // (B,) or null (1)
  Dst grad;        // p null: no gradient
  int64_t n;
  float scale, eps;

  float weight(int64_t s) const { return w ? w[s] : 1.f; }

  // a = Σ |x − x0_real|, b = Σ (x − x): 0, or NaN where some x is not finite.
  Sums pass1(int64_t s, int64_t lo, int64_t hi) const {
    alignas(64) float bx[kBlock], br[kBlock];
    Sums out;
    for (int64_t i = s * n + lo, end = s * n + hi; i < end; i += kBlock) {
      const int64_t m = std::min(kBlock, end - i);
      const float* px = x.get(i, m, bx);
      const float* pr = real.get(i, m, br);
      Vec dist(0.f), flag(0.f);
      lanes(m, [&](int64_t j, int64_t c) {
        const Vec vx = ld(px + j, c);
        dist = dist + (vx - ld(pr + j, c)).abs();
        flag = flag + (vx - vx);
      });
      out.a += hsum(dist);
      out.b += hsum(flag);
    }
    return out;
  }

  // The normalizer mean|x − x0_real| guarded against 0 (NaN stays NaN).
  float norm(const Sums& s1) const {
    const float v = float(s1.a / double(n));
    return v < eps ? eps : v;
  }

  // a = Σ g², b = Σ (g − g); writes scale·w·g.
  Sums pass2(int64_t s, int64_t lo, int64_t hi, float norm) const {
    alignas(64) float br[kBlock], bf[kBlock], bg[kBlock];
    const Vec vn(norm), coef(weight(s) * scale);
    const bool write = grad.p != nullptr;
    Sums out;
    for (int64_t i = s * n + lo, end = s * n + hi; i < end; i += kBlock) {
      const int64_t m = std::min(kBlock, end - i);
      const float* pr = real.get(i, m, br);
      const float* pf = fake.get(i, m, bf);
      float* pg = write ? grad.at(i, bg) : nullptr;
      Vec sq(0.f), flag(0.f);
      lanes(m, [&](int64_t j, int64_t c) {
        const Vec g = (ld(pf + j, c) - ld(pr + j, c)) / vn;
        sq = sq + g * g;
        flag = flag + (g - g);
        if (write) st(g * coef, pg + j, c);
      });
      if (write) grad.put(i, m, pg);
      out.a += hsum(sq);
      out.b += hsum(flag);
    }
    return out;
  }
};

// ------------------------------------------------------------- denoising
struct Denoising {
  Src pred, x0, noise;  // x0 / noise unset where the prediction does not read them
  const float *alpha, *sigma, *w;
  Dst grad;
  int64_t n, prediction;
  float scale;

  Sums run(int64_t s, int64_t lo, int64_t hi) const {
    alignas(64) float bp[kBlock], b0[kBlock], bn[kBlock], bg[kBlock];
    const Vec a(alpha[s]), sg(sigma[s]), coef(2.f * w[s] * scale);
    const bool write = grad.p != nullptr;
    const int64_t kind = prediction;
    Sums out;
    for (int64_t i = s * n + lo, end = s * n + hi; i < end; i += kBlock) {
      const int64_t m = std::min(kBlock, end - i);
      const float* pp = pred.get(i, m, bp);
      const float* p0 = kind == kEps ? nullptr : x0.get(i, m, b0);
      const float* pn = kind == kX0 ? nullptr : noise.get(i, m, bn);
      float* pg = write ? grad.at(i, bg) : nullptr;
      Vec sq(0.f);
      lanes(m, [&](int64_t j, int64_t c) {
        Vec target;
        if (kind == kEps) {
          target = ld(pn + j, c);
        } else if (kind == kX0) {
          target = ld(p0 + j, c);
        } else {  // v = α ε − σ x0
          target = a * ld(pn + j, c) - sg * ld(p0 + j, c);
        }
        const Vec r = ld(pp + j, c) - target;
        sq = sq + r * r;
        if (write) st(r * coef, pg + j, c);
      });
      if (write) grad.put(i, m, pg);
      out.a += hsum(sq);
    }
    return out;
  }
};

// ----------------------------------------------------------- consistency
struct Consistency {
  Src pred, target, xt;  // xt unset: f = pred
  const float *c_skip, *c_out;  // null without x_t
  Dst grad;
  int64_t n;

  float out_coef(int64_t s) const { return c_out ? c_out[s] : 1.f; }

  // a = Σ r², r = f − target; with `write` (grad set) writes coef·r.
  Sums sweep(int64_t s, int64_t lo, int64_t hi, bool write, float coef) const {
    alignas(64) float bp[kBlock], by[kBlock], bx[kBlock], bg[kBlock];
    const bool boundary = xt.p != nullptr;
    const Vec cs(boundary ? c_skip[s] : 0.f), co(out_coef(s)), vk(coef);
    write = write && grad.p != nullptr;
    Sums out;
    for (int64_t i = s * n + lo, end = s * n + hi; i < end; i += kBlock) {
      const int64_t m = std::min(kBlock, end - i);
      const float* pp = pred.get(i, m, bp);
      const float* py = target.get(i, m, by);
      const float* px = boundary ? xt.get(i, m, bx) : nullptr;
      float* pg = write ? grad.at(i, bg) : nullptr;
      Vec sq(0.f);
      lanes(m, [&](int64_t j, int64_t c) {
        Vec f = ld(pp + j, c);
        if (boundary) f = cs * ld(px + j, c) + co * f;
        const Vec r = f - ld(py + j, c);
        sq = sq + r * r;
        if (write) st(r * vk, pg + j, c);
      });
      if (write) grad.put(i, m, pg);
      out.a += hsum(sq);
    }
    return out;
  }
};

// ------------------------------------------------------------ DDIM's step
struct Affine {
  Src x, y, z;  // y / z unset: no such term
  const float *a, *b, *c;
  Dst out;
  int64_t n;

  void run(int64_t s, int64_t lo, int64_t hi) const {
    alignas(64) float bx[kBlock], by[kBlock], bz[kBlock], bo[kBlock];
    const bool has_y = y.p != nullptr, has_z = z.p != nullptr;
    const Vec va(a[s]), vb(has_y ? b[s] : 0.f), vc(has_z ? c[s] : 0.f);
    for (int64_t i = s * n + lo, end = s * n + hi; i < end; i += kBlock) {
      const int64_t m = std::min(kBlock, end - i);
      const float* px = x.get(i, m, bx);
      const float* py = has_y ? y.get(i, m, by) : nullptr;
      const float* pz = has_z ? z.get(i, m, bz) : nullptr;
      float* po = out.at(i, bo);
      lanes(m, [&](int64_t j, int64_t cnt) {
        Vec v = va * ld(px + j, cnt);
        if (has_y) v = v + vb * ld(py + j, cnt);
        if (has_z) v = v + vc * ld(pz + j, cnt);
        st(v, po + j, cnt);
      });
      out.put(i, m, po);
    }
  }
};

// ---------------------------------------------------------------- checks
bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// The first input: a non-empty batch (B, ...), contiguous; returns n.
int64_t check_batch(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(0) >= 1 && x.numel() > 0, op, ": ", name,
              " must be a non-empty batch (B, ...), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), op, ": ", name, " must be float32, bfloat16 or float16, got ",
              x.scalar_type());
  return x.numel() / x.size(0);
}

void check_like(const char* op, const char* name, const at::Tensor& y, const at::Tensor& x) {
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": ", name, " must have shape ", x.sizes(), ", got ", y.sizes());
  TORCH_CHECK(y.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(is_kernel_dtype(y.scalar_type()), op, ": ", name, " must be float32, bfloat16 or float16, got ",
              y.scalar_type());
}

const float* check_coef(const char* op, const char* name, const at::Tensor& c, int64_t B) {
  TORCH_CHECK(c.dim() == 1 && c.size(0) == B && c.scalar_type() == at::kFloat && c.is_contiguous(), op, ": ",
              name, " must be a contiguous float32 tensor of shape (", B, ",), got ", c.scalar_type(), " ",
              c.sizes());
  return c.data_ptr<float>();
}

const float* check_coef(const char* op, const char* name, const std::optional<at::Tensor>& c, int64_t B) {
  return c ? check_coef(op, name, *c, B) : nullptr;
}

at::Tensor new_gradient(const at::Tensor& like, bool need_grad) {
  return need_grad ? empty_gradient_like(like) : like.new_empty({0});
}

// ------------------------------------------------------------------- ops
std::tuple<at::Tensor, at::Tensor> dmd_forward_cpu(const at::Tensor& x, const at::Tensor& x0_real,
                                                   const at::Tensor& x0_fake,
                                                   const std::optional<at::Tensor>& weight, double grad_scale,
                                                   double eps, bool need_grad) {
  const char* op = "dmd_forward";
  const int64_t n = check_batch(op, "x", x), B = x.size(0);
  check_like(op, "x0_real", x0_real, x);
  check_like(op, "x0_fake", x0_fake, x);
  TORCH_CHECK(eps > 0, op, ": eps must be > 0");
  auto grad = new_gradient(x, need_grad);
  auto loss = at::empty({B}, x.options().dtype(at::kFloat));
  const Dmd k{Src(x), Src(x0_real), Src(x0_fake), check_coef(op, "weight", weight, B),
              need_grad ? Dst(grad) : Dst(), n, float(grad_scale), float(eps)};
  std::vector<Sums> s1, s2;
  std::vector<float> norm;
  two_pass(
      make_plan(B, n), [&](int64_t s, int64_t lo, int64_t hi) { return k.pass1(s, lo, hi); },
      [&](int64_t, const Sums& a) { return k.norm(a); },
      [&](int64_t s, int64_t lo, int64_t hi, float nm) { return k.pass2(s, lo, hi, nm); }, s1, norm, s2);
  float* l = loss.data_ptr<float>();
  for (int64_t s = 0; s < B; ++s) {
    const double w = k.weight(s);
    l[s] = float(0.5 * w * s2[s].a + w * (s1[s].b + s2[s].b));
  }
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> denoising_forward_cpu(const at::Tensor& pred,
                                                         const std::optional<at::Tensor>& x0,
                                                         const std::optional<at::Tensor>& noise,
                                                         const at::Tensor& alpha, const at::Tensor& sigma,
                                                         const at::Tensor& weight, int64_t prediction,
                                                         double grad_scale, bool need_grad) {
  const char* op = "denoising_forward";
  const int64_t n = check_batch(op, "pred", pred), B = pred.size(0);
  TORCH_CHECK(prediction >= kEps && prediction <= kV, op, ": unknown prediction ", prediction);
  TORCH_CHECK(prediction == kEps || x0, op, ": this prediction needs x0");
  TORCH_CHECK(prediction == kX0 || noise, op, ": this prediction needs noise");
  if (x0) check_like(op, "x0", *x0, pred);
  if (noise) check_like(op, "noise", *noise, pred);
  auto grad = new_gradient(pred, need_grad);
  auto loss = at::empty({B}, pred.options().dtype(at::kFloat));
  const Denoising k{Src(pred), Src(x0), Src(noise), check_coef(op, "alpha", alpha, B),
                    check_coef(op, "sigma", sigma, B), check_coef(op, "weight", weight, B),
                    need_grad ? Dst(grad) : Dst(), n, prediction, float(grad_scale)};
  const auto sums = one_pass(make_plan(B, n), [&](int64_t s, int64_t lo, int64_t hi) { return k.run(s, lo, hi); });
  float* l = loss.data_ptr<float>();
  for (int64_t s = 0; s < B; ++s) l[s] = float(double(k.w[s]) * sums[s].a);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> consistency_forward_cpu(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& x_t,
    const std::optional<at::Tensor>& c_skip, const std::optional<at::Tensor>& c_out,
    const std::optional<at::Tensor>& weight, int64_t metric, double c, double grad_scale, bool need_grad) {
  const char* op = "consistency_forward";
  const int64_t n = check_batch(op, "pred", pred), B = pred.size(0);
  check_like(op, "target", target, pred);
  TORCH_CHECK(metric == kL2 || metric == kPseudoHuber, op, ": unknown metric ", metric);
  TORCH_CHECK(metric == kL2 || c > 0, op, ": c must be > 0");
  TORCH_CHECK(bool(x_t) == bool(c_skip) && bool(x_t) == bool(c_out), op,
              ": x_t, c_skip and c_out go together");
  if (x_t) check_like(op, "x_t", *x_t, pred);
  auto grad = new_gradient(pred, need_grad);
  auto loss = at::empty({B}, pred.options().dtype(at::kFloat));
  const Consistency k{Src(pred), Src(target), Src(x_t), check_coef(op, "c_skip", c_skip, B),
                      check_coef(op, "c_out", c_out, B), need_grad ? Dst(grad) : Dst(), n};
  const float* w = check_coef(op, "weight", weight, B);
  auto weight_of = [&](int64_t s) { return w ? double(w[s]) : 1.0; };
  const Plan P = make_plan(B, n);
  float* l = loss.data_ptr<float>();
  if (metric == kL2) {
    const auto sums = one_pass(P, [&](int64_t s, int64_t lo, int64_t hi) {
      return k.sweep(s, lo, hi, true, float(2.0 * weight_of(s) * k.out_coef(s) * grad_scale));
    });
    for (int64_t s = 0; s < B; ++s) l[s] = float(weight_of(s) * sums[s].a);
    return {loss, grad};
  }
  // pseudo-Huber: √(D + c²) − c = D / (√(D + c²) + c), without the cancellation at small D.
  std::vector<Sums> s1, s2;
  std::vector<float> coef;
  two_pass(
      P, [&](int64_t s, int64_t lo, int64_t hi) { return k.sweep(s, lo, hi, false, 0.f); },
      [&](int64_t s, const Sums& a) {
        return float(weight_of(s) * k.out_coef(s) * grad_scale / std::sqrt(a.a + c * c));
      },
      [&](int64_t s, int64_t lo, int64_t hi, float kc) {
        return need_grad ? k.sweep(s, lo, hi, true, kc) : Sums{};
      },
      s1, coef, s2);
  for (int64_t s = 0; s < B; ++s) {
    const double d = s1[s].a, q = std::sqrt(d + c * c);
    l[s] = float(weight_of(s) * (std::isfinite(d) ? d / (q + c) : q - c));
  }
  return {loss, grad};
}

at::Tensor ddim_affine_cpu(const at::Tensor& x, const at::Tensor& a, const std::optional<at::Tensor>& y,
                           const std::optional<at::Tensor>& b, const std::optional<at::Tensor>& z,
                           const std::optional<at::Tensor>& c, at::ScalarType dtype) {
  const char* op = "ddim_affine";
  const int64_t n = check_batch(op, "x", x), B = x.size(0);
  TORCH_CHECK(bool(y) == bool(b) && bool(z) == bool(c), op, ": each term needs its coefficient");
  TORCH_CHECK(is_kernel_dtype(dtype), op, ": dtype must be float32, bfloat16 or float16");
  if (y) check_like(op, "y", *y, x);
  if (z) check_like(op, "z", *z, x);
  auto out = empty_cpu_cached(x.sizes(), dtype);
  const Affine k{Src(x), Src(y), Src(z), check_coef(op, "a", a, B), check_coef(op, "b", b, B),
                 check_coef(op, "c", c, B), Dst(out), n};
  for_parts(make_plan(B, n), [&](int64_t, int64_t s, int64_t lo, int64_t hi) { k.run(s, lo, hi); });
  return out;
}

// Shapes only, so that the ops trace under torch.compile.
std::tuple<at::Tensor, at::Tensor> loss_and_grad_meta(const at::Tensor& x, bool need_grad) {
  auto loss = at::empty_symint({x.sym_size(0)}, x.options().dtype(at::kFloat));
  auto grad = need_grad ? at::empty_like(x, at::MemoryFormat::Contiguous) : x.new_empty({0});
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> dmd_forward_meta(const at::Tensor& x, const at::Tensor&, const at::Tensor&,
                                                    const std::optional<at::Tensor>&, double, double,
                                                    bool need_grad) {
  return loss_and_grad_meta(x, need_grad);
}

std::tuple<at::Tensor, at::Tensor> denoising_forward_meta(const at::Tensor& pred, const std::optional<at::Tensor>&,
                                                          const std::optional<at::Tensor>&, const at::Tensor&,
                                                          const at::Tensor&, const at::Tensor&, int64_t, double,
                                                          bool need_grad) {
  return loss_and_grad_meta(pred, need_grad);
}

std::tuple<at::Tensor, at::Tensor> consistency_forward_meta(
    const at::Tensor& pred, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, double, double, bool need_grad) {
  return loss_and_grad_meta(pred, need_grad);
}

at::Tensor ddim_affine_meta(const at::Tensor& x, const at::Tensor&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, at::ScalarType dtype) {
  return at::empty_like(x, x.options().dtype(dtype), at::MemoryFormat::Contiguous);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("dmd_forward", &dmd_forward_cpu);
  m.impl("denoising_forward", &denoising_forward_cpu);
  m.impl("consistency_forward", &consistency_forward_cpu);
  m.impl("ddim_affine", &ddim_affine_cpu);
}

TORCH_LIBRARY_IMPL(fastdistill, Meta, m) {
  m.impl("dmd_forward", &dmd_forward_meta);
  m.impl("denoising_forward", &denoising_forward_meta);
  m.impl("consistency_forward", &consistency_forward_meta);
  m.impl("ddim_affine", &ddim_affine_meta);
}

}  // namespace fastdistill
