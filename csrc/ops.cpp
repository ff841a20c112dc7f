// Every fastdistill op's schema, in one place. Backends register kernels for
// these names with TORCH_LIBRARY_IMPL in their family's folder.
#include <torch/library.h>

TORCH_LIBRARY(fastdistill, m) {
  // KD divergence family (fastdistill/kd/loss.py). One fused pass per row:
  // returns the per-row loss (float32, 0 at ignored rows) and the gradient of
  // (the reduced) loss with respect to the student logits, in the student's
  // dtype. `divergence` indexes fastdistill.reference.kd.DIVERGENCES; `param`
  // is beta (jsd), skew (skew_*) or t (taid). With mean_scale the gradient is
  // divided by the number of rows that are not ignored. Without need_grad
// the gradient is not computed and comes back empty.
  m.def(
      "kd_forward(Tensor student, Tensor teacher, Tensor? labels, int ignore_index, "
      "int divergence, float param, float temperature, float hard_weight, "
      "float soft_scale, bool mean_scale, bool need_grad) -> (Tensor, Tensor)");
  // Same, but the gradient overwrites the student logits; returns the loss rows.
  m.def(
      "kd_forward_inplace(Tensor(a!) student, Tensor teacher, Tensor? labels, "
      "int ignore_index, int divergence, float param, float temperature, "
      "float hard_weight, float soft_scale, bool mean_scale) -> Tensor");
  // Sparse-teacher KD (fastdistill/kd/sparse.py). Per row: K teacher (id,
  // log-probability) pairs, int64 ids and float32/float64 log-probs with -inf
  // marking padding; `tail` indexes fastdistill.sparse.TAILS (bucket,
  // renormalize, none); other arguments and the returned (loss rows, gradient)
  // as in kd_forward. The ids of finite entries must be distinct (the Python
  // caller checks; ranges are checked here).
  m.def(
      "sparse_kd_forward(Tensor student, Tensor ids, Tensor logprobs, Tensor? labels, "
      "int ignore_index, int divergence, int tail, float param, float temperature, "
      "float hard_weight, float soft_scale, bool mean_scale, bool need_grad) -> (Tensor, Tensor)");
  // Same, but the gradient overwrites the student logits; returns the loss rows.
  m.def(
      "sparse_kd_forward_inplace(Tensor(a!) student, Tensor ids, Tensor logprobs, Tensor? labels, "
      "int ignore_index, int divergence, int tail, float param, float temperature, "
      "float hard_weight, float soft_scale, bool mean_scale) -> Tensor");
  // Packed soft labels (fastdistill/softlabels): the sparse-teacher loss with
  // the teacher as packed uint8 rows (N, row_bytes), unpacked in the kernel;
  // `layout` is Codec.layout() (method, vocab size, k, value bits, id bits,
  // values offset, ids offset, row bytes). Otherwise as sparse_kd_forward.
  m.def(
      "softlabel_kd_forward(Tensor student, Tensor packed, int[] layout, Tensor? labels, "
      "int ignore_index, int divergence, int tail, float param, float temperature, "
      "float hard_weight, float soft_scale, bool mean_scale, bool need_grad) -> (Tensor, Tensor)");
  m.def(
      "softlabel_kd_forward_inplace(Tensor(a!) student, Tensor packed, int[] layout, Tensor? labels, "
      "int ignore_index, int divergence, int tail, float param, float temperature, "
      "float hard_weight, float soft_scale, bool mean_scale) -> Tensor");
  // Packed rows → (ids int64 (N, k), log-probs float32 (N, k)); CPU and CUDA.
  m.def("softlabel_decode(Tensor packed, int[] layout) -> (Tensor, Tensor)");
  // Entropic OT between point clouds (fastdistill/ot.py), costs built tile by
  // tile, never stored: x (B, N, d), y (B, M, d) float32, cost
  // C_ij = |x_i - y_j|^p / p (p = 1 or 2). ot_softmin: the Sinkhorn half-step,
  // out (B, N) = -eps * LSE_j(h_j - C_ij / eps) for h (B, M) = g / eps + log b.
  m.def("ot_softmin(Tensor x, Tensor y, Tensor h, float eps, int p) -> Tensor");
  // The envelope gradient: out (B, N, d) = sum_j P_ij * d C(x_i, y_j) / d x_i,
  // P_ij = exp(l_i + h_j - C_ij / eps), l (B, N) = f / eps + log a.
  m.def("ot_transport_grad(Tensor x, Tensor y, Tensor l, Tensor h, float eps, int p) -> Tensor");
  // Log-domain Sinkhorn on a given cost (fastdistill/ot.py's sinkhorn and the
  // tensorized sinkhorn_divergence): cost (B, N, M) contiguous float32,
  // bfloat16 or float16 (read in its dtype, fp32 accumulation); loga (B, N),
  // logb (B, M) float32 log-weights (-inf for a zero weight); eps (R,) the ε
  // of each of the R rounds (a CPU tensor, float64). sinkhorn_solve: g = 0,
  // f = row update at eps[0], then R rounds of (g update at eps[k], f update
  // at eps[k + 1]) as ot._iterate; tol > 0 stops each problem at the first
  // round whose row-marginal L1 error is below tol (tol <= 0: all R rounds).
  // Returns (f (B, N), g (B, M)) float32. sinkhorn_solve_symmetric: the
  // averaged self-transport update of a square cost (ot._iterate_symmetric),
  // returns f (B, N).
  m.def("sinkhorn_solve(Tensor cost, Tensor loga, Tensor logb, Tensor eps, float tol) -> (Tensor, Tensor)");
  m.def("sinkhorn_solve_symmetric(Tensor cost, Tensor loga, Tensor eps) -> Tensor");
  // One half-step: dim = 2: out (B, N) = -eps * LSE_j(h_j - C_ij / eps), h (B, M);
  // dim = 1: out (B, M) = -eps * LSE_i(h_i - C_ij / eps), h (B, N).
  m.def("sinkhorn_softmin(Tensor cost, Tensor h, float eps, int dim) -> Tensor");
  // The plan P_ij = scale_b * exp((f_i + g_j - C_ij) / eps + loga_i + logb_j)
  // (B, N, M) in dtype (scale: (B,) float32, None = 1), and the value
  // (B,) = sum_ij P_ij C_ij (scale 1) without storing P.
  m.def("sinkhorn_plan(Tensor cost, Tensor f, Tensor g, Tensor loga, Tensor logb, float eps, Tensor? scale, "
        "ScalarType dtype) -> Tensor");
  m.def("sinkhorn_value(Tensor cost, Tensor f, Tensor g, Tensor loga, Tensor logb, float eps) -> Tensor");
  // SinKD's L1 cost from float32 logits, student (Bq, V) and teacher (Bp, V):
  // q = softmax(student / T), p = softmax(teacher / T), W (Bq, Bp) =
  // sum_v |q_iv - p_jv|; returns (W, q, p). The backward takes q, p and
  // G = dL/dW and returns dL/d student (Bq, V) through sign(q - p) and the softmax.
  m.def("sinkd_l1_forward(Tensor student, Tensor teacher, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def("sinkd_l1_backward(Tensor q, Tensor p, Tensor grad, float temperature) -> Tensor");
  // Gradient matching (fastdistill/dd/losses.py): a and b flat float32, cut
  // into S consecutive segments by offsets (S + 1,) int64. Forward: (S, 3)
  // float64 [dot, |a|, |b|] per segment; the distance is
  // sum_s (1 - dot / (|a||b| + eps)). Backward: its gradient times grad (one number).
  m.def("segment_cosine_forward(Tensor a, Tensor b, Tensor offsets) -> Tensor");
  m.def("segment_cosine_backward(Tensor a, Tensor b, Tensor offsets, Tensor stats, Tensor grad, "
        "float eps) -> (Tensor, Tensor)");
  // Diffusion distillation (fastdistill/diffusion/ops.py; the spec is
  // fastdistill/reference/diffusion.py). A batch (B, ...) of B samples of n
  // elements, contiguous, float32/bf16/fp16 (each input its own dtype);
  // per-sample coefficients are contiguous float32 (B,). Each loss returns one
  // float32 value per sample — the sum over its elements (dmd, denoising,
  // consistency "l2") or its value (pseudo-Huber) — and the gradient of
  // grad_scale * (that value) w.r.t. the first input, in its dtype (empty
  // without need_grad). dmd: g = (x0_fake - x0_real) / max(mean|x - x0_real|, eps),
  // value 1/2 w sum g^2, gradient grad_scale * w * g. denoising: `prediction`
  // indexes PREDICTIONS (target noise, x0, alpha*noise - sigma*x0; x0 / noise
  // may be None where unread), value w sum (pred - target)^2. consistency:
  // `metric` indexes METRICS, r = c_skip x_t + c_out pred - target (r = pred -
  // target without x_t), value w sum r^2 or w (sqrt(sum r^2 + c^2) - c).
  m.def("dmd_forward(Tensor x, Tensor x0_real, Tensor x0_fake, Tensor? weight, float grad_scale, "
        "float eps, bool need_grad) -> (Tensor, Tensor)");
  m.def("denoising_forward(Tensor pred, Tensor? x0, Tensor? noise, Tensor alpha, Tensor sigma, "
        "Tensor weight, int prediction, float grad_scale, bool need_grad) -> (Tensor, Tensor)");
  m.def("consistency_forward(Tensor pred, Tensor target, Tensor? x_t, Tensor? c_skip, Tensor? c_out, "
        "Tensor? weight, int metric, float c, float grad_scale, bool need_grad) -> (Tensor, Tensor)");
  // DDIM's step as per-sample coefficients: out = a x + b y + c z (the y / z
  // terms optional), in `dtype`; also each of the step's input gradients.
  m.def("ddim_affine(Tensor x, Tensor a, Tensor? y, Tensor? b, Tensor? z, Tensor? c, "
        "ScalarType dtype) -> Tensor");
  // The CPU gradient cache (csrc/common/memory.h, fastdistill/cpu_cache.py).
  // new: an uninitialised contiguous CPU tensor, from the cache when it is
  // 8 MiB or more (the Python side's large per-step buffers); stats -> [idle
  // bytes, idle blocks, live bytes, live blocks, hits, misses, limit bytes];
  // empty unmaps the idle blocks; set_limit caps them (0: off).
  m.def("cpu_cache_new(int[] size, ScalarType dtype) -> Tensor");
  m.def("cpu_cache_stats() -> int[]");
  m.def("cpu_cache_empty() -> ()");
  m.def("cpu_cache_set_limit(int bytes) -> ()");
}
