// CPU ops of the sparse-teacher KD loss (fastdistill/kd/sparse.py): argument
// checks and entry points around the row kernel of sparse/sparse_row.h (whose
// header says how a row is computed), with the teacher as (ids, log-probs).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/memory.h"
#include "sparse/sparse_row.h"

namespace fastdistill {
namespace {

using namespace sparse_row;

void check_inputs(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
                  const std::optional<at::Tensor>& labels, int64_t ignore_index, int64_t divergence,
                  int64_t tail, double temperature, bool need_labels) {
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(),
              "sparse_kd_forward: student must be a contiguous (N, V) tensor");
  TORCH_CHECK(student.size(1) > 0, "sparse_kd_forward: the vocabulary must not be empty");
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == student.size(0) && ids.is_contiguous() &&
                  ids.scalar_type() == at::kLong,
              "sparse_kd_forward: ids must be a contiguous int64 tensor of shape (N, K)");
  TORCH_CHECK(logprobs.sizes() == ids.sizes() && logprobs.is_contiguous() &&
                  (logprobs.scalar_type() == at::kFloat || logprobs.scalar_type() == at::kDouble),
              "sparse_kd_forward: logprobs must be a contiguous float32/float64 tensor shaped like ids");
  TORCH_CHECK(divergence >= 0 && divergence < kNumDivergences && divergence != kTAID,
              "sparse_kd_forward: divergence ", divergence, " is not defined on sparse teachers");
  TORCH_CHECK(tail >= 0 && tail < kNumTails, "sparse_kd_forward: unknown tail ", tail);
  TORCH_CHECK(tail != kNone || divergence == kForwardKL,
              "sparse_kd_forward: tail 'none' supports forward_kl only");
  TORCH_CHECK(temperature > 0, "sparse_kd_forward: temperature must be > 0");
  const int64_t N = student.size(0), V = student.size(1), K = ids.size(1);
  const int64_t* l = nullptr;
  if (labels) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == N && labels->is_contiguous() &&
                    labels->scalar_type() == at::kLong,
                "sparse_kd_forward: labels must be a contiguous int64 tensor of shape (N,)");
    l = labels->data_ptr<int64_t>();
    if (need_labels) {
      for (int64_t i = 0; i < N; ++i) {
        TORCH_CHECK(l[i] == ignore_index || (l[i] >= 0 && l[i] < V), "sparse_kd_forward: labels[", i,
                    "] = ", l[i], " is neither in [0, ", V, ") nor ignore_index");
      }
    }
  } else {
    TORCH_CHECK(!need_labels, "sparse_kd_forward: hard_weight > 0 needs labels");
  }
  // The ids the kernel reads: those of finite entries in rows that count.
  const int64_t* id = ids.data_ptr<int64_t>();
  auto finite = [&](int64_t i) {
    const double v = logprobs.scalar_type() == at::kFloat ? double(logprobs.data_ptr<float>()[i])
                                                          : logprobs.data_ptr<double>()[i];
    return v > -kInf;
  };
  for (int64_t r = 0; r < N; ++r) {
    if (l && l[r] == ignore_index) continue;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = r * K + k;
      TORCH_CHECK(!finite(i) || (id[i] >= 0 && id[i] < V), "sparse_kd_forward: ids[", r, ", ", k, "] = ", id[i],
                  " is not in [0, ", V, ")");
    }
  }
}

// The loss rows; the gradient goes to `grad` (the student itself when in
// place; an undefined tensor: loss only).
at::Tensor sparse_kd_into(const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
                          const std::optional<at::Tensor>& labels, const at::Tensor& grad, int64_t ignore_index,
                          int64_t divergence, int64_t tail, double param, double temperature, double hard_weight,
                          double soft_scale, bool mean_scale) {
  check_inputs(student, ids, logprobs, labels, ignore_index, divergence, tail, temperature, hard_weight > 0);
  const int64_t K = ids.size(1);
  auto run = [&](const auto* lp) {
    using LP = std::remove_const_t<std::remove_pointer_t<decltype(lp)>>;
    return run_rows(student, ListTeacher<LP>{ids.data_ptr<int64_t>(), lp, K}, K, grad, labels, ignore_index,
                    divergence, tail, param, temperature, hard_weight, soft_scale, mean_scale, "sparse_kd_forward");
  };
  return logprobs.scalar_type() == at::kFloat ? run(logprobs.data_ptr<float>()) : run(logprobs.data_ptr<double>());
}

std::tuple<at::Tensor, at::Tensor> sparse_kd_forward_cpu(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
    const std::optional<at::Tensor>& labels, int64_t ignore_index, int64_t divergence, int64_t tail,
    double param, double temperature, double hard_weight, double soft_scale, bool mean_scale,
    bool need_grad) {
  // Without need_grad (evaluation) no N×V buffer is allocated or written.
  at::Tensor grad;
  if (need_grad) grad = empty_gradient_like(student);
  auto loss = sparse_kd_into(student, ids, logprobs, labels, grad, ignore_index, divergence, tail, param,
                             temperature, hard_weight, soft_scale, mean_scale);
  return {loss, need_grad ? grad : student.new_empty({0})};
}

at::Tensor sparse_kd_forward_inplace_cpu(
    at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
    const std::optional<at::Tensor>& labels, int64_t ignore_index, int64_t divergence, int64_t tail,
    double param, double temperature, double hard_weight, double soft_scale, bool mean_scale) {
  return sparse_kd_into(student, ids, logprobs, labels, student, ignore_index, divergence, tail, param,
                        temperature, hard_weight, soft_scale, mean_scale);
}

// Shapes only, so that the op traces under torch.compile (fake tensors run
// the Meta kernel) with no Python-side registration.
std::tuple<at::Tensor, at::Tensor> sparse_kd_forward_meta(
    const at::Tensor& student, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
    int64_t, int64_t, double, double, double, double, bool, bool need_grad) {
  auto loss = at::empty_symint({student.sym_size(0)}, student.options().dtype(at::kFloat));
  auto grad = need_grad ? at::empty_like(student, at::MemoryFormat::Contiguous) : student.new_empty({0});
  return {loss, grad};
}

at::Tensor sparse_kd_forward_inplace_meta(
    at::Tensor& student, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
    int64_t, int64_t, double, double, double, double, bool) {
  return at::empty_symint({student.sym_size(0)}, student.options().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("sparse_kd_forward", &sparse_kd_forward_cpu);
  m.impl("sparse_kd_forward_inplace", &sparse_kd_forward_inplace_cpu);
}

TORCH_LIBRARY_IMPL(fastdistill, Meta, m) {
  m.impl("sparse_kd_forward", &sparse_kd_forward_meta);
  m.impl("sparse_kd_forward_inplace", &sparse_kd_forward_inplace_meta);
}

}  // namespace fastdistill
