// Memory helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastdistill {

// A fresh N×V gradient buffer costs more to first-touch with 4 KiB pages (a
// page fault each) than a whole fused pass. Asking for transparent huge pages
// on it, before anything touches it, cuts that several-fold: what PyTorch's
// THP_MEM_ALLOC_ENABLE=1 does for every allocation, here for ours. A hint:
// failure is harmless.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes < 4 * kHuge) return;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t b = (p + bytes) & ~(kHuge - 1);
  if (b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#endif
}

}  // namespace fastdistill
