// CUDA decode of packed soft labels: the same unpack as the CPU op
// (softlabels_cpu.cpp, tested there against the readable Python decoder),
// through the same host+device functions of packed_row.h. One thread per
// row: a row is k entries, and rows are independent.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "softlabels/layout.h"
#include "softlabels/packed_row.h"

namespace fastdistill {
namespace {

using packed::Layout;

__global__ void softlabel_decode_kernel(const uint8_t* __restrict__ data, Layout L, int64_t n_rows,
                                        int64_t* __restrict__ ids, float* __restrict__ logprobs) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < n_rows; r += stride) {
    const uint8_t* row = data + r * L.row_bytes;
    const double shift = packed::row_shift(L, row);
    for (int64_t i = 0; i < L.k; ++i) {
      ids[r * L.k + i] = packed::id_at(L, row, i);
      logprobs[r * L.k + i] = float(packed::raw_value(L, row, i) + shift);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> softlabel_decode_cuda(const at::Tensor& data, at::IntArrayRef layout) {
  const Layout L = packed::check_layout(data, layout);
  const int64_t n = data.size(0);
  auto ids = at::empty({n, L.k}, data.options().dtype(at::kLong));
  auto logprobs = at::empty({n, L.k}, data.options().dtype(at::kFloat));
  if (n == 0) return {ids, logprobs};
  constexpr int kThreads = 256;
  const int blocks = int(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
  auto stream = c10::cuda::getCurrentCUDAStream(data.device().index());
  softlabel_decode_kernel<<<blocks, kThreads, 0, stream.stream()>>>(
      data.data_ptr<uint8_t>(), L, n, ids.data_ptr<int64_t>(), logprobs.data_ptr<float>());
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "softlabel_decode: CUDA launch failed: ", cudaGetErrorString(err));
  return {ids, logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CUDA, m) {
  m.impl("softlabel_decode", &softlabel_decode_cuda);
}

}  // namespace fastdistill
