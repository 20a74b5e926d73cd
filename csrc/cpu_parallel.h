// The CPU kernels' shared work decomposition: (sample, chunk of kChunk elements) work items,
// so a large batch parallelises over samples and a small one over elements; OpenMP only once
// the data is big enough to pay for the threads.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace stepdrop {

constexpr int64_t kChunk = 1 << 14;              // elements per work item
constexpr int64_t kParallelThreshold = 1 << 16;  // total elements below which we stay serial

// Threads to use: `requested` (at::get_num_threads() from the binding), else OpenMP's default.
inline int cpu_threads(int requested) {
#ifdef _OPENMP
  return requested > 0 ? requested : omp_get_max_threads();
#else
  (void)requested;
  return 1;
#endif
}

// Whether `work` items over `total` elements are worth running on `threads` threads.
inline bool run_parallel(int threads, int64_t work, int64_t total) {
  return threads > 1 && work > 1 && total >= kParallelThreshold;
}

}  // namespace stepdrop
