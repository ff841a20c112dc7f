// The divergence indices every kernel family shares.
#pragma once

#include <cstdint>

namespace fastdistill {

// Must match fastdistill.reference.kd.DIVERGENCES.
enum Divergence : int64_t {
  kForwardKL = 0,
  kReverseKL,
  kJSD,
  kTVD,
  kSkewForwardKL,
  kSkewReverseKL,
  kTAID,  // not defined on sparse teachers
  kNumDivergences
};

}  // namespace fastdistill
