// Host-side check of a packed soft-label layout (Codec.layout() in Python)
// against its rows; shared by the CPU ops and the CUDA decode.
#pragma once

#include <ATen/ATen.h>

#include "softlabels/packed_row.h"

namespace fastdistill {
namespace packed {

// The layout's numbers must be the codec's own (offsets recomputed here), and
// the rows a contiguous uint8 (N, row_bytes) tensor.
inline Layout check_layout(const at::Tensor& data, at::IntArrayRef layout) {
  TORCH_CHECK_VALUE(layout.size() == kLayoutFields, "softlabels: layout must have ",
                    kLayoutFields, " fields, got ", layout.size());
  Layout L{layout[0], layout[1], layout[2], layout[3], layout[4], layout[5], layout[6], layout[7]};
  const bool topk = L.method == kTopK;
  TORCH_CHECK_VALUE(topk || L.method == kSampled, "softlabels: unknown method ", L.method);
  TORCH_CHECK_VALUE(L.k >= 1 && L.vocab_size >= 1 && L.id_bits >= 1 && L.id_bits <= 31 &&
                        (int64_t(1) << L.id_bits) >= L.vocab_size && L.value_bits >= 1 && L.value_bits <= 31,
                    "softlabels: inconsistent layout");
  TORCH_CHECK_VALUE(!topk || L.value_bits == 8 || L.value_bits == 16, "softlabels: top-k values are 8 or 16 bits");
  const int64_t values_offset = topk ? 4 : 0;
  const int64_t ids_offset = values_offset + (L.k * L.value_bits + 7) / 8;
  const int64_t row_bytes = ids_offset + (L.k * L.id_bits + 7) / 8;
  TORCH_CHECK_VALUE(L.values_offset == values_offset && L.ids_offset == ids_offset && L.row_bytes == row_bytes,
                    "softlabels: inconsistent layout offsets");
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte && data.dim() == 2 && data.size(1) == L.row_bytes &&
                        data.is_contiguous(),
                    "softlabels: packed rows must be a contiguous uint8 tensor (N, ", L.row_bytes, ")");
  return L;
}

}  // namespace packed
}  // namespace fastdistill
