// Memory helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fastdistill {

// An uninitialised contiguous tensor shaped and typed like `like`, for a
// kernel that writes every element (the fused losses' N×V gradients).
//
// Why not at::empty_like: a buffer this large comes from glibc as a fresh
// mmap every time, and on this class of machine the first touch of a fresh
// 2 GB buffer (one page fault per 4 KiB page) costs 0.5–1.5 s, several times
// the fused pass that fills it. Buffers of at least kCachedMin bytes are
// therefore served from a small cache of resident blocks: when the tensor
// dies (after the step's backward consumed it) its block is kept, idle, for
// the next step's gradient, as PyTorch's CUDA caching allocator does on the
// GPU. The cache holds at most a byte limit of idle blocks (default a quarter
// of physical memory; FASTDISTILL_CPU_CACHE_MB or set_limit change it, 0
// turns it off); fastdistill.cpu_cache.empty_cache() unmaps them. Fresh blocks
// ask for transparent huge pages before anything touches them.
at::Tensor empty_gradient_like(const at::Tensor& like);

// The same for a CPU tensor of the given shape and dtype.
at::Tensor empty_cpu_cached(at::IntArrayRef sizes, at::ScalarType dtype);

namespace gradient_cache {
constexpr int64_t kCachedMin = int64_t(8) << 20;
// {idle bytes, idle blocks, live bytes, live blocks, hits, misses, limit bytes}
std::vector<int64_t> stats();
void empty();
void set_limit(int64_t bytes);
}  // namespace gradient_cache

}  // namespace fastdistill
