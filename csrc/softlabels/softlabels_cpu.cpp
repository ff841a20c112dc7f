// CPU ops of the packed soft labels (fastdistill/softlabels): the sparse-teacher
// loss computed straight from packed rows, and the decode to (ids, log-probs).
//
// The loss is sparse/sparse_row.h's row kernel with a teacher source that
// unpacks the row's ids and values into the per-thread scratch: no int64 id
// tensor and no dense teacher row ever exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <utility>
#include <vector>

#include "common/memory.h"
#include "softlabels/layout.h"
#include "softlabels/packed_row.h"
#include "sparse/sparse_row.h"

namespace fastdistill {
namespace {

using namespace sparse_row;
using packed::Layout;

// The teacher source of the row kernel: entries unpacked from row r.
struct PackedTeacher {
  const uint8_t* data;  // (N, row_bytes)
  Layout L;
  int64_t gather(int64_t r, Scratch& sc) const {
    const uint8_t* row = data + r * L.row_bytes;
    const double shift = packed::row_shift(L, row);
    int64_t n = 0;
    for (int64_t i = 0; i < L.k; ++i) {
      const double raw = packed::raw_value(L, row, i);
      if (!(raw > -kInf)) continue;  // padding / probability 0: no bin
      const int64_t id = packed::id_at(L, row, i);
      sc.id[n] = id;
      sc.sid[n] = id;
      sc.lp[n] = raw + shift;
      ++n;
    }
    return n;
  }
};

// The entries the kernel will read, checked once (O(N·K log K)): a corrupt row
// is an error here, never an out-of-bounds read. The same checks, in the same
// order and with the same messages, as SoftLabels.check_rows in
// fastdistill/softlabels/codec.py (which the Python API runs on every backend).
void check_rows(const at::Tensor& data, const Layout& L, const std::optional<at::Tensor>& labels,
                int64_t ignore_index) {
  const uint8_t* d = data.data_ptr<uint8_t>();
  const int64_t N = data.size(0);
  const int64_t* l = labels ? labels->data_ptr<int64_t>() : nullptr;
  std::vector<std::pair<int64_t, int64_t>> stored;  // (id, entry) of the row's stored entries
  for (int64_t r = 0; r < N; ++r) {
    if (l && l[r] == ignore_index) continue;
    const uint8_t* row = d + r * L.row_bytes;
    const float tail = packed::tail_of(L, row);
    TORCH_CHECK_VALUE(tail >= 0.f && tail <= 1.f, "soft labels row ", r, ": tail mass ", tail,
                      " is not in [0, 1] (corrupt packed row?)");
    for (int64_t i = 0; i < L.k; ++i) {
      const double raw = packed::raw_value(L, row, i);
      TORCH_CHECK_VALUE(!std::isnan(raw) && raw != kInf, "soft labels row ", r, " entry ", i,
                        ": value is NaN or +inf (corrupt packed row?)");
    }
    stored.clear();
    double counts = 0.0;
    for (int64_t i = 0; i < L.k; ++i) {
      const double raw = packed::raw_value(L, row, i);
      if (!(raw > -kInf)) continue;  // padding / probability 0: its id is never read
      const int64_t id = packed::id_at(L, row, i);
      TORCH_CHECK_VALUE(id < L.vocab_size, "soft labels row ", r, " entry ", i, ": id ", id,
                        " is not below the vocabulary size ", L.vocab_size, " (corrupt packed row?)");
      stored.emplace_back(id, i);
      if (L.method == packed::kSampled) counts += std::round(std::exp(raw) * double(L.k));
    }
    TORCH_CHECK_VALUE(L.method != packed::kSampled || counts == double(L.k), "soft labels row ", r,
                      ": sample counts sum to ", int64_t(counts), ", not k=", L.k, " (corrupt packed row?)");
    std::sort(stored.begin(), stored.end());
    for (size_t j = 1; j < stored.size(); ++j) {
      TORCH_CHECK_VALUE(stored[j].first != stored[j - 1].first, "soft labels row ", r, ": id ",
                        stored[j].first, " is stored twice (entries ", stored[j - 1].second, " and ",
                        stored[j].second, "); a packed row never repeats an id (corrupt or hand-made row?)");
    }
  }
}

at::Tensor softlabel_kd_into(const at::Tensor& student, const at::Tensor& data, at::IntArrayRef layout,
                             const std::optional<at::Tensor>& labels, const at::Tensor& grad, int64_t ignore_index,
                             int64_t divergence, int64_t tail, double param, double temperature,
                             double hard_weight, double soft_scale, bool mean_scale) {
  const Layout L = packed::check_layout(data, layout);
  TORCH_CHECK_VALUE(student.dim() == 2 && student.is_contiguous(),
                    "softlabel_kd_forward: student must be a contiguous (N, V) tensor");
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK_VALUE(data.size(0) == N, "softlabel_kd_forward: ", data.size(0), " packed rows for ", N,
                    " student rows");
  TORCH_CHECK_VALUE(V == L.vocab_size, "softlabel_kd_forward: the student's vocabulary (", V,
                    ") differs from the soft labels' (", L.vocab_size, ")");
  TORCH_CHECK_VALUE(divergence >= 0 && divergence < kNumDivergences && divergence != kTAID,
                    "softlabel_kd_forward: divergence ", divergence, " is not defined on sparse teachers");
  TORCH_CHECK_VALUE(tail >= 0 && tail < kNumTails, "softlabel_kd_forward: unknown tail ", tail);
  TORCH_CHECK_VALUE(tail != kNone || divergence == kForwardKL,
                    "softlabel_kd_forward: tail 'none' supports forward_kl only");
  TORCH_CHECK_VALUE(temperature > 0, "softlabel_kd_forward: temperature must be > 0");
  if (labels) {
    TORCH_CHECK_VALUE(labels->dim() == 1 && labels->size(0) == N && labels->is_contiguous() &&
                          labels->scalar_type() == at::kLong,
                      "softlabel_kd_forward: labels must be a contiguous int64 tensor of shape (N,)");
    if (hard_weight > 0) {
      const int64_t* l = labels->data_ptr<int64_t>();
      for (int64_t i = 0; i < N; ++i) {
        TORCH_CHECK_VALUE(l[i] == ignore_index || (l[i] >= 0 && l[i] < V), "softlabel_kd_forward: labels[", i,
                          "] = ", l[i], " is neither in [0, ", V, ") nor ignore_index");
      }
    }
  } else {
    TORCH_CHECK_VALUE(hard_weight <= 0, "softlabel_kd_forward: hard_weight > 0 needs labels");
  }
  check_rows(data, L, labels, ignore_index);
  return run_rows(student, PackedTeacher{data.data_ptr<uint8_t>(), L}, L.k, grad, labels, ignore_index, divergence,
                  tail, param, temperature, hard_weight, soft_scale, mean_scale, "softlabel_kd_forward");
}

std::tuple<at::Tensor, at::Tensor> softlabel_kd_forward_cpu(
    const at::Tensor& student, const at::Tensor& data, at::IntArrayRef layout,
    const std::optional<at::Tensor>& labels, int64_t ignore_index, int64_t divergence, int64_t tail,
    double param, double temperature, double hard_weight, double soft_scale, bool mean_scale, bool need_grad) {
  at::Tensor grad;  // without need_grad (evaluation) no N×V buffer is allocated or written
  if (need_grad) grad = empty_gradient_like(student);
  auto loss = softlabel_kd_into(student, data, layout, labels, grad, ignore_index, divergence, tail, param,
                                temperature, hard_weight, soft_scale, mean_scale);
  return {loss, need_grad ? grad : student.new_empty({0})};
}

at::Tensor softlabel_kd_forward_inplace_cpu(
    at::Tensor& student, const at::Tensor& data, at::IntArrayRef layout, const std::optional<at::Tensor>& labels,
    int64_t ignore_index, int64_t divergence, int64_t tail, double param, double temperature,
    double hard_weight, double soft_scale, bool mean_scale) {
  return softlabel_kd_into(student, data, layout, labels, student, ignore_index, divergence, tail, param,
                           temperature, hard_weight, soft_scale, mean_scale);
}

std::tuple<at::Tensor, at::Tensor> softlabel_decode_cpu(const at::Tensor& data, at::IntArrayRef layout) {
  const Layout L = packed::check_layout(data, layout);
  const int64_t N = data.size(0);
  auto ids = at::empty({N, L.k}, data.options().dtype(at::kLong));
  auto lp = at::empty({N, L.k}, data.options().dtype(at::kFloat));
  const uint8_t* d = data.data_ptr<uint8_t>();
  int64_t* pid = ids.data_ptr<int64_t>();
  float* plp = lp.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = d + r * L.row_bytes;
      const double shift = packed::row_shift(L, row);
      for (int64_t i = 0; i < L.k; ++i) {
        pid[r * L.k + i] = packed::id_at(L, row, i);
        plp[r * L.k + i] = float(packed::raw_value(L, row, i) + shift);
      }
    }
  });
  return {ids, lp};
}

