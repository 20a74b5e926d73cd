// CPU fused step: one OpenMP loop over (sample, chunk of elements) work items (cpu_parallel.h).
// In plan mode the work item of each sample's first chunk also writes that sample's
// bookkeeping (fused_step_common.h). Inner loops are plain restrict loops with `omp simd`,
// vectorised by the compiler at -O3 (no -march needed).
#include "fused_step_cpu.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "cpu_parallel.h"

namespace stepdrop {
namespace {

template <typename T, bool kNoise, bool kX0>
void update_span(const T* __restrict x, const T* __restrict e, const T* __restrict z, T* __restrict out,
                 T* __restrict x0_out, int64_t n, const StepCoef<T> c, const T lo, const T hi) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T xi = x[i];
    const T ei = e[i];
    const T x0 = predict_x0(c, xi, ei, lo, hi);
    T v = transition(c, x0, xi, ei);
    if constexpr (kNoise) v = v + c.sigma * z[i];
    out[i] = v;
    if constexpr (kX0) x0_out[i] = x0;
  }
}

template <typename T, bool kNoise, bool kX0>
void run(const FusedStepParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* e = static_cast<const T*>(p.eps);
  const T* z = static_cast<const T*>(p.noise);
  T* out = static_cast<T*>(p.x_next);
  T* x0 = static_cast<T*>(p.x0_out);
  const int64_t n = p.numel_per_sample;
  // at least one work item per sample: one with no elements still has its plan bookkeeping
  const int64_t chunks = std::max<int64_t>(1, (n + kChunk - 1) / kChunk);
  const int64_t work = p.batch * chunks;
  const T inf = std::numeric_limits<T>::infinity();
  const T lo = p.clip > 0.0 ? T(-p.clip) : -inf;
  const T hi = p.clip > 0.0 ? T(p.clip) : inf;
  const int threads = cpu_threads(p.num_threads);
  const bool parallel = run_parallel(threads, work, p.batch * n);

#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t w = 0; w < work; ++w) {
    const int64_t b = w / chunks;
    const int64_t begin = (w % chunks) * kChunk;
    const int64_t len = std::min(kChunk, n - begin);
    const int64_t off = b * n + begin;
    const SampleStep st = sample_step(p, b);
    if (begin == 0) plan_bookkeeping(p, b, st);  // once per sample: its first chunk
    if (len <= 0) continue;
    if (!st.live) {  // masked sample: x_next = x̂0 = x
      std::memcpy(out + off, x + off, sizeof(T) * len);
      if constexpr (kX0) std::memcpy(x0 + off, x + off, sizeof(T) * len);
      continue;
    }
    const StepCoef<T> c =
        cast_coef<T>(step_coefficients(p.alphas_cumprod, p.num_alphas, st.t, st.s, p.solver, p.eta));
    update_span<T, kNoise, kX0>(x + off, e + off, kNoise ? z + off : nullptr, out + off, kX0 ? x0 + off : nullptr,
                                len, c, lo, hi);
  }
}

template <typename T>
void dispatch(const FusedStepParams& p) {
  if (!has_work(p)) return;
  const bool noise = p.noise != nullptr;
  const bool x0 = p.x0_out != nullptr;
  if (noise && x0) return run<T, true, true>(p);
  if (noise) return run<T, true, false>(p);
  if (x0) return run<T, false, true>(p);
  return run<T, false, false>(p);
}

}  // namespace

void fused_step_cpu_f32(const FusedStepParams& p) { dispatch<float>(p); }
void fused_step_cpu_f64(const FusedStepParams& p) { dispatch<double>(p); }

}  // namespace stepdrop
