// CUDA gradient-norm probe (fused_step_common.h, reference.grad_norm_probe). Grid: x over
// G blocks per sample, y over samples (grid-stride beyond 65535). Each block reduces its
// share of a sample's elements to the two sums Σ(ε_probe − ε)² and Σv² (warp shuffles, then
// one warp over the warps' sums). With G = 1 the block writes the result; otherwise it stores
// its partials in the workspace and the last of the sample's G blocks to arrive (an atomic
// counter per sample: the threadfence reduction of the CUDA samples) adds the G partials in
// block order and writes the result. G depends only on (B, N), never on the GPU, and every
// sum is taken in a fixed order: the result is deterministic.
#include <cstddef>
#include <cstdint>

#include "fused_step.cuh"

namespace stepdrop {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMinPerBlock = 4096;   // a sample is split only into blocks of at least this many elements
constexpr int64_t kTargetBlocks = 1024;  // and only while the batch alone gives fewer blocks than this
constexpr int64_t kMaxBlocksY = 65535;

int64_t blocks_per_sample(int64_t batch, int64_t n) {
  const int64_t by_size = (n + kMinPerBlock - 1) / kMinPerBlock;
  const int64_t by_batch = batch >= kTargetBlocks ? 1 : kTargetBlocks / batch;
  const int64_t g = by_size < by_batch ? by_size : by_batch;
  return g > 1 ? g : 1;
}

// Workspace layout for G > 1: uint32 counters [B], then (padded to 8 bytes) partials [B, G, 2].
__host__ __device__ size_t counters_bytes(int64_t batch) { return (sizeof(unsigned int) * batch + 7) / 8 * 8; }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Both sums over the block, in a fixed order; the totals are valid in thread 0.
template <typename A>
__device__ __forceinline__ void block_sum(A& a, A& b) {
  __shared__ A warp_a[kWarps], warp_b[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane == 0) {
    warp_a[warp] = a;
    warp_b[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < kWarps ? warp_a[lane] : A(0));
    b = warp_sum(lane < kWarps ? warp_b[lane] : A(0));
  }
  __syncthreads();  // warp_a, warp_b are rewritten for the next sample
}

template <typename T>
__global__ void __launch_bounds__(kThreads) grad_probe_kernel(const GradProbeParams p, const int64_t G) {
  using A = typename Accum<T>::type;
  const int64_t n = p.numel_per_sample;
  A* out = static_cast<A*>(p.out);
  __shared__ bool last;
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    const T* q = static_cast<const T*>(p.eps_probe) + b * n;
    const T* e = static_cast<const T*>(p.eps) + b * n;
    const T* v = static_cast<const T*>(p.v) + b * n;
    A diff2 = 0, v2 = 0;
    for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += G * kThreads)
      probe_accumulate(diff2, v2, q[i], e[i], v[i]);
    block_sum(diff2, v2);
    if (G == 1) {  // the block saw the whole sample (no elements: 0/0 = NaN, like the reference)
      if (threadIdx.x == 0) out[b] = probe_finish(diff2, v2, p.step);
      continue;
    }
    unsigned int* counters = static_cast<unsigned int*>(p.workspace);
    A* partials = reinterpret_cast<A*>(static_cast<char*>(p.workspace) + counters_bytes(p.batch));
    if (threadIdx.x == 0) {
      partials[2 * (b * G + blockIdx.x)] = diff2;
      partials[2 * (b * G + blockIdx.x) + 1] = v2;
      __threadfence();  // the partials are visible before the counter says so
      last = atomicAdd(&counters[b], 1u) == static_cast<unsigned int>(G - 1);
    }
    __syncthreads();
    if (last && threadIdx.x == 0) {  // every block of sample b has stored its partials
      __threadfence();
      const volatile A* part = partials + 2 * b * G;  // volatile: read memory, not a stale cache
      A d = 0, w = 0;
      for (int64_t g = 0; g < G; ++g) {
        d += part[2 * g];
        w += part[2 * g + 1];
      }
      out[b] = probe_finish(d, w, p.step);
    }
    __syncthreads();  // `last` is rewritten for the next sample
  }
}

template <typename T>
cudaError_t launch(const GradProbeParams& p, cudaStream_t stream) {
  const int64_t G = blocks_per_sample(p.batch, p.numel_per_sample);
  if (G > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>(p.batch < kMaxBlocksY ? p.batch : kMaxBlocksY));
  grad_probe_kernel<T><<<grid, kThreads, 0, stream>>>(p, G);
  return cudaGetLastError();
}

}  // namespace
}  // namespace stepdrop

size_t stepdrop_grad_probe_workspace_bytes(const stepdrop::GradProbeParams& p) {
  if (p.batch <= 0) return 0;
  const int64_t G = stepdrop::blocks_per_sample(p.batch, p.numel_per_sample);
  if (G == 1) return 0;
  const size_t accum = p.dtype == stepdrop::kFloat64 ? sizeof(double) : sizeof(float);
  return stepdrop::counters_bytes(p.batch) + accum * 2 * p.batch * G;
}

cudaError_t stepdrop_grad_probe(const stepdrop::GradProbeParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  switch (p.dtype) {
    case stepdrop::kFloat64: return stepdrop::launch<double>(p, stream);
    case stepdrop::kFloat16: return stepdrop::launch<stepdrop::Half>(p, stream);
    case stepdrop::kBFloat16: return stepdrop::launch<stepdrop::BFloat16>(p, stream);
    default: return stepdrop::launch<float>(p, stream);
  }
}