std::tuple<at::Tensor, at::Tensor> softlabel_kd_forward_meta(
    const at::Tensor& student, const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&, int64_t,
    int64_t, int64_t, double, double, double, double, bool, bool need_grad) {
  auto loss = at::empty_symint({student.sym_size(0)}, student.options().dtype(at::kFloat));
  auto grad = need_grad ? at::empty_like(student, at::MemoryFormat::Contiguous) : student.new_empty({0});
  return {loss, grad};
}

at::Tensor softlabel_kd_forward_inplace_meta(at::Tensor& student, const at::Tensor&, at::IntArrayRef,
                                             const std::optional<at::Tensor>&, int64_t, int64_t, int64_t, double,
                                             double, double, double, bool) {
  return at::empty_symint({student.sym_size(0)}, student.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> softlabel_decode_meta(const at::Tensor& data, at::IntArrayRef layout) {
  TORCH_CHECK_VALUE(layout.size() == packed::kLayoutFields, "softlabels: layout must have ", packed::kLayoutFields,
                    " fields, got ", layout.size());
  const int64_t k = layout[2];
  return {at::empty_symint({data.sym_size(0), k}, data.options().dtype(at::kLong)),
          at::empty_symint({data.sym_size(0), k}, data.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CPU, m) {
  m.impl("softlabel_kd_forward", &softlabel_kd_forward_cpu);
  m.impl("softlabel_kd_forward_inplace", &softlabel_kd_forward_inplace_cpu);
  m.impl("softlabel_decode", &softlabel_decode_cpu);
}

TORCH_LIBRARY_IMPL(fastdistill, Meta, m) {
  m.impl("softlabel_kd_forward", &softlabel_kd_forward_meta);
  m.impl("softlabel_kd_forward_inplace", &softlabel_kd_forward_inplace_meta);
  m.impl("softlabel_decode", &softlabel_decode_meta);
}

}  // namespace fastdistill
