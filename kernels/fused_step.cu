// CUDA fused step. Grid: x over the elements of a sample (grid-stride), y over samples
// (grid-stride beyond 65535). Thread 0 of each block gathers its sample's coefficients
// from the ᾱ table into shared memory; masked samples are copied through. When the rows
// allow it, each thread moves 16 bytes at a time (float4 / double2). In plan mode thread 0
// of block x = 0 also writes the sample's bookkeeping, so each sample's is written once.
#include <cstdint>
#include <limits>

#include "fused_step.cuh"

namespace stepdrop {
namespace {

constexpr int kMaxThreads = 256;
constexpr int64_t kMaxBlocksX = 2048;
constexpr int64_t kMaxBlocksY = 65535;

template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <typename T, int W, bool kNoise, bool kX0>
__global__ void __launch_bounds__(kMaxThreads) fused_step_kernel(const FusedStepParams p, const T lo, const T hi) {
  using P = Pack<T, W>;
  __shared__ StepCoef<T> coef;
  __shared__ bool live;
  const int64_t nv = p.numel_per_sample / W;  // packs per sample (W divides N here)
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    if (threadIdx.x == 0) {
      const SampleStep st = sample_step(p, b);
      live = st.live;
      if (live) coef = cast_coef<T>(step_coefficients(p.alphas_cumprod, p.num_alphas, st.t, st.s, p.solver, p.eta));
      if (blockIdx.x == 0) plan_bookkeeping(p, b, st);
    }
    __syncthreads();
    const P* x = static_cast<const P*>(p.x) + b * nv;
    const P* e = static_cast<const P*>(p.eps) + b * nv;
    const P* z = kNoise ? static_cast<const P*>(p.noise) + b * nv : nullptr;
    P* out = static_cast<P*>(p.x_next) + b * nv;
    P* x0o = kX0 ? static_cast<P*>(p.x0_out) + b * nv : nullptr;
    const bool on = live;
    const StepCoef<T> c = coef;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < nv; i += int64_t(gridDim.x) * blockDim.x) {
      const P xv = x[i];
      if (!on) {
        out[i] = xv;
        if constexpr (kX0) x0o[i] = xv;
        continue;
      }
      const P ev = e[i];
      P zv;
      if constexpr (kNoise) zv = z[i];
      P ov, x0v;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        x0v.v[k] = predict_x0(c, xv.v[k], ev.v[k], lo, hi);
        ov.v[k] = transition(c, x0v.v[k], xv.v[k], ev.v[k]);
        if constexpr (kNoise) ov.v[k] = ov.v[k] + c.sigma * zv.v[k];
      }
      out[i] = ov;
      if constexpr (kX0) x0o[i] = x0v;
    }
    __syncthreads();  // shared coef is rewritten for the next sample
  }
}

template <typename T, int W, bool kNoise, bool kX0>
cudaError_t launch(const FusedStepParams& p, cudaStream_t stream) {
  const int64_t nv = p.numel_per_sample / W;
  // at least one warp and one block per sample: a sample with no elements still has its bookkeeping
  const int64_t warps = nv > 32 ? (nv + 31) / 32 : 1;
  const int threads = static_cast<int>(warps * 32 < kMaxThreads ? warps * 32 : kMaxThreads);
  const int64_t bx = nv > threads ? (nv + threads - 1) / threads : 1;
  const dim3 grid(static_cast<unsigned>(bx < kMaxBlocksX ? bx : kMaxBlocksX),
                  static_cast<unsigned>(p.batch < kMaxBlocksY ? p.batch : kMaxBlocksY));
  const T inf = std::numeric_limits<T>::infinity();
  const T lo = p.clip > 0.0 ? T(-p.clip) : -inf;
  const T hi = p.clip > 0.0 ? T(p.clip) : inf;
  fused_step_kernel<T, W, kNoise, kX0><<<grid, threads, 0, stream>>>(p, lo, hi);
  return cudaGetLastError();
}

template <typename T, int W>
cudaError_t dispatch_optional(const FusedStepParams& p, cudaStream_t stream) {
  const bool noise = p.noise != nullptr;
  const bool x0 = p.x0_out != nullptr;
  if (noise && x0) return launch<T, W, true, true>(p, stream);
  if (noise) return launch<T, W, true, false>(p, stream);
  if (x0) return launch<T, W, false, true>(p, stream);
  return launch<T, W, false, false>(p, stream);
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
cudaError_t dispatch(const FusedStepParams& p, cudaStream_t stream) {
  if (!has_work(p)) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = p.numel_per_sample % kVec == 0 && aligned16(p.x) && aligned16(p.eps) && aligned16(p.noise) &&
                   aligned16(p.x_next) && aligned16(p.x0_out);
  return vec ? dispatch_optional<T, kVec>(p, stream) : dispatch_optional<T, 1>(p, stream);
}

}  // namespace
}  // namespace stepdrop

cudaError_t stepdrop_fused_step_f32(const stepdrop::FusedStepParams& p, cudaStream_t stream) {
  return stepdrop::dispatch<float>(p, stream);
}

cudaError_t stepdrop_fused_step_f64(const stepdrop::FusedStepParams& p, cudaStream_t stream) {
  return stepdrop::dispatch<double>(p, stream);
}
