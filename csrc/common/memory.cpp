// The CPU gradient cache behind empty_gradient_like (see memory.h).
#include "common/memory.h"

#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace fastdistill {
namespace {

constexpr uintptr_t kHuge = uintptr_t(2) << 20;

struct Block {
  void* base = nullptr;  // what mmap returned (munmap takes it back)
  size_t mapped = 0;     // bytes mapped at base
  void* data = nullptr;  // 2 MiB-aligned start handed out
  size_t bytes = 0;      // usable bytes from data
};

int64_t default_limit() {
  if (const char* env = std::getenv("FASTDISTILL_CPU_CACHE_MB")) {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0,
                      "FASTDISTILL_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", env, "'");
    return int64_t(mb) << 20;
  }
#ifdef __linux__
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) return int64_t(pages) * int64_t(page) / 4;
#endif
  return int64_t(1) << 30;
}

Block map_block(size_t bytes) {
  Block b;
  b.bytes = (bytes + kHuge - 1) & ~(kHuge - 1);
#ifdef __linux__
  b.mapped = b.bytes + kHuge;  // room to align the start to a huge page
  b.base = mmap(nullptr, b.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(b.base != MAP_FAILED, "fastdistill: out of memory mapping a ", b.bytes >> 20,
              " MiB gradient buffer");
  b.data = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(b.base) + kHuge - 1) & ~(kHuge - 1));
#ifdef MADV_HUGEPAGE
  madvise(b.data, b.bytes, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
#else
  b.mapped = b.bytes;
  b.base = b.data = std::aligned_alloc(kHuge, b.bytes);
  TORCH_CHECK(b.base != nullptr, "fastdistill: out of memory allocating a ", b.bytes >> 20,
              " MiB gradient buffer");
#endif
  return b;
}

void unmap_block(const Block& b) {
#ifdef __linux__
  munmap(b.base, b.mapped);
#else
  std::free(b.base);
#endif
}

class Cache {
 public:
  Block take(size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it)  // best fit, the most recently freed of equals
      if (it->bytes >= bytes && (best == idle_.end() || it->bytes <= best->bytes)) best = it;
    Block b;
    if (best != idle_.end()) {
      b = *best;
      idle_.erase(best);
      idle_bytes_ -= b.bytes;
      ++hits_;
    } else {
      b = map_block(bytes);
      ++misses_;
    }
    live_bytes_ += b.bytes;
    ++live_blocks_;
    return b;
  }

  void give_back(const Block& b) {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      live_bytes_ -= b.bytes;
      --live_blocks_;
      if (int64_t(b.bytes) > limit_) {
        drop.push_back(b);
      } else {
        idle_.push_back(b);  // most recently freed last
        idle_bytes_ += b.bytes;
        evict_over(limit_, drop);
      }
    }
    for (const auto& d : drop) unmap_block(d);
  }

  void empty() { set_limit_and_evict(nullptr); }

  void set_limit(int64_t bytes) { set_limit_and_evict(&bytes); }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> g(mu_);
    return {idle_bytes_, int64_t(idle_.size()), live_bytes_, live_blocks_, hits_, misses_, limit_};
  }

 private:
  void evict_over(int64_t limit, std::vector<Block>& drop) {  // oldest first; caller holds mu_
    while (idle_bytes_ > limit && !idle_.empty()) {
      drop.push_back(idle_.front());
      idle_bytes_ -= idle_.front().bytes;
      idle_.erase(idle_.begin());
    }
  }

  void set_limit_and_evict(const int64_t* limit) {
    std::vector<Block> drop;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (limit) limit_ = *limit;
      evict_over(limit ? limit_ : 0, drop);
    }
    for (const auto& d : drop) unmap_block(d);
  }

  std::mutex mu_;
  std::vector<Block> idle_;
  int64_t idle_bytes_ = 0, live_bytes_ = 0, live_blocks_ = 0, hits_ = 0, misses_ = 0;
  int64_t limit_ = default_limit();
};

// Never destroyed: a gradient may outlive static destruction at exit.
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

}  // namespace

at::Tensor empty_cpu_cached(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  // The byte count with every multiply checked: a wrapped product would map a
  // small block under a huge tensor, and the first read past it would crash.
  for (const auto d : sizes) TORCH_CHECK_VALUE(d >= 0, "empty_cpu_cached: size must be >= 0, got ", sizes);
  int64_t bytes = int64_t(c10::elementSize(dtype));
  if (std::find(sizes.begin(), sizes.end(), int64_t(0)) != sizes.end()) bytes = 0;
  for (const auto d : sizes) {
    TORCH_CHECK_VALUE(!__builtin_mul_overflow(bytes, d, &bytes), "empty_cpu_cached: size ", sizes,
                      " of ", dtype, " is over the 2^63 - 1 bytes a tensor can address");
  }
  if (bytes < gradient_cache::kCachedMin) return at::empty(sizes, opts);
  const Block b = cache().take(bytes);
  return at::from_blob(b.data, sizes, [b](void*) { cache().give_back(b); }, opts);
}

at::Tensor empty_gradient_like(const at::Tensor& like) {
  if (!like.device().is_cpu()) return at::empty_like(like, at::MemoryFormat::Contiguous);
  return empty_cpu_cached(like.sizes(), like.scalar_type());
}

namespace gradient_cache {
std::vector<int64_t> stats() { return cache().stats(); }
void empty() { cache().empty(); }
void set_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "set_limit: bytes must be >= 0, got ", bytes);
  cache().set_limit(bytes);
}
}  // namespace gradient_cache

}  // namespace fastdistill

namespace {
at::Tensor cpu_cache_new(at::IntArrayRef size, at::ScalarType dtype) {
  for (const auto d : size) TORCH_CHECK_VALUE(d >= 0, "cpu_cache_new: size must be >= 0, got ", size);
  return fastdistill::empty_cpu_cached(size, dtype);
}
std::vector<int64_t> cpu_cache_stats() { return fastdistill::gradient_cache::stats(); }
void cpu_cache_empty() { fastdistill::gradient_cache::empty(); }
void cpu_cache_set_limit(int64_t bytes) { fastdistill::gradient_cache::set_limit(bytes); }
}  // namespace

TORCH_LIBRARY_IMPL(fastdistill, CatchAll, m) {
  m.impl("cpu_cache_new", &cpu_cache_new);
  m.impl("cpu_cache_stats", &cpu_cache_stats);
  m.impl("cpu_cache_empty", &cpu_cache_empty);
  m.impl("cpu_cache_set_limit", &cpu_cache_set_limit);
}
