// CPU gradient-norm probe (fused_step_common.h, reference.grad_norm_probe): one OpenMP loop
// over (sample, chunk of elements) work items (cpu_parallel.h), each reducing its span to the partial sums
// Σ(ε_probe − ε)² and Σv² with an `omp simd` reduction; then each sample's partials are added
// in chunk order, so the result does not depend on the number of threads.
#include <algorithm>
#include <vector>

#include "cpu_parallel.h"
#include "fused_step_cpu.h"

namespace stepdrop {
namespace {

template <typename T>
void run_probe(const GradProbeParams& p) {
  using A = typename Accum<T>::type;
  const T* probe = static_cast<const T*>(p.eps_probe);
  const T* eps = static_cast<const T*>(p.eps);
  const T* dir = static_cast<const T*>(p.v);
  A* out = static_cast<A*>(p.out);
  const int64_t n = p.numel_per_sample;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t work = p.batch * chunks;
  std::vector<A> partial(2 * work);  // (Σdiff², Σv²) of every work item
  const int threads = cpu_threads(p.num_threads);
  const bool parallel = run_parallel(threads, work, p.batch * n);

#pragma omp parallel num_threads(threads) if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t begin = (w % chunks) * kChunk;
      const int64_t len = std::min(kChunk, n - begin);
      const int64_t off = (w / chunks) * n + begin;
      const T* __restrict q = probe + off;
      const T* __restrict e = eps + off;
      const T* __restrict v = dir + off;
      A diff2 = 0, v2 = 0;
#pragma omp simd reduction(+ : diff2, v2)
      for (int64_t i = 0; i < len; ++i) probe_accumulate(diff2, v2, q[i], e[i], v[i]);
      partial[2 * w] = diff2;
      partial[2 * w + 1] = v2;
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.batch; ++b) {
      A diff2 = 0, v2 = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        diff2 += partial[2 * (b * chunks + c)];
        v2 += partial[2 * (b * chunks + c) + 1];
      }
      out[b] = probe_finish(diff2, v2, p.step);  // no elements: 0/0 = NaN, like the reference
    }
  }
}

}  // namespace

void grad_probe_cpu(const GradProbeParams& p) {
  if (p.batch <= 0) return;
  switch (p.dtype) {
    case kFloat64: return run_probe<double>(p);
    case kFloat16: return run_probe<Half>(p);
    case kBFloat16: return run_probe<BFloat16>(p);
    default: return run_probe<float>(p);
  }
}

}  // namespace stepdrop
